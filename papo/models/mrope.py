"""Qwen2-VL / Qwen2.5-VL position inputs computed on the host in a few vectorised ops.

transformers derives them with Python loops: ``get_rope_index`` walks every prompt (on the GPU, a host sync per
row; docs/rollout.md has the cost), and the vision tower rebuilds its window and rope indices image by image.
Both are pure functions of token types and image grids, so they are computed here on the CPU tensors the
processor returns, equal to transformers' own (tested): the positions feed transformers' rope tables, and the
vision indices go in as the tower's precomputed inputs (``image_position_ids``, ``image_cu_seqlens``, ...).

Images only: prompts with videos go through transformers' ``get_rope_index`` (``mrope_positions`` returns None).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

HOST_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")  # the layouts ``mrope_positions`` reproduces (tested)
_ROPE_INDEX_KEYS = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")


def rope_index(model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """A processor batch's 3-D rope positions (3, B, L) and deltas (B, 1), on the host: ``mrope_positions`` for
    the Qwen2-VL family, the model's own ``get_rope_index`` (on host copies) for other models and for prompts
    with videos. ``model``: the image-text-to-text model."""
    types = inputs.get("mm_token_type_ids")
    if types is None and "image_grid_thw" in inputs:
        raise ValueError("rope positions need mm_token_type_ids from the processor to place image tokens")
    got = None
    if model.config.model_type in HOST_MODEL_TYPES:
        types = torch.zeros_like(inputs["input_ids"]) if types is None else types
        grid = inputs.get("image_grid_thw")
        got = mrope_positions(types.cpu(), inputs["attention_mask"].cpu(), None if grid is None else grid.cpu(),
                              model.config.vision_config.spatial_merge_size)
    if got is None:
        got = model.model.get_rope_index(**{k: v.cpu() for k, v in inputs.items() if k in _ROPE_INDEX_KEYS})
    return got


def mrope_positions(token_types: Tensor, attention_mask: Tensor | None, image_grid_thw: Tensor | None,
                    spatial_merge_size: int) -> tuple[Tensor, Tensor] | None:
    """Qwen's 3-D rope positions (3, B, L) and deltas (B, 1) for prompts of text and images, as
    ``get_rope_index`` computes them; None when a prompt holds video tokens.

    Text tokens count up by one on all three axes. An image's tokens sit at (t, h, w) offsets from the position
    where the image starts, and the text after it resumes max(h, w) / merge past that start. Padding gets 0.
    ``token_types``: ``mm_token_type_ids`` (0 text, 1 image, 2 video), (B, L)."""
    if bool((token_types == 2).any()):
        return None
    B, L = token_types.shape
    valid = torch.ones_like(token_types, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    # work on each row's valid tokens packed to the front (the order transformers iterates them in)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # (B, L)
    n_valid = valid.sum(1)  # (B,)
    inside = torch.arange(L)[None] < n_valid[:, None]  # (B, L) packed slot holds a valid token
    image = (token_types.gather(1, order) == 1) & inside
    text = inside & ~image
    start = image & ~torch.nn.functional.pad(image[:, :-1], (1, 0), value=False)  # first token of each image run
    n_images = int(start.sum())
    grids = torch.zeros(0, 3, dtype=torch.long) if image_grid_thw is None else image_grid_thw.long().cpu()
    if n_images != len(grids):
        raise ValueError(f"{n_images} image token runs but {len(grids)} image grids")
    if not n_images:  # a stand-in grid keeps the gathers below in range; no token reads it
        grids = torch.tensor([[1, spatial_merge_size, spatial_merge_size]])
    t, h, w = grids[:, 0], grids[:, 1] // spatial_merge_size, grids[:, 2] // spatial_merge_size  # (I,) each

    col = torch.arange(L).expand(B, L)
    image_id = (start.flatten().cumsum(0) - 1).view(B, L).clamp(min=0)  # run index, row-major = grid order
    run_start = torch.where(start, col, torch.zeros_like(col)).cummax(1).values  # (B, L) column where the run began
    j = col - run_start  # index within the run
    rt, rh, rw = t[image_id], h[image_id], w[image_id]  # (B, L) the run's grid per token (garbage off images)
    run_len = rt * rh * rw
    if bool((start & (_run_lengths(image) != run_len)).any()):
        raise ValueError("an image token run does not match its image grid's size")

    # what the text after an image skips: max(h, w) merged patches, counted from the image's start
    advance = torch.where(image & (j == run_len - 1), torch.maximum(rh, rw), torch.zeros_like(rh))
    base = _exclusive_cumsum(text.long()) + _exclusive_cumsum(advance)  # (B, L) position where each token's run starts
    base = torch.where(image, base.gather(1, run_start), base)  # image tokens: the position at the image's start
    offsets = torch.stack([j // (rh * rw), (j // rw) % rh, j % rw]).where(image[None], torch.zeros(()))
    packed = (base[None] + offsets.long()) * inside[None]  # (3, B, L)

    positions = torch.zeros(3, B, L, dtype=torch.long)
    positions.scatter_(2, order[None].expand(3, B, L), packed)
    deltas = packed.amax(dim=(0, 2)) + 1 - n_valid
    return positions, deltas[:, None]


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return x.cumsum(1) - x


def _run_lengths(image: Tensor) -> Tensor:
    """(B, L): at each run's start, the number of consecutive image tokens from there."""
    B, L = image.shape
    end_after = ~torch.nn.functional.pad(image[:, 1:], (0, 1), value=False) & image  # last token of each run
    col = torch.arange(L).expand(B, L)
    next_end = torch.where(end_after, col, torch.full_like(col, L)).flip(1).cummin(1).values.flip(1)  # (B, L)
    return next_end - col + 1


class VisionInputs:
    """The vision tower's precomputed inputs for a batch of images, built once per distinct image grid.

    transformers' index helpers loop over images; here each distinct grid's indices come from those same
    helpers once, and a batch is tiled from them with offsets."""

    def __init__(self, visual: Any) -> None:
        # the tower's sizes, not the tower: a cache keyed weakly by the tower must not keep it alive
        self.config, self.merge = visual.config, int(visual.spatial_merge_size)
        self.windowed = hasattr(visual, "window_size") and hasattr(visual, "fullatt_block_indexes")
        self.window_size, self.patch_size = getattr(visual, "window_size", None), getattr(visual, "patch_size", None)
        self._cache: dict[tuple[int, int, int], tuple[Tensor, Tensor | None, Tensor | None]] = {}

    def _template(self, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor | None, Tensor | None]:
        from transformers.vision_utils import (
            get_vision_position_ids,
            get_vision_window_index,
        )

        if grid not in self._cache:
            g = torch.tensor([grid])
            window = cu_window = None
            if self.windowed:
                window, cu_window = get_vision_window_index(g, self.merge, self.window_size, self.patch_size)
            self._cache[grid] = (get_vision_position_ids(g, self.merge), window, cu_window)
        return self._cache[grid]

    def __call__(self, grid_thw: Tensor, device: Any, host_seqlens: bool = True) -> dict[str, Any]:
        """kwargs for ``get_image_features``: rope positions and window order on ``device``; segment
        boundaries on the host when ``host_seqlens`` (attention that reads them as Python ints)."""
        from transformers.vision_utils import get_vision_attention_seqlens

        grids = [tuple(int(x) for x in row) for row in grid_thw.tolist()]
        parts = [self._template(g) for g in grids]
        cu, _ = get_vision_attention_seqlens(grid_thw.cpu(), self.config)
        seq_device = "cpu" if host_seqlens else device
        out: dict[str, Any] = {
            "image_position_ids": torch.cat([p[0] for p in parts]).to(device, non_blocking=True),
            "image_cu_seqlens": cu.to(seq_device), "image_max_seqlen": int((cu[1:] - cu[:-1]).max()),
        }
        if self.windowed:
            windows, bounds, merged, patches = [], [torch.zeros(1, dtype=torch.int32)], 0, 0
            for (t, h, w), (_, window, cu_window) in zip(grids, parts):
                windows.append(window + merged)
                bounds.append(cu_window[1:] + patches)
                merged += t * h * w // self.merge**2
                patches += t * h * w
            cu_window = torch.cat(bounds).to(torch.int32)
            out.update(image_window_index=torch.cat(windows).to(device, non_blocking=True),
                       image_cu_window_seqlens=cu_window.to(seq_device),
                       image_max_window_seqlen=int((cu_window[1:] - cu_window[:-1]).max()))
        return out
