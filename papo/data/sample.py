"""The one record type every dataset is turned into, and PAPO's prompt format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from papo.data.images import MAX_PIXELS, MIN_PIXELS, resize_to_pixel_bounds, to_rgb
from papo.errors import UserError

IMAGE_PLACEHOLDER = "<image>"
# examples/format_prompt/math_perception.jinja of the official code, appended after a blank line
PAPO_FORMAT_SUFFIX = (
    "You first think through the reasoning process as an internal monologue, enclosed within <think> </think> tags. "
    "Then, provide your final answer enclosed within \\boxed{}."
)
ANSWER_TYPES = ("math", "int", "choice", "multi_choice", "word", "exact")


@dataclass
class Sample:
    """One question. ``prompt`` holds one ``<image>`` per entry of ``images`` and no format suffix."""

    id: str
    prompt: str
    answer: str
    images: list[Any] = field(default_factory=list)  # anything papo.data.images.to_rgb reads: PIL, {bytes, path}, path
    answer_type: str = "math"  # which verifier grades it (papo.rewards); "math" = mathruler
    task: str = ""  # benchmark or synthetic family
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. solution (SFT target), facts (scene ground truth)

    def load_images(self, min_pixels: int | None = MIN_PIXELS, max_pixels: int | None = MAX_PIXELS) -> list[Image.Image]:
        """Decoded RGB images, resized into [min_pixels, max_pixels] by PAPO's rule (None: no resize)."""
        images = [to_rgb(im, source=f"sample {self.id} image {i}") for i, im in enumerate(self.images)]
        if min_pixels is None and max_pixels is None:
            return images
        return [resize_to_pixel_bounds(im, min_pixels or 1, max_pixels or 1 << 62) for im in images]

    def formatted_prompt(self, suffix: str | None = PAPO_FORMAT_SUFFIX) -> str:
        return format_prompt(self.prompt, suffix)


def format_prompt(prompt: str, suffix: str | None = PAPO_FORMAT_SUFFIX) -> str:
    """``prompt.strip()`` + blank line + suffix, as the official Jinja template renders it."""
    prompt = prompt.strip()
    return f"{prompt}\n\n{suffix}" if suffix else prompt


def strip_format_suffix(text: str, suffix: str = PAPO_FORMAT_SUFFIX) -> str:
    """Inverse of ``format_prompt`` for files that store the formatted prompt (PAPO-Eval's sharegpt)."""
    text = text.strip()
    return text[: -len(suffix)].rstrip() if text.endswith(suffix) else text


def chat_content(prompt: str, images: list[Any]) -> list[dict[str, Any]]:
    """Split ``prompt`` on ``<image>`` into a chat message's content list (EasyR1's ``_build_messages``)."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(images):
        raise UserError(f"{len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
    content: list[dict[str, Any]] = []
    for i, text in enumerate(parts):
        if i:
            content.append({"type": "image", "image": images[i - 1]})
        if text:
            content.append({"type": "text", "text": text})
    return content
