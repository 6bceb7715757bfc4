"""The top-p (nucleus) cutoff without a sort: a search over the probabilities' bit patterns.

transformers' TopPLogitsWarper drops the longest run of least likely tokens whose mass is at most 1 - top_p.
The same set is {p <= t} for the largest t with mass(p <= t) <= 1 - top_p (up to the order it picks inside a
run of exactly equal probabilities). Non-negative floats order like their int32 bit patterns, so t is found by
searching those: no sort and no cumsum, which Inductor cannot generate over a 151,936-token vocabulary, and
nothing that needs the host, so the search lives inside the engine's captured decode step.

* ``top_p_cutoff`` in torch: bisection, 31 masked sums over the vocabulary (any device);
* on CUDA, a Triton kernel, one thread block per row, tries 15 thresholds per pass over the row, 8 passes in
  all. With many rows the sampling head is bound by reading the (rows, vocabulary) probabilities, and the
  kernel reads them 9 times instead of 32 (docs/rollout.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BISECTION_STEPS = 31  # bit patterns of floats in [0, 1] span < 2^30: the bisection ends on the exact cutoff
KERNEL_PASSES = 8  # 16-way splits: 16^8 > 2^30
KERNEL_BLOCK = 1024


def top_p_cutoff(probs: Tensor, top_p: float) -> Tensor:
    """(b, V) probabilities -> (b,) the nucleus cutoff: tokens with p <= cutoff are dropped."""
    if triton is not None and probs.is_cuda:
        return _kernel_cutoff(probs, top_p)
    return bisection_cutoff(probs, top_p)


def bisection_cutoff(probs: Tensor, top_p: float) -> Tensor:
    budget = 1.0 - top_p
    lo = torch.zeros(probs.shape[0], dtype=torch.int32, device=probs.device)  # mass(p <= 0) = 0 <= budget
    hi = probs.amax(-1).view(torch.int32)  # mass(p <= max) = 1 > budget
    for _ in range(BISECTION_STEPS):
        mid = lo + (hi - lo) // 2
        below = torch.where(probs <= mid.view(torch.float32)[:, None], probs, 0.0).sum(-1)
        fits = below <= budget
        lo, hi = torch.where(fits, mid, lo), torch.where(fits, hi, mid)
    return lo.view(torch.float32)


@torch.compiler.disable  # a launch of its own inside the compiled sampling head (a graph break, not a retrace)
def _kernel_cutoff(probs: Tensor, top_p: float) -> Tensor:
    probs = probs.contiguous()
    out = torch.empty(probs.shape[0], dtype=torch.float32, device=probs.device)
    _search[(probs.shape[0],)](probs, out, probs.shape[1], probs.stride(0), 1.0 - top_p,
                               BLOCK=KERNEL_BLOCK, PASSES=KERNEL_PASSES, num_warps=8)
    return out


if triton is not None:

    @triton.jit
    def _search(P, OUT, V, stride, budget, BLOCK: tl.constexpr, PASSES: tl.constexpr):
        """One row: lo always fits (mass <= budget) and hi never does; each pass sums the mass below lo and 15
        thresholds between lo and hi, and keeps the last that fits and the first that does not."""
        base = P + tl.program_id(0) * stride
        lanes = tl.arange(0, 16)
        top = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            top = tl.maximum(top, tl.load(base + idx, mask=idx < V, other=0.0))
        hi = tl.max(top, 0).to(tl.int32, bitcast=True).to(tl.int64)
        lo = hi * 0
        for _ in tl.static_range(PASSES):
            probes = lo + (hi - lo) * lanes.to(tl.int64) // 16  # lane 0 is lo itself
            thresholds = probes.to(tl.int32).to(tl.float32, bitcast=True)
            mass = tl.zeros([16], tl.float32)
            for off in range(0, V, BLOCK):
                idx = off + tl.arange(0, BLOCK)
                p = tl.load(base + idx, mask=idx < V, other=0.0)
                mass += tl.sum(tl.where(p[:, None] <= thresholds[None, :], p[:, None], 0.0), 0)
            fits = tl.sum((mass <= budget).to(tl.int32), 0)  # mass grows with the threshold: a prefix fits
            new_lo = tl.sum(tl.where(lanes == fits - 1, probes, 0), 0)
            hi = tl.where(fits < 16, tl.sum(tl.where(lanes == fits, probes, 0), 0), hi)
            lo = new_lo
        tl.store(OUT + tl.program_id(0), lo.to(tl.int32).to(tl.float32, bitcast=True))
