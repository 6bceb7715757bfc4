"""Contact sheets: each sample's image, its masked copy (PAPO's masked branch), question and answer."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw

from papo.data.masking import MaskingConfig, corrupt_images
from papo.data.sample import IMAGE_PLACEHOLDER, Sample
from papo.data.synthetic.common import font
from papo.errors import UserError

THUMB = 224
TEXT_LINES = 5


def contact_sheet(samples: Sequence[Sample], masking: MaskingConfig | None = MaskingConfig(), seed: int = 0,
                  columns: int = 4) -> Image.Image:
    """A grid of tiles: [image | masked image] above the question (wrapped) and the answer."""
    if not samples:
        raise UserError("no samples to preview")
    panels = 2 if masking is not None else 1
    tile_w, tile_h = panels * THUMB + 8, THUMB + 18 * (TEXT_LINES + 1) + 12
    rows = -(-len(samples) // columns)
    sheet = Image.new("RGB", (min(columns, len(samples)) * tile_w, rows * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    f = font(14)
    for k, sample in enumerate(samples):
        x, y = (k % columns) * tile_w, (k // columns) * tile_h
        images = sample.load_images(None, None)
        shown = images[:1] or [Image.new("RGB", (THUMB, THUMB), (200, 200, 200))]
        if masking is not None:
            shown += corrupt_images(images[:1], masking, seed, sample.id)[:1] or shown[:1]
        for p, im in enumerate(shown):
            sheet.paste(_thumb(im), (x + 4 + p * THUMB, y + 4))
        question = sample.prompt.replace(IMAGE_PLACEHOLDER, "").strip()
        lines = textwrap.wrap(f"[{sample.task or sample.id}] {question}", width=30 * panels)[:TEXT_LINES]
        for i, line in enumerate(lines + [f"answer: {sample.answer}"]):
            draw.text((x + 4, y + THUMB + 8 + 18 * i), line, fill=(20, 20, 20) if i < len(lines) else (180, 30, 30), font=f)
    return sheet


def _thumb(image: Image.Image) -> Image.Image:
    im = image.copy()
    im.thumbnail((THUMB, THUMB))
    tile = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    tile.paste(im, ((THUMB - im.width) // 2, (THUMB - im.height) // 2))
    return tile
