"""A batch's image features, computed once per distinct image, and the embeddings that carry them.

A prompt's G rollouts share its image (and its masked image, unless masks are drawn per response), so a scoring
or update pass over consecutive sequences holds each image about G times. Here the vision tower runs on every
distinct image once and its features are repeated for the rows that share it; in a backward pass the repeated
features' gradients add up, as they would over G separate copies. Which images are the same comes from the
encoding (``PromptBatch.image_ids``), never from comparing pixels.

For the Qwen2-VL family the tower runs on host-precomputed indices (``papo.models.mrope.VisionInputs``), as in
the rollout engine's prefill, and the language model receives the token embeddings with the features in place
(``inputs_embeds``): what transformers' forward computes from ``pixel_values``, up to kernel rounding.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from papo.models.attention import PACKED_VISION_ATTENTION
from papo.models.inputs import to_device
from papo.models.mrope import HOST_MODEL_TYPES, VisionInputs

_vision_inputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # vision tower -> its VisionInputs


def computes_image_features(model: Any) -> bool:
    """True if papo computes ``model``'s image features itself (an image-text-to-text model or its peft wrapper)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    base = getattr(model, "model", None)
    return model.config.model_type in HOST_MODEL_TYPES and hasattr(base, "get_image_features") and hasattr(base, "visual")


def distinct_images(image_ids: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """(the position of each distinct image's first occurrence, for every image the index of its distinct image)."""
    first: list[int] = []
    seen: dict[Hashable, int] = {}
    source = []
    for i, key in enumerate(image_ids):
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        source.append(seen[key])
    return first, source


def vision_inputs(visual: Any) -> VisionInputs:
    """The tower's precomputed-index builder, one per tower: it keeps the indices of every grid it has seen."""
    if visual not in _vision_inputs:
        _vision_inputs[visual] = VisionInputs(visual)
    return _vision_inputs[visual]


def reads_host_seqlens(config: Any) -> bool:
    """True if the vision attention reads its segment boundaries as Python ints (kept on the host)."""
    vision_attn = getattr(config.vision_config, "_attn_implementation", None)
    return vision_attn in (None, "sdpa", "eager", PACKED_VISION_ATTENTION)


def image_features(base: Any, pixel_values: Tensor, grid: Tensor, image_ids: Sequence[Hashable] | None = None) -> Tensor:
    """(image tokens, H) features of a batch's images in order, the tower run once per distinct image.
    ``base``: the model's backbone (``model.model``); ``pixel_values``: the processor's patches, on the device;
    ``grid``: (images, 3) ``image_grid_thw`` on the host; ``image_ids``: one key per image, equal for the same
    image (default: every image distinct)."""
    if image_ids is not None and len(image_ids) != len(grid):
        raise ValueError(f"{len(image_ids)} image ids for {len(grid)} images")
    first, source = distinct_images(range(len(grid)) if image_ids is None else image_ids)
    if len(first) < len(source):
        pixel_values, grid = select_images(pixel_values, grid, first)
    kwargs = vision_inputs(base.visual)(grid, pixel_values.device, host_seqlens=reads_host_seqlens(base.config))
    # the grid stays on the host: with every index precomputed it only sizes the per-image split
    features = base.get_image_features(pixel_values, grid, **kwargs).pooler_output
    return torch.cat(features if len(first) == len(source) else [features[s] for s in source])


def select_images(pixel_values: Tensor, grid: Tensor, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The patches and grid rows of the images ``indices``, in that order (``grid``: (images, 3) ``image_grid_thw``)."""
    patches = grid.prod(-1).cpu()
    starts = torch.cumsum(patches, 0) - patches
    rows = torch.cat([torch.arange(int(starts[i]), int(starts[i] + patches[i])) for i in indices])
    return pixel_values.index_select(0, to_device(rows, pixel_values.device)), grid[list(indices)]


def embed_with_images(base: Any, input_ids: Tensor, features: Tensor) -> Tensor:
    """Token embeddings (..., H) of ``input_ids`` with the image placeholders replaced by ``features`` in order."""
    embeds = base.get_input_embeddings()(input_ids)
    image = (input_ids == base.config.image_token_id)[..., None]  # the processor made one per feature row
    return embeds.masked_scatter(image, features.to(embeds.dtype))
