"""Object scenes (a 2-D CLEVR / Sort-of-CLEVR analogue): counting, count-and-subtract, closest-object colour.

Answers are drawn first, uniformly over the family's answer space, and the scene is built to match, so
the answer prior given the question text is flat (the vision gate in the tests checks it). The ``shortcut``
knob (percent, train split only) breaks that on purpose: that share of training answers is the one the
question's attributes suggest (``common.shortcut_answer``), a language-prior shortcut that held-out questions,
drawn flat, do not reward. ``explain=1`` writes the reasoning trace out in words after the ``seen:`` facts, so
that most of a response's tokens are reasoning rather than read off the image.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from papo.data.synthetic.common import COLOURS, SHAPES, Scene, canvas, draw_answer, draw_shape, pick, plural, seen


class Family:
    """A task family: ``scene`` decides the content, ``render`` draws it."""

    name = ""
    answers: tuple[str, ...] = ()  # the answer space; chance = 1 / len(answers) per question string
    answer_type = "int"
    knobs: dict[str, int] = {}  # difficulty knobs and their defaults

    def check_knobs(self, knobs: dict[str, int]) -> dict[str, int]:
        unknown = set(knobs) - set(self.knobs)
        if unknown:
            raise ValueError(f"task {self.name!r} has no knob {sorted(unknown)}; knobs: {self.knobs}")
        return {**self.knobs, **knobs}

    def scene(self, rng: np.random.Generator, **knobs: int) -> Scene:
        raise NotImplementedError

    def render(self, scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
        raise NotImplementedError


def _slots(rng: np.random.Generator, n: int, grid: int = 5) -> list[tuple[float, float]]:
    """n distinct cells of a grid x grid layout on the 448 canvas, with jitter: objects never overlap."""
    if n > grid * grid:
        raise ValueError(f"{n} objects do not fit a {grid}x{grid} layout")
    cell = 448 / grid
    chosen = rng.choice(grid * grid, size=n, replace=False)
    jitter = rng.uniform(-0.12, 0.12, size=(n, 2)) * cell
    return [((c % grid + 0.5) * cell + jx, (c // grid + 0.5) * cell + jy) for c, (jx, jy) in zip(chosen.tolist(), jitter)]


def _render_objects(scene: Scene, size: int) -> Image.Image:
    img, draw, s = canvas(size)
    for obj in scene.layout["objects"]:
        draw_shape(draw, obj["shape"], obj["x"] * s, obj["y"] * s, obj["r"] * s, COLOURS[obj["colour"]])
    return img


def _objects(rng: np.random.Generator, kinds: list[tuple[str, str]], grid: int = 5) -> list[dict]:
    order = rng.permutation(len(kinds))
    return [
        {"colour": kinds[i][0], "shape": kinds[i][1], "x": x, "y": y, "r": float(rng.uniform(22, 30))}
        for i, (x, y) in zip(order.tolist(), _slots(rng, len(kinds), grid))
    ]


class ObjectFamily(Family):
    """Families whose scene is a list of coloured shapes."""

    def render(self, scene, size, rng):
        return _render_objects(scene, size)


class Count(ObjectFamily):
    name = "count"
    answers = tuple(str(k) for k in range(6))  # 0..5
    knobs = {"max_distractors": 8, "shortcut": 0, "explain": 0}

    def scene(self, rng, **knobs):
        k = self.check_knobs(knobs)
        colour, shape = pick(rng, COLOURS), pick(rng, SHAPES)
        count, cued = draw_answer(rng, self.answers, f"count {colour} {shape}", k["shortcut"])
        count = int(count)
        # distractors share the colour or the shape half of the time: counting needs both attributes
        others = [(c, sh) for c in COLOURS for sh in SHAPES if (c, sh) != (colour, shape)]
        n_other = int(rng.integers(2, k["max_distractors"] + 1))
        kinds = [(colour, shape)] * count + [pick(rng, others) for _ in range(n_other)]
        facts = {f"{colour} {plural(shape)}": count}
        return Scene(
            question=f"How many {colour} {plural(shape)} are there in the image?",
            answer=str(count), answer_type="int", facts=facts,
            reasoning=f"{seen(facts)} {self._explained(colour, shape, count) if k['explain'] else ''}The answer is {count}.",
            layout={"objects": _objects(rng, kinds)}, cued=cued,
        )

    @staticmethod
    def _explained(colour: str, shape: str, count: int) -> str:
        tally = ", ".join(str(i) for i in range(1, count + 1)) or "none"
        return (f"Only {colour} {plural(shape)} count: an object of another colour or another shape is a distractor. "
                f"Counting the {colour} {plural(shape)} one by one: {tally}. ")


class CountSubtract(ObjectFamily):
    name = "count_subtract"
    answers = tuple(str(k) for k in range(1, 7))  # 1..6 objects left
    knobs = {"max_removed": 4, "shortcut": 0, "explain": 0}

    def scene(self, rng, **knobs):
        k = self.check_knobs(knobs)
        colour = pick(rng, COLOURS)
        left, cued = draw_answer(rng, self.answers, f"count_subtract {colour}", k["shortcut"])
        left = int(left)
        removed = int(rng.integers(1, k["max_removed"] + 1))
        other_colours = [c for c in COLOURS if c != colour]
        kinds = [(colour, pick(rng, SHAPES)) for _ in range(removed)]
        kinds += [(pick(rng, other_colours), pick(rng, SHAPES)) for _ in range(left)]
        total = removed + left
        facts = {"objects": total, f"{colour} objects": removed}
        return Scene(
            question=f"Remove all {colour} objects. How many objects are left?",
            answer=str(left), answer_type="int", facts=facts,
            reasoning=(f"{seen(facts)} Removing every {colour} object leaves the objects of the other colours, so the "
                       f"count left is the total minus the {colour} ones: {total}-{removed}={left}. Check: "
                       f"{left}+{removed}={total}. The answer is {left}." if k["explain"] else f"{seen(facts)} {total}-{removed}={left}."),
            layout={"objects": _objects(rng, kinds)}, cued=cued,
        )



class Closest(ObjectFamily):
    """Relation question: the colour of the object nearest to the only star / circle / ... in the scene."""

    name = "closest"
    answers = tuple(COLOURS)
    answer_type = "word"
    knobs = {"objects": 5, "shortcut": 0, "explain": 0}

    def scene(self, rng, **knobs):
        k = self.check_knobs(knobs)
        anchor_shape = pick(rng, SHAPES)
        answer, cued = draw_answer(rng, self.answers, f"closest {anchor_shape}", k["shortcut"])
        other_shapes = [sh for sh in SHAPES if sh != anchor_shape]
        for _ in range(1000):  # rejection sampling; each try succeeds with high probability
            objs = self._place(rng, anchor_shape, answer, other_shapes, k["objects"])
            if objs is not None:
                break
        else:  # pragma: no cover - needs an astronomically unlikely run of rejections
            raise RuntimeError("could not place a 'closest' scene")
        target = objs[1]
        facts = {f"closest to the {anchor_shape}": f"{target['colour']} {target['shape']}"}
        return Scene(
            question=f"What colour is the object closest to the {anchor_shape}?",
            answer=answer, answer_type="word", facts=facts,
            reasoning=(f"{seen(facts)} The {anchor_shape} is the anchor, and every other object is further from it than "
                       f"the {target['colour']} {target['shape']}, so the nearest object is the {target['colour']} "
                       f"{target['shape']}, and its colour is the answer. The answer is {answer}." if k["explain"]
                       else f"{seen(facts)} The answer is {answer}."),
            layout={"objects": objs}, vocabulary=tuple(COLOURS), cued=cued,
        )

    @staticmethod
    def _place(rng, anchor_shape, answer, other_shapes, n):
        margin, r = 40.0, 26.0
        ax, ay = rng.uniform(margin, 448 - margin, size=2)
        near = rng.uniform(70, 120)
        angle = rng.uniform(0, 2 * math.pi)
        tx, ty = ax + near * math.cos(angle), ay + near * math.sin(angle)
        if not (margin <= tx <= 448 - margin and margin <= ty <= 448 - margin):
            return None
        objs = [
            {"colour": pick(rng, COLOURS), "shape": anchor_shape, "x": ax, "y": ay, "r": r},
            {"colour": answer, "shape": pick(rng, other_shapes), "x": tx, "y": ty, "r": r},
        ]
        while len(objs) < n:
            x, y = rng.uniform(margin, 448 - margin, size=2)
            far_enough = math.dist((x, y), (ax, ay)) > 1.35 * near
            apart = all(math.dist((x, y), (o["x"], o["y"])) > 2.3 * r for o in objs)
            if not (far_enough and apart):
                if rng.random() < 0.02:  # give up on crowded layouts and redraw the whole scene
                    return None
                continue
            objs.append({"colour": pick(rng, COLOURS), "shape": pick(rng, other_shapes), "x": x, "y": y, "r": r})
        return objs
