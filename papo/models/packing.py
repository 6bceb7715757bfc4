"""Padding-free forwards: the sequences of a micro-batch laid end to end in one row.

A micro-batch of left-padded prompts and right-padded completions computes every padded position: with
responses from a few hundred tokens to the 2,048-token cap, a micro-batch of 4 runs about as long as its
longest row four times over. Packing keeps only the valid tokens of each sequence, in order, in one row of
``T`` tokens. The language model attends causally within each sequence (``packed_seq_lens``, read by
papo.models.attention's packed text attention), and every token keeps the 3-D M-RoPE position the padded batch
gives it: positions are computed on the padded batch (the model's own ``get_rope_index``, or for the
Qwen2-VL family ``papo.models.mrope``, equal to it) and then packed.
The vision tower sees the same images as before. A token's log-prob is therefore the padded
forward's, up to kernel rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from papo.models.attention import PACKED_TEXT_ATTENTION
from papo.models.inputs import is_per_token
from papo.models.mrope import rope_index


def can_pack(model: Any, inputs: dict[str, Tensor]) -> bool:
    """True if ``model`` (the image-text-to-text model, not a peft wrapper) takes packed forwards and ``inputs``
    carry what its M-RoPE positions are computed from. Without images or ``mm_token_type_ids`` transformers
    falls back to 1-D positions over the padded row; those inputs keep the padded forward, so as to get them."""
    config = getattr(model.config, "text_config", None)  # the packed attention is set only on models with get_rope_index
    return (getattr(config, "_attn_implementation", None) == PACKED_TEXT_ATTENTION
            and inputs.get("mm_token_type_ids") is not None
            and (inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None))


@dataclass
class Packed:
    inputs: dict[str, Any]  # keyword arguments of the backbone's forward: one row of T tokens
    index: Tensor  # (B, L) position in the packed row of each padded position, -1 for padding


def pack(model: Any, inputs: dict[str, Tensor]) -> Packed:
    """Pack prompt + completion ``inputs`` (append_completions' layout: (B, L) with an attention mask)."""
    ids, keep = inputs["input_ids"], inputs["attention_mask"].bool()
    b, length = ids.shape
    positions = rope_index(model, inputs)[0].to(ids.device)  # (3, B, L), as the padded forward computes them
    flat = keep.reshape(-1).nonzero().squeeze(-1)  # row-major: sequences stay in order, and so do their images
    lengths = keep.sum(-1)
    # the three M-RoPE rows only: with a leading text row transformers would detect packed sequences and build
    # a dense T x T block-diagonal mask that packed attention does not read
    packed_positions = positions.reshape(3, -1)[:, flat][:, None]  # (3, 1, T)
    cu = torch.zeros(b + 1, dtype=torch.int32, device=ids.device)
    cu[1:] = lengths.cumsum(0)
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if key == "attention_mask":
            continue
        image = key.startswith("pixel_values") or key.endswith("grid_thw")
        out[key] = value.reshape(-1)[flat][None] if not image and is_per_token(value, b, length) else value
    out.update(position_ids=packed_positions, packed_seq_lens=(cu, lengths.tolist()))  # no attention mask
    index = torch.full((b * length,), -1, dtype=torch.long, device=ids.device)
    index[flat] = torch.arange(flat.numel(), device=ids.device)
    return Packed(out, index.view(b, length))
