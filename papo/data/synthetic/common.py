"""Shared pieces of the synthetic task families: the scene record, colours, shapes, fonts and RNG keys.

A family separates *what* a sample is (``Family.scene``: question, answer, facts, reasoning; cheap, no pixels)
from *how it looks* (``Family.render``), so balance and text-only-predictor checks run without drawing.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from papo.errors import UserError

BASE = 448  # layouts are designed on a 448-px canvas (PAPO's min_pixels = 448 * 448) and scaled
BACKGROUND = (245, 245, 245)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class Scene:
    question: str  # without <image> and without the format suffix
    answer: str  # canonical short answer
    answer_type: str  # verifier name (papo.rewards): int | word | choice | exact
    facts: dict[str, Any]  # what a perfect perceiver reads off the image (ground truth for error analysis)
    reasoning: str  # the <think> body: "seen: k=v, k=v. <computation>."
    layout: dict[str, Any] = field(default_factory=dict)  # everything ``render`` needs
    vocabulary: tuple[str, ...] = ()  # closed answer set for word / choice answers
    # the answer the question's text suggests under the ``shortcut`` knob (shortcut_answer), on every split, so
    # that an evaluation can count answers that follow the text instead of the image; None: nothing to key on
    cued: str | None = None
    # the facts the answer follows from, where it is fewer than all of them (a clock's hour needs no minute hand):
    # error analysis judges a response by these; empty: all facts
    answer_facts: tuple[str, ...] = ()

    @property
    def solution(self) -> str:
        """Supervised warm-start target in PAPO's format."""
        return f"<think>{self.reasoning}</think> \\boxed{{{self.answer}}}"


def seen(facts: dict[str, Any]) -> str:
    """The fixed, parseable statement of perceived facts that every reasoning trace opens with."""
    return "seen: " + ", ".join(f"{k}={v}" for k, v in facts.items()) + "."


def rng_for(task: str, split: str, seed: int, index: int, stream: int) -> np.random.Generator:
    """Independent generators per (task, split, seed, sample index); stream 0 = scene, 1 = rendering."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    task_key = int.from_bytes(hashlib.blake2b(task.encode(), digest_size=4).digest(), "little")
    return np.random.default_rng(np.random.SeedSequence([task_key, SPLITS[split], int(seed), int(index), stream]))


def check_size(size: int) -> int:
    if size % 28 or size < 28:
        raise UserError(f"image size must be a positive multiple of 28 (Qwen2.5-VL patch 14 x merge 2), got {size}")
    return size


def canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw, float]:
    """A blank image and the scale factor from the 448-px design grid."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    return img, ImageDraw.Draw(img), size / BASE


@lru_cache(maxsize=32)
def font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(6, px))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    """Filled ``shape`` of radius ``r`` centred at (cx, cy), with a thin dark outline."""
    outline, width = (30, 30, 30), max(1, round(r / 12))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def plural(shape: str) -> str:
    return shape + "s"


def pick(rng: np.random.Generator, options: Any) -> Any:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def shortcut_answer(question_key: str, answers: Any) -> str:
    """The answer a question's text "suggests" under the ``shortcut`` knob: a fixed, arbitrary function of the
    question's attributes (a stable hash, the same in every process)."""
    import hashlib

    options = list(answers)
    digest = hashlib.blake2b(question_key.encode("utf-8"), digest_size=8).digest()
    return options[int.from_bytes(digest, "little") % len(options)]


def draw_answer(rng: np.random.Generator, answers: Any, question_key: str, shortcut_percent: int) -> tuple[str, str]:
    """(answer, cued): the answer, uniform over ``answers``, or with the ``shortcut`` knob that percent of the time
    the question's shortcut answer instead; and that shortcut answer (``Scene.cued``). No extra draw when the knob
    is 0, so default samples do not change."""
    cued = shortcut_answer(question_key, answers)
    if shortcut_percent and rng.random() < shortcut_percent / 100:
        return cued, cued
    return pick(rng, answers), cued
