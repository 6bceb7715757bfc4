"""Decode attention over a static KV cache, split along the keys (flash-decoding), in Triton.

One new token per row attends to a contiguous run of cache slots ``[start, start + length)``: the row's prompt
without its left padding and its tokens so far. A finished row passes ``length = 0`` and reads nothing. The
query heads that share a KV head are one small matrix, so each key tile is read once for all of them.

Why a kernel of its own (measured in docs/rollout.md): SDPA's kernels give each (row, KV head) one thread
block that walks the whole cache, so with few rows most of the GPU idles (the rollout's tail), and they read
every slot up to a span fixed when the step is captured, so a captured step exists per span. Here the grid
also splits the keys, the lengths are read on the device (one captured step serves every length), and
finished rows cost nothing. A second kernel combines the splits with their log-sum-exps.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine uses SDPA
    triton = None

BLOCK_N = 64  # keys per tile
MIN_KEYS_PER_SPLIT = 256  # below this a split's fixed cost outweighs its parallelism


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Should decode attention in ``dtype`` on ``device`` use the kernel? On CUDA: 16-bit caches on GPUs with
    bf16 tensor cores (fp32 stays on SDPA: Triton's fp32 dot products round through TF32). Under Triton's CPU
    interpreter (tests): always."""
    if triton is None:
        return False
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(device) >= (8, 0))


if triton is not None:

    @triton.jit
    def _split_attention(Q, K, V, START, LENGTH, OUT, LSE,
                         sq_b, sq_h, sq_g, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_s, so_g, sl_b, sl_h, sl_s,
                         scale, chunk,
                         KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
                         BLOCK: tl.constexpr):
        """One (row, KV head, split): softmax-weighted values of the split's keys for the G query heads, and
        their log-sum-exp (-inf, with zero output, when the split holds no keys)."""
        pid, split = tl.program_id(0), tl.program_id(1)
        row, head = pid // KV, pid % KV
        start, length = tl.load(START + row), tl.load(LENGTH + row)
        lo = split * chunk
        hi = tl.minimum(length, lo + chunk)
        g, d, n = tl.arange(0, G_PAD), tl.arange(0, D_PAD), tl.arange(0, BLOCK)
        d_ok = d[None, :] < D
        q = tl.load(Q + row * sq_b + head * sq_h + g[:, None] * sq_g + d[None, :], mask=(g[:, None] < G) & d_ok, other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        k_base, v_base = K + row * sk_b + head * sk_h, V + row * sv_b + head * sv_h
        for off in range(lo, hi, BLOCK):
            idx = off + n
            keep = idx < hi
            slots = (start + idx)[:, None]
            k = tl.load(k_base + slots * sk_n + d[None, :], mask=keep[:, None] & d_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale  # (G_PAD, BLOCK) fp32
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))  # finite: the tile holds at least one key
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(v_base + slots * sv_n + d[None, :], mask=keep[:, None] & d_ok, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        nonempty = total > 0
        out = tl.where(nonempty[:, None], acc / tl.where(nonempty, total, 1.0)[:, None], 0.0)
        lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, total, 1.0)), float("-inf"))
        tl.store(OUT + row * so_b + head * so_h + split * so_s + g[:, None] * so_g + d[None, :], out)
        tl.store(LSE + row * sl_b + head * sl_h + split * sl_s + g, lse)


    @triton.jit
    def _combine(PART, LSE, OUT, splits, sp_b, sp_h, sp_s, sp_g, sl_b, sl_h, sl_s, so_b, so_h, so_g,
                 KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr):
        """One (row, KV head): the splits' outputs weighted by exp(lse_split - lse_all), in the output dtype."""
        pid = tl.program_id(0)
        row, head = pid // KV, pid % KV
        g, d = tl.arange(0, G_PAD), tl.arange(0, D_PAD)
        lse_base, part_base = LSE + row * sl_b + head * sl_h, PART + row * sp_b + head * sp_h
        top = tl.full([G_PAD], float("-inf"), tl.float32)
        for s in range(0, splits):
            top = tl.maximum(top, tl.load(lse_base + s * sl_s + g))
        safe = tl.where(top == float("-inf"), 0.0, top)  # a finished row: every split empty, output 0
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for s in range(0, splits):
            w = tl.exp(tl.load(lse_base + s * sl_s + g) - safe)
            total += w
            acc += w[:, None] * tl.load(part_base + s * sp_s + g[:, None] * sp_g + d[None, :])
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(OUT + row * so_b + head * so_h + g[:, None] * so_g + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=(g[:, None] < G) & (d[None, :] < D))


def split_count(rows: int, kv_heads: int, cache_len: int, device: torch.device) -> int:
    """Key splits per (row, KV head): enough thread blocks to keep every SM busy with a few rows, none with
    fewer than ``MIN_KEYS_PER_SPLIT`` keys of a full cache."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = -(-4 * sms // (rows * kv_heads))
    return max(1, min(want, cache_len // MIN_KEYS_PER_SPLIT))


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, start: Tensor, length: Tensor, scale: float,
                     splits: int) -> Tensor:
    """q (b, kv_heads, group, hd): one token's query heads grouped by KV head; keys/values (≥b, kv_heads, L, hd),
    the cache; start/length (b,) int32: row r attends to slots [start_r, start_r + length_r) (0: none, output 0).
    ``splits``: key splits per (row, KV head), fixed per captured step (``split_count``). -> (b, kv_heads, group, hd)."""
    b, kv, group, hd = q.shape
    L = keys.shape[2]
    g_pad, d_pad = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(hd))
    chunk = triton.cdiv(triton.cdiv(L, splits), BLOCK_N) * BLOCK_N  # keys per split, whole tiles
    assert keys.stride(-1) == 1 and values.stride(-1) == 1, "the cache's head dimension must be contiguous"
    part = torch.empty(b, kv, splits, g_pad, d_pad, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, kv, splits, g_pad, dtype=torch.float32, device=q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    _split_attention[(b * kv, splits)](
        q, keys, values, start, length, part, lse,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), *part.stride()[:4], *lse.stride()[:3],
        scale, chunk, KV=kv, G=group, D=hd, G_PAD=g_pad, D_PAD=d_pad, BLOCK=BLOCK_N, num_warps=4, num_stages=2)
    out = torch.empty(b, kv, group, hd, dtype=q.dtype, device=q.device)
    _combine[(b * kv,)](part, lse, out, splits, *part.stride()[:4], *lse.stride()[:3], *out.stride()[:3],
                        KV=kv, G=group, D=hd, G_PAD=g_pad, D_PAD=d_pad, num_warps=4)
    return out
