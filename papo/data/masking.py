"""Image corruption for PAPO's masked branch.

Official method (``random_patch_blackening``): split the decoded RGB image, at its original resolution and
before any resize, into ``cell x cell`` pixel cells starting at (0, 0) (the last row/column truncated at the
border), and set each cell to black (RGB 0) independently with probability ``ratio``. The image keeps its
size, so after the processor the masked image has exactly the token grid of the original.

Also here:
  * full blackening (ratio 1.0) and Gaussian-noise corruption (the page's other example corruption),
  * ``saliency_patch_blackening``: the hook for semantic / saliency-aware masks (most salient cells first),
  * the patch-aligned fast path: blacken rows of the processor's flattened ``pixel_values`` directly with the
    normalised black value. When image sides are multiples of patch * merge (28 for Qwen2.5-VL) and inside
    the processor's pixel bounds, the processor does not resize and this equals re-processing the masked image.
  * deterministic RNG keyed by (seed, sample id, draw index, image index), so a run's masks are reproducible
    (the official code uses numpy's unseeded global RNG).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from papo.data.images import resize_to_pixel_bounds, to_rgb
from papo.errors import UserError

MaskFn = Callable[[Image.Image, np.random.Generator], Image.Image]
STRATEGIES = ("random", "full", "noise")


# ---------------------------------------------------------------- RNG


def mask_rng(seed: int, sample_id: Any, draw: int = 0, image_index: int = 0, response: int | None = None) -> np.random.Generator:
    """A generator that depends only on (seed, sample id, draw index, image index), and on the rollout's index
    within its group when each rollout gets its own mask (``response``)."""
    digest = hashlib.blake2b(str(sample_id).encode("utf-8"), digest_size=16).digest()
    key = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    extra = [] if response is None else [int(response)]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *key, int(draw), int(image_index), *extra]))


# ---------------------------------------------------------------- pixel-space corruption


def draw_cell_mask(height: int, width: int, ratio: float, rng: np.random.Generator, cell: int = 14) -> np.ndarray:
    """(ceil(H / cell), ceil(W / cell)) bool grid, each cell True with probability ``ratio`` (row-major draws)."""
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"mask ratio must be in [0, 1], got {ratio}")
    if cell < 1:
        raise UserError(f"cell size must be >= 1, got {cell}")
    return rng.random((math.ceil(height / cell), math.ceil(width / cell))) < ratio


def apply_cell_mask(image: Image.Image, cell_mask: np.ndarray, cell: int = 14) -> Image.Image:
    """Blacken the cells of the RGB ``image`` where ``cell_mask`` (gh, gw) is True; same size out."""
    pixels = np.array(image.convert("RGB"))  # (H, W, 3) uint8
    h, w = pixels.shape[:2]
    if cell_mask.shape != (math.ceil(h / cell), math.ceil(w / cell)):
        raise ValueError(f"cell mask {cell_mask.shape} does not fit a {w}x{h} image with {cell}-px cells")
    pixel_mask = np.repeat(np.repeat(cell_mask, cell, axis=0), cell, axis=1)[:h, :w]
    pixels[pixel_mask] = 0
    return Image.fromarray(pixels)


def random_patch_blackening(
    image: Any, ratio: float = 0.6, rng: np.random.Generator | None = None, cell: int = 14
) -> Image.Image:
    """The official PAPO corruption; ``image`` may be anything ``to_rgb`` reads."""
    image = to_rgb(image)
    rng = rng if rng is not None else np.random.default_rng()
    return apply_cell_mask(image, draw_cell_mask(image.height, image.width, ratio, rng, cell), cell)


def blacken(image: Any) -> Image.Image:
    """Full blackening (ratio 1.0): the blank-image control."""
    return Image.new("RGB", to_rgb(image).size)


def gaussian_noise(image: Any, std: float = 0.6, rng: np.random.Generator | None = None) -> Image.Image:
    """Add N(0, std^2) noise to intensities scaled to [0, 1], then clip (the page shows std 0.6 and 0.8)."""
    rng = rng if rng is not None else np.random.default_rng()
    x = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    noisy = np.clip(x + rng.normal(0.0, std, size=x.shape), 0.0, 1.0)
    return Image.fromarray(np.round(noisy * 255.0).astype(np.uint8))


def saliency_patch_blackening(image: Any, saliency: np.ndarray, ratio: float = 0.6, cell: int = 14) -> Image.Image:
    """Semantic-aware masking hook: blacken the round(ratio * cells) cells with the highest mean ``saliency``
    (an (H, W) map from any saliency or segmentation model), most salient first."""
    image = to_rgb(image)
    if saliency.shape[:2] != (image.height, image.width):
        raise ValueError(f"saliency map {saliency.shape[:2]} does not match image size {(image.height, image.width)}")
    gh, gw = math.ceil(image.height / cell), math.ceil(image.width / cell)
    padded = np.full((gh * cell, gw * cell), np.nan)
    padded[: image.height, : image.width] = saliency
    cell_scores = np.nanmean(padded.reshape(gh, cell, gw, cell), axis=(1, 3))  # (gh, gw)
    n_masked = int(round(ratio * gh * gw))
    order = np.argsort(-cell_scores, axis=None, kind="stable")[:n_masked]
    cell_mask = np.zeros(gh * gw, dtype=bool)
    cell_mask[order] = True
    return apply_cell_mask(image, cell_mask.reshape(gh, gw), cell)


@dataclass(frozen=True)
class MaskingConfig:
    strategy: str = "random"  # random (official) | full | noise | a name passed to register_masking
    ratio: float = 0.6  # per-cell black probability (official 0.6)
    patch_size: int = 14  # cell size in original pixels (official 14; 16 suits Qwen3-VL / ViT-16 encoders)
    noise_std: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise UserError(f"masking ratio must be in [0, 1], got {self.ratio}")
        if self.patch_size < 1:
            raise UserError(f"masking patch_size must be >= 1, got {self.patch_size}")
        if self.strategy not in STRATEGIES and self.strategy not in _CUSTOM:
            known = ", ".join([*STRATEGIES, *_CUSTOM])
            raise UserError(f"unknown masking strategy {self.strategy!r}; known: {known}")


_CUSTOM: dict[str, MaskFn] = {}


def register_masking(name: str, fn: MaskFn) -> None:
    """Make ``fn(rgb_image, rng) -> same-size RGB image`` available as ``MaskingConfig(strategy=name)``."""
    if name in STRATEGIES:
        raise ValueError(f"{name!r} is a built-in masking strategy")
    _CUSTOM[name] = fn


def corrupt_image(image: Any, cfg: MaskingConfig, rng: np.random.Generator) -> Image.Image:
    image = to_rgb(image)
    if cfg.strategy == "random":
        out = random_patch_blackening(image, cfg.ratio, rng, cfg.patch_size)
    elif cfg.strategy == "full":
        out = blacken(image)
    elif cfg.strategy == "noise":
        out = gaussian_noise(image, cfg.noise_std, rng)
    else:
        out = to_rgb(_CUSTOM[cfg.strategy](image, rng), source=f"masking strategy {cfg.strategy!r}")
    if out.size != image.size:
        raise ValueError(f"masking strategy {cfg.strategy!r} changed the image size {image.size} -> {out.size}")
    return out


def corrupt_images(images: Sequence[Any], cfg: MaskingConfig, seed: int, sample_id: Any, draw: int = 0,
                   response: int | None = None) -> list[Image.Image]:
    """Masked copies of one prompt's images; each image gets its own independent, reproducible mask."""
    return [corrupt_image(im, cfg, mask_rng(seed, sample_id, draw, i, response)) for i, im in enumerate(images)]


# ---------------------------------------------------------------- patch-aligned fast path


@dataclass(frozen=True)
class PatchLayout:
    """How a Qwen2/2.5/3-VL style processor flattens an image into ``pixel_values`` rows."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    black: tuple[float, ...] = (0.0, 0.0, 0.0)  # per-channel value that RGB 0 becomes after normalisation

    @classmethod
    def from_image_processor(cls, proc: Any) -> PatchLayout:
        mean = np.broadcast_to(np.asarray(proc.image_mean if proc.do_normalize else 0.0, dtype=np.float64), (3,))
        std = np.broadcast_to(np.asarray(proc.image_std if proc.do_normalize else 1.0, dtype=np.float64), (3,))
        return cls(int(proc.patch_size), int(proc.temporal_patch_size), int(proc.merge_size), tuple((0.0 - mean) / std))

    @property
    def row_size(self) -> int:
        return len(self.black) * self.temporal_patch_size * self.patch_size**2

    def black_row(self, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:  # (C * T * P * P,)
        per_channel = torch.tensor(self.black, dtype=dtype, device=device)
        return per_channel.repeat_interleave(self.temporal_patch_size * self.patch_size**2)


def patch_rows(grid_t: int, grid_h: int, grid_w: int, merge: int) -> Tensor:
    """(grid_t, grid_h, grid_w) -> index of that ViT patch's row in the image's ``pixel_values`` block.

    Rows are ordered by merged 2x2 block (row-major), then row-major inside the block."""
    t = torch.arange(grid_t)[:, None, None]
    i = torch.arange(grid_h)[None, :, None]
    j = torch.arange(grid_w)[None, None, :]
    block = (i // merge) * (grid_w // merge) + (j // merge)
    return t * grid_h * grid_w + block * merge * merge + (i % merge) * merge + (j % merge)


def blacken_pixel_patches(
    pixel_values: Tensor,  # (sum_patches, C * T * P * P) flattened processor output
    image_grid_thw: Tensor,  # (n_images, 3)
    patch_masks: Sequence[np.ndarray | Tensor],  # per image, (grid_h, grid_w) bool: patches to blacken
    layout: PatchLayout,
) -> Tensor:  # same shape, a new tensor
    if pixel_values.shape[-1] != layout.row_size:
        raise ValueError(f"pixel_values rows have {pixel_values.shape[-1]} values, layout expects {layout.row_size}")
    if len(patch_masks) != len(image_grid_thw):
        raise ValueError(f"{len(patch_masks)} patch masks for {len(image_grid_thw)} images")
    rows = []
    offset = 0
    for (t, h, w), m in zip(image_grid_thw.tolist(), patch_masks):
        m = torch.as_tensor(np.asarray(m), dtype=torch.bool)
        if tuple(m.shape) != (h, w):
            raise ValueError(f"patch mask {tuple(m.shape)} does not match image grid {(h, w)}")
        idx = patch_rows(t, h, w, layout.merge_size)  # (t, h, w)
        rows.append(idx[:, m].reshape(-1) + offset)
        offset += t * h * w
    if offset != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw covers {offset} rows, pixel_values has {pixel_values.shape[0]}")
    out = pixel_values.clone()
    selected = torch.cat(rows).to(pixel_values.device) if rows else torch.zeros(0, dtype=torch.long)
    out[selected] = layout.black_row(pixel_values.dtype, pixel_values.device)
    return out


def random_mask_pixel_values(
    pixel_values: Tensor,  # (sum_patches, C * T * P * P)
    image_grid_thw: Tensor,  # (n_images, 3)
    ratio: float,
    rngs: Sequence[np.random.Generator],  # one per image, e.g. mask_rng(seed, sample_id, draw, i)
    layout: PatchLayout,
) -> Tensor:
    """Fast path of ``random_patch_blackening``: draws the same cell masks from the same generators (cell =
    ViT patch) and blackens ``pixel_values`` rows instead of re-running the processor."""
    masks = [
        draw_cell_mask(h * layout.patch_size, w * layout.patch_size, ratio, rng, layout.patch_size)
        for (_, h, w), rng in zip(image_grid_thw.tolist(), rngs)
    ]
    return blacken_pixel_patches(pixel_values, image_grid_thw, masks, layout)


def is_patch_aligned(image_size: tuple[int, int], grid_thw: Sequence[int], patch_size: int) -> bool:
    """True when the processor kept the image at its size (``image_size`` is PIL's (W, H)), so pixel-space
    cells of ``patch_size`` coincide with ViT patches and the fast path is exact."""
    width, height = image_size
    return int(grid_thw[1]) * patch_size == height and int(grid_thw[2]) * patch_size == width


def image_pair(sample: Any, masking: MaskingConfig, seed: int, draw: int = 0, min_pixels: int | None = None,
               max_pixels: int | None = None) -> tuple[list[Image.Image], list[Image.Image]]:
    """(full, masked) images of a ``Sample``. As in the official code, the mask is drawn on the decoded image at
    its original resolution and both copies then go through the same resize (PAPO's pixel bounds, None: keep
    the dataset's pixels), so their token grids match."""
    full, (masked,) = image_views(sample, masking, seed, draw, min_pixels, max_pixels)
    return full, masked


def image_views(sample: Any, masking: MaskingConfig, seed: int, draw: int = 0, min_pixels: int | None = None,
                max_pixels: int | None = None, responses: int = 0) -> tuple[list[Image.Image], list[list[Image.Image]]]:
    """The full images of a ``Sample`` and its masked copies: one set (``responses`` = 0, PAPO's one mask per
    prompt), or one set per rollout of its group, each with its own mask (VPPO)."""
    raw = sample.load_images(None, None)
    keys = [None] if responses == 0 else list(range(responses))
    masked = [corrupt_images(raw, masking, seed, sample.id, draw, response) for response in keys]
    if min_pixels is None and max_pixels is None:
        return raw, masked
    lo, hi = min_pixels or 1, max_pixels or 1 << 62
    return ([resize_to_pixel_bounds(im, lo, hi) for im in raw],
            [[resize_to_pixel_bounds(im, lo, hi) for im in view] for view in masked])
