"""A decode step's projections at few rows: x @ W^T with the reduction dimension split across the GPU, in Triton.

At a few hundred rows or fewer a projection is bound by reading its weights. cuBLAS tiles such a product by its
output columns only, so a projection of a few MB occupies a fraction of the SMs and runs at a third of the
bandwidth (docs/rollout.md). Here the grid also splits K: every program reads one (BLOCK_N x K/splits) slice of
the weights and writes its fp32 partial products; the caller sums the ``splits`` partials in a fixed order.
Inside a compiled decode step that sum fuses into the norm, rope or residual add that reads the output, so the
split costs no kernel of its own, and the result does not depend on scheduling (no atomics): the same inputs
give the same bits, as keyed sampling needs.

``split_k_linear`` is a custom operator (``papo::split_k_linear``), so a compiled step holds it as one call.
Without Triton or off CUDA it computes the same partials with torch (tests run it under Triton's interpreter).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


class SplitK(NamedTuple):
    """One launch shape: rows per program, output columns per program, K per inner step, K splits, warps, stages."""

    block_m: int
    block_n: int
    block_k: int
    splits: int
    warps: int = 4
    stages: int = 4


def choose(m: int, n: int, k: int, sms: int) -> SplitK:
    """A launch shape for x (m, k) @ W^T (k -> n) on ``sms`` multiprocessors: enough (column block, split)
    programs to give every SM about two, whole K steps per split."""
    block_m = min(64, max(16, triton.next_power_of_2(m) if triton is not None else 16))
    block_n, block_k = 64, 128
    columns = -(-n // block_n)
    steps = k // block_k
    splits = max(1, min(steps, -(-2 * sms // columns)))
    return SplitK(block_m, block_n, block_k, splits)


def supported(x: Tensor, w: Tensor, block_k: int = 128) -> bool:
    """Can the kernel run this product? 16-bit CUDA tensors (or Triton's interpreter), K a multiple of block_k."""
    import os

    if triton is None or x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        return False
    if w.shape[1] % block_k or x.shape[-1] != w.shape[1]:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" or (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 0))


@torch.library.custom_op("papo::split_k_linear", mutates_args=())
def split_k_linear(x: Tensor, w: Tensor, block_m: int, block_n: int, block_k: int, splits: int, warps: int,
                   stages: int) -> Tensor:
    """x (m, k), w (n, k) -> (splits, m, n) fp32 partial products: their sum over dim 0, added in index order,
    is x @ w.T. K is cut into ``splits`` runs of whole ``block_k`` steps (the last may be shorter)."""
    m, k = x.shape
    n = w.shape[0]
    per_split = -(-(k // block_k) // splits) * block_k
    out = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    if triton is None or not (x.is_cuda or _interpreted()):
        for s in range(splits):
            lo, hi = s * per_split, min(k, (s + 1) * per_split)
            out[s] = x[:, lo:hi].float() @ w[:, lo:hi].float().T
        return out
    x, w = x.contiguous(), w.contiguous()
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)  # row blocks of one column block run together
    _split_k[grid](x, w, out, m, n, k, per_split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                   num_warps=warps, num_stages=stages)
    return out


@split_k_linear.register_fake
def _(x: Tensor, w: Tensor, block_m: int, block_n: int, block_k: int, splits: int, warps: int, stages: int) -> Tensor:
    return x.new_empty(splits, x.shape[0], w.shape[0], dtype=torch.float32)


def linear(x: Tensor, w: Tensor, shape: SplitK | None = None, sms: int | None = None) -> Tensor:
    """x (..., k) @ w.T in x's dtype, through the split-K kernel; the partials summed in order."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if shape is None:
        shape = choose(x2.shape[0], w.shape[0], w.shape[1], sms or _sm_count(x.device))
    return split_k_linear(x2, w, *shape).sum(0).to(x.dtype).reshape(*lead, w.shape[0])


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _split_k(X, W, OUT, M, N, K, per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One (row block, column block, split): x[rows, split] @ w[columns, split].T in fp32. K is a multiple of
        BLOCK_K, so the loads along K need no mask."""
        pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        lo = split * per_split
        hi = tl.minimum(K, lo + per_split)
        x_ptr = X + rows[:, None].to(tl.int64) * K + lo + ks[None, :]
        w_ptr = W + cols[:, None].to(tl.int64) * K + lo + ks[None, :]
        row_ok, col_ok = rows[:, None] < M, cols[:, None] < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for _ in range(lo, hi, BLOCK_K):
            x = tl.load(x_ptr, mask=row_ok, other=0.0)
            w = tl.load(w_ptr, mask=col_ok, other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
            x_ptr += BLOCK_K
            w_ptr += BLOCK_K
        out = OUT + split.to(tl.int64) * M * N + rows[:, None] * N + cols[None, :]
        tl.store(out, acc, mask=row_ok & (cols[None, :] < N))
