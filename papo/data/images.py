"""Decoding and PAPO's resize rule, shared by masking, data loading and the model layer."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from papo.errors import UserError

# PAPO / EasyR1 training bounds: 256 * 28^2 and 1280 * 28^2 pixels
MIN_PIXELS = 200_704
MAX_PIXELS = 1_003_520
# refuse to decode more than this: an 8192 x 8192 RGB image is 200 MB, and a few hundred bytes of PNG can
# declare far more (PIL itself only warns below 179M pixels)
MAX_DECODE_PIXELS = 8192 * 8192


class ImageTooLarge(ValueError):
    pass


def to_rgb(image: Any, source: str = "image") -> Image.Image:
    """Decode ``image`` (PIL image of any mode, ``{"bytes", "path"}`` dict, raw bytes, a file path or an
    HxW / HxWxC uint8 array) to a fully loaded RGB PIL image. ``source`` names it in error messages."""
    if isinstance(image, dict):
        data, path = image.get("bytes"), image.get("path")
        if data:
            image = data
        elif path:
            image = path
        else:
            raise UserError(f"{source}: image dict has neither 'bytes' nor 'path'")
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(image)))
        elif isinstance(image, (str, Path)):
            if not Path(image).is_file():
                raise FileNotFoundError(f"{source}: image file not found: {image}")
            image = Image.open(image)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise TypeError(f"{source}: cannot read an image from {type(image).__name__}")
        if image.width * image.height > MAX_DECODE_PIXELS:
            raise ImageTooLarge(f"{source}: image too large ({image.width}x{image.height} is over {MAX_DECODE_PIXELS:,} pixels)")
        image.load()  # decode now: truncated or corrupt data fails here, not deep in a worker
    except (FileNotFoundError, ImageTooLarge):
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{source}: undecodable image ({err})") from err
    if image.width == 0 or image.height == 0:
        raise UserError(f"{source}: zero-size image {image.size}")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_to_pixel_bounds(image: Image.Image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """PAPO's ``process_image`` rule: scale down (keeping aspect) above ``max_pixels``, up below ``min_pixels``,
    with integer truncation of the new sides. Applied after masking, to full and masked image alike."""
    if min_pixels > max_pixels:
        raise UserError(f"min_pixels ({min_pixels}) exceeds max_pixels ({max_pixels})")
    for bound, too_far in ((max_pixels, lambda a: a > max_pixels), (min_pixels, lambda a: a < min_pixels)):
        area = image.width * image.height
        if too_far(area):
            factor = math.sqrt(bound / area)
            image = image.resize((max(1, int(image.width * factor)), max(1, int(image.height * factor))))
    return image
