"""Packed attention without flash-attn: for Qwen-VL vision towers, and for padding-free language-model passes.

Vision towers
-------------

A Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower attends within segments of one packed sequence (one
segment per image, or per window in Qwen2.5-VL's windowed layers). Without flash-attn, transformers runs one
SDPA call per segment: a batch of 64 images at 224 px makes ~800 kernel launches per vision forward, and on a
GPU the step is bound by those launches, not by arithmetic. Segments of equal length are contiguous runs of
the packed sequence, so here they are gathered into one (segments, heads, length, dim) batch and attended in
one SDPA call per distinct length (one call when all images share a size).

transformers hands the vision attention its segment boundaries (``cu_seq_lens_q``) only when the attention
implementation's name contains "flash", hence the registered name. It is set on the vision sub-config only:
the language model keeps its own implementation (SDPA by default).

Language models
---------------
``PACKED_TEXT_ATTENTION`` is SDPA for every ordinary call (same masks, same kernels). When a forward passes
``packed_seq_lens`` (a ``PackedSegments``, papo.models.packing: several sequences laid end to end in one row),
each sequence attends causally within itself: torch's variable-length flash kernel on CUDA, one SDPA call per
sequence elsewhere. With shared prompts each query segment attends to its own key segment, a prompt it shares
with other rows followed by itself, aligned at the end: query i of n attends to the first k - n + i + 1 of k
keys, the flash kernel's causal alignment.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.9
    varlen_attn = None

PACKED_VISION_ATTENTION = "papo_packed_flash_sdpa"
PACKED_TEXT_ATTENTION = "papo_packed_text_sdpa"


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


@functools.cache  # called in every layer of every packed forward
def _varlen_options(heads_q: int, heads_kv: int) -> dict[str, Any]:
    """varlen_attn's causal flag (``is_causal`` in older torch, ``window_size`` in newer) and its grouped-query
    flag, where the installed torch has one."""
    params = inspect.signature(varlen_attn).parameters
    out: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if heads_q != heads_kv and "enable_gqa" in params:
        out["enable_gqa"] = True
    return out


class PackedSegments:
    """Attention segments of one packed row: query segment i (``q_lengths[i]`` consecutive tokens) attends
    causally to key segment i. Without ``key_index`` each sequence is its own key segment; with it (papo.models.
    packing's shared prompts) key segment i is the ``k_lengths[i]`` tokens that ``key_index`` lists for it next.
    A plain object rather than a tuple of lists or a frozen dataclass: compiled blocks pass it through to the
    attention's graph break without reading its fields, so a pass with a new number of sequences does not
    recompile (dynamo guards the lists of a tuple, and on torch 2.11 those of a frozen dataclass, by length)."""

    __slots__ = ("q_lengths", "cu_q", "k_lengths", "cu_k", "key_index")

    def __init__(self, q_lengths: list[int], cu_q: Tensor, k_lengths: list[int], cu_k: Tensor,
                 key_index: Tensor | None = None):
        self.q_lengths = q_lengths
        self.cu_q = cu_q  # (S + 1,) int32 cumulative query lengths, on the device
        self.k_lengths = k_lengths
        self.cu_k = cu_k
        self.key_index = key_index  # (sum of k_lengths,) positions in the packed row, on the device

    @classmethod
    def sequences(cls, lengths: list[int], device: torch.device | str) -> PackedSegments:
        """Sequences laid end to end, each attending causally within itself."""
        cu = _cumulative(lengths, device)
        return cls(lengths, cu, lengths, cu)

    @classmethod
    def build(cls, q_lengths: list[int], k_lengths: list[int], key_index: Tensor) -> PackedSegments:
        device = key_index.device
        return cls(q_lengths, _cumulative(q_lengths, device), k_lengths, _cumulative(k_lengths, device), key_index)


def _cumulative(lengths: list[int], device: torch.device | str) -> Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


@torch.compiler.disable  # reads sequence lengths as Python ints: a compiled decoder layer breaks its graph here
def packed_text_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None,
                          packed_seq_lens: PackedSegments | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """SDPA, or, with ``packed_seq_lens``, causal attention of each query segment of query/key/value (1, H, T, D)
    to its key segment -> (1, T, H, D)."""
    if packed_seq_lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None:
        raise ValueError("packed sequences take no attention mask: each attends within itself")
    segments = packed_seq_lens
    shared = segments.key_index is not None
    q_lengths, k_lengths = segments.q_lengths, segments.k_lengths
    dropout = dropout if module.training else 0.0
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    if q.is_cuda and torch.is_autocast_enabled("cuda"):  # rotary embeddings leave float32 q/k: SDPA would cast too
        q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
    if shared:  # a prompt shared by several segments is read into each of their key segments (after the cast)
        k, v = (t.index_select(0, segments.key_index) for t in (k, v))
    if (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and varlen_attn is not None and dropout == 0.0
            and (not shared or varlen_aligns_causal_to_the_end(q.device))):
        options = _varlen_options(q.shape[1], k.shape[1])
        if k.shape[1] != q.shape[1] and "enable_gqa" not in options:  # as many key/value heads as queries
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        out = varlen_attn(q, k, v, segments.cu_q, segments.cu_k, max(q_lengths), max(k_lengths), scale=scaling,
                          **options)
        return out[None], None
    if shared:
        key, value = (t.transpose(0, 1)[None] for t in (k, v))  # (1, H_kv, sum of k_lengths, D)
        query = q.transpose(0, 1)[None]
    outs, q_at, k_at = [], 0, 0
    for n, m in zip(q_lengths, k_lengths):  # CPU (and CUDA in fp32): one causal SDPA call per segment
        mask = None if n == m else torch.ones(n, m, dtype=torch.bool, device=query.device).tril(m - n)
        outs.append(F.scaled_dot_product_attention(query[:, :, q_at : q_at + n], key[:, :, k_at : k_at + m],
                                                   value[:, :, k_at : k_at + m], attn_mask=mask, dropout_p=dropout,
                                                   is_causal=mask is None, scale=scaling, enable_gqa=True))
        q_at, k_at = q_at + n, k_at + m
    return torch.cat(outs, dim=2).transpose(1, 2), None


@functools.cache
def varlen_aligns_causal_to_the_end(device: torch.device) -> bool:
    """Whether ``varlen_attn``'s causal mask, for a segment with more keys than queries, lets query i of n see the
    first k - n + i + 1 keys (flash-attention 2's convention, which shared prompts need) rather than the first
    i + 1. Probed once per device: queries of zeros weigh their visible keys equally, so each output is the mean
    position of the keys it sees."""
    n, m = 8, 40
    q = torch.zeros(n, 1, 64, dtype=torch.bfloat16, device=device)
    k = torch.zeros(m, 1, 64, dtype=torch.bfloat16, device=device)
    v = torch.zeros(m, 1, 64, dtype=torch.bfloat16, device=device)
    v[:, 0, 0] = torch.arange(m, device=device, dtype=torch.bfloat16)
    cu_q, cu_k = (torch.tensor([0, x], dtype=torch.int32, device=device) for x in (n, m))
    seen = varlen_attn(q, k, v, cu_q, cu_k, n, m, **_varlen_options(1, 1))[:, 0, 0].float()
    ends = torch.arange(m - n, m, device=device, dtype=torch.float32)  # query i sees keys 0 .. m - n + i
    aligned = bool(torch.allclose(seen, ends / 2, atol=0.1))
    if not aligned:
        warnings.warn("torch's varlen_attn aligns causal masks at the start here: shared prompts attend through one "
                      "masked SDPA call per segment instead (slower, same result)", RuntimeWarning, stacklevel=2)
    return aligned


AttentionInterface.register(PACKED_TEXT_ATTENTION, packed_text_attention)
# Ordinary calls get SDPA's masks. A packed call gives only the three M-RoPE rows as positions (no text row), so
# transformers sees no packed sequences, and for a full-length call without a padding mask SDPA's own mask
# function returns None.
AttentionMaskInterface.register(PACKED_TEXT_ATTENTION, sdpa_mask)


def use_packed_text_attention(model: torch.nn.Module) -> bool:
    """Let the language model take packed (padding-free) forwards; True if switched. Left alone: models whose
    language model is not on SDPA (eager, flash-attn: the user chose them), models without M-RoPE indexing
    (papo.models.packing computes positions as ``get_rope_index`` does), and language models with layers other
    than full attention (sliding windows, recurrent layers would run across the packed sequences)."""
    if hasattr(model, "get_base_model"):  # peft: the image-text-to-text model is inside
        model = model.get_base_model()
    config = getattr(model.config, "text_config", None)
    base = getattr(model, "model", None)
    if config is None or base is None or not hasattr(base, "get_rope_index"):
        return False
    if getattr(config, "_attn_implementation", None) not in (None, "sdpa"):
        return False
    if set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return False
    model.set_attn_implementation({"text_config": PACKED_TEXT_ATTENTION})
    return True
