"""Packed attention for Qwen-VL vision towers, without flash-attn.

A Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower attends within segments of one packed sequence (one
segment per image, or per window in Qwen2.5-VL's windowed layers). Without flash-attn, transformers runs one
SDPA call per segment: a batch of 64 images at 224 px makes ~800 kernel launches per vision forward, and on a
GPU the step is bound by those launches, not by arithmetic. Segments of equal length are contiguous runs of
the packed sequence, so here they are gathered into one (segments, heads, length, dim) batch and attended in
one SDPA call per distinct length (one call when all images share a size).

transformers hands the vision attention its segment boundaries (``cu_seq_lens_q``) only when the attention
implementation's name contains "flash", hence the registered name. It is set on the vision sub-config only:
the language model keeps its own implementation (SDPA by default).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface

PACKED_VISION_ATTENTION = "papo_packed_flash_sdpa"


@torch.compiler.disable  # reads segment lengths as Python ints: compiled vision blocks break the graph here
def packed_vision_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None = None,
                            scaling: float | None = None, dropout: float = 0.0, cu_seq_lens_q: Tensor | None = None,
                            **kwargs: Any) -> tuple[Tensor, None]:
    """query/key/value (1, H, T, D) packed segments, boundaries ``cu_seq_lens_q`` (S + 1,) -> (1, T, H, D)."""
    if cu_seq_lens_q is None or attention_mask is not None or kwargs.get("is_causal"):
        raise ValueError(f"{PACKED_VISION_ATTENTION} is for vision towers (packed, bidirectional segments) only")
    _, heads, total, dim = query.shape
    bounds = cu_seq_lens_q.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    dropout = dropout if module.training else 0.0

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # (N, H, L, D) each
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)

    if len(set(lengths)) == 1:  # every segment the same length: a free reshape
        n, length = len(lengths), lengths[0]
        q, k, v = (t[0].view(heads, n, length, dim).transpose(0, 1) for t in (query, key, value))
        return attend(q, k, v).permute(0, 2, 1, 3).reshape(1, total, heads, dim), None

    out = query.new_empty(total, heads, dim)
    starts = torch.tensor(bounds[:-1], device=query.device)
    length_of = torch.tensor(lengths, device=query.device)
    for length in sorted(set(lengths)):
        idx = (starts[length_of == length][:, None] + torch.arange(length, device=query.device)).flatten()  # (N*L,)
        q, k, v = (t[0][:, idx].view(heads, -1, length, dim).transpose(0, 1) for t in (query, key, value))
        out = out.index_copy(0, idx, attend(q, k, v).permute(0, 2, 1, 3).reshape(-1, heads, dim))
    return out[None], None


AttentionInterface.register(PACKED_VISION_ATTENTION, packed_vision_attention)


def use_packed_vision_attention(model: torch.nn.Module) -> bool:
    """Switch a Qwen-VL-style vision tower from one SDPA call per segment to packed SDPA; True if switched.

    Left alone: models without a vision sub-config, and vision towers already on flash-attn or eager (eager is
    kept because users choose it to get attention weights)."""
    vision = getattr(model.config, "vision_config", None)
    if vision is None or getattr(vision, "_attn_implementation", None) not in (None, "sdpa"):
        return False
    if not any(type(m).__name__.endswith("VisionAttention") and "cu_seqlens" in _forward_args(m) for m in model.modules()):
        return False
    model.set_attn_implementation({"vision_config": PACKED_VISION_ATTENTION})
    return True


def _forward_args(module: torch.nn.Module) -> tuple[str, ...]:
    code = type(module).forward.__code__
    return code.co_varnames[: code.co_argcount]
