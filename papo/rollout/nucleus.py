"""The top-p (nucleus) cutoff without a sort: a search over the probabilities' bit patterns.

transformers' TopPLogitsWarper drops the longest run of least likely tokens whose mass is at most 1 - top_p.
The same set is {p <= t} for the largest t with mass(p <= t) <= 1 - top_p (up to the order it picks inside a
run of exactly equal probabilities). Non-negative floats order like their int32 bit patterns, so t is found by
searching those: no sort and no cumsum, which Inductor cannot generate over a 151,936-token vocabulary, and
nothing that needs the host, so the search lives inside the engine's captured decode step.

* ``bisection_cutoff`` in torch: 31 masked sums over the vocabulary (any device);
* on CUDA, Triton kernels try 15 thresholds per pass over the row, 8 passes in all, so the probabilities are
  read 9 times instead of 32. Each row is split into segments of ``SEGMENT`` tokens, one program each, so a
  few rows still spread over the GPU; every program of a pass replays the earlier passes' per-segment masses
  in the same order, so the search is deterministic and needs no atomics.

``top_p_cutoff`` is a custom operator (``papo::top_p_cutoff``): a compiled sampling head keeps it in its graph
instead of breaking there. Its ``searched`` rows limit the search to the rows that need it: the sampler asks
``in_nucleus`` first, one masked sum per row, and searches only the rows whose sample fell outside (about
1 - top_p of them).
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
SEGMENT = 8192  # tokens per program
BLOCK = 1024


NOT_SEARCHED = -1.0  # the cutoff returned for rows not searched: it drops nothing


@torch.library.custom_op("papo::top_p_cutoff", mutates_args=())
def top_p_cutoff(probs: Tensor, top_p: float, searched: Tensor | None = None) -> Tensor:
    """(b, V) float32 probabilities -> (b,) float32 nucleus cutoff: tokens with p <= cutoff are dropped.
    ``searched`` (b,) bool: search only these rows (None: all); the others get ``NOT_SEARCHED``."""
    if triton is not None and probs.is_cuda:
        return _kernel_cutoff(probs, top_p, searched)
    cutoff = bisection_cutoff(probs, top_p)
    return cutoff if searched is None else torch.where(searched, cutoff, NOT_SEARCHED)


@top_p_cutoff.register_fake
def _(probs: Tensor, top_p: float, searched: Tensor | None = None) -> Tensor:
    return probs.new_empty(probs.shape[0], dtype=torch.float32)


def mass_at_most(probs: Tensor, threshold: Tensor) -> Tensor:
    """(b, V), (b,) -> (b,): each row's probability mass of the tokens with p <= threshold."""
    return torch.where(probs <= threshold[:, None], probs, 0.0).sum(-1)


def in_nucleus(probs: Tensor, token: Tensor, top_p: float) -> Tensor:
    """(b, V) probabilities, (b,) tokens -> (b,) bool: does the nucleus keep the token? It does exactly when
    mass(p <= p_token) > 1 - top_p (the cutoff is the largest t with mass(p <= t) <= 1 - top_p), so one masked
    sum answers it without the cutoff. Computed as the bisection computes masses, so the two agree exactly on
    the CPU; against the CUDA kernels' summation order they can differ only where the mass rounds to the budget."""
    return mass_at_most(probs, probs.gather(-1, token[:, None])[:, 0]) > 1.0 - top_p


def bisection_cutoff(probs: Tensor, top_p: float) -> Tensor:
    budget = 1.0 - top_p
    lo = torch.zeros(probs.shape[0], dtype=torch.int32, device=probs.device)  # mass(p <= 0) = 0 <= budget
    hi = probs.amax(-1).view(torch.int32)  # mass(p <= max) = 1 > budget
    for _ in range(BISECTION_STEPS):
        mid = lo + (hi - lo) // 2
        fits = mass_at_most(probs, mid.view(torch.float32)) <= budget
        lo, hi = torch.where(fits, mid, lo), torch.where(fits, hi, mid)
    return lo.view(torch.float32)


def _kernel_cutoff(probs: Tensor, top_p: float, searched: Tensor | None = None) -> Tensor:
    probs = probs.contiguous()
    rows, vocab = probs.shape
    if searched is None:
        searched = torch.ones(rows, dtype=torch.bool, device=probs.device)
    segments = triton.cdiv(vocab, SEGMENT)
    maxes = torch.empty(rows, segments, dtype=torch.float32, device=probs.device)
    masses = torch.empty(KERNEL_PASSES, rows, segments, 16, dtype=torch.float32, device=probs.device)
    out = torch.empty(rows, dtype=torch.float32, device=probs.device)
    common = dict(SEGMENT=SEGMENT, BLOCK=BLOCK, SBLOCK=triton.next_power_of_2(segments), num_warps=8)
    searched = searched.contiguous()
    _segment_max[(rows, segments)](probs, searched, maxes, vocab, probs.stride(0), segments, SEGMENT=SEGMENT,
                                   BLOCK=BLOCK)
    for done in range(KERNEL_PASSES):
        _segment_mass[(rows, segments)](probs, searched, maxes, masses, vocab, probs.stride(0), segments, rows,
                                        1.0 - top_p, done, **common)
    _finish[(rows,)](searched, maxes, masses, out, segments, rows, 1.0 - top_p, NOT_SEARCHED, PASSES=KERNEL_PASSES,
                     SBLOCK=common["SBLOCK"])
    return out


if triton is not None:

    @triton.jit
    def _segment_max(P, SEARCHED, MAXES, V, stride, S, SEGMENT: tl.constexpr, BLOCK: tl.constexpr):
        row, seg = tl.program_id(0), tl.program_id(1)
        if tl.load(SEARCHED + row) != 0:  # a row not searched costs its programs nothing but their launch
            base = P + row.to(tl.int64) * stride
            top = tl.zeros([BLOCK], tl.float32)
            for off in range(0, SEGMENT, BLOCK):
                idx = seg * SEGMENT + off + tl.arange(0, BLOCK)
                top = tl.maximum(top, tl.load(base + idx, mask=idx < V, other=0.0))
            tl.store(MAXES + row * S + seg, tl.max(top, 0))

    @triton.jit
    def _bounds(MAXES, MASSES, row, S, rows, budget, done, SBLOCK: tl.constexpr):
        """(lo, hi) after ``done`` passes of one row, replayed from the stored per-segment masses: lo always
        fits (mass <= budget) and hi never does; each pass keeps the last probe that fits and the first that
        does not (mass grows with the threshold, so the probes that fit are a prefix)."""
        segs = tl.arange(0, SBLOCK)
        lanes = tl.arange(0, 16)
        top = tl.load(MAXES + row * S + segs, mask=segs < S, other=0.0)
        hi = tl.max(top, 0).to(tl.int32, bitcast=True).to(tl.int64)
        lo = hi * 0
        for q in range(done):
            probes = lo + (hi - lo) * lanes.to(tl.int64) // 16  # lane 0 is lo itself
            part = tl.load(MASSES + ((q * rows + row) * S + segs[:, None]) * 16 + lanes[None, :],
                           mask=(segs < S)[:, None], other=0.0)
            fits = tl.sum((tl.sum(part, 0) <= budget).to(tl.int32), 0)
            new_lo = tl.sum(tl.where(lanes == fits - 1, probes, 0), 0)
            hi = tl.where(fits < 16, tl.sum(tl.where(lanes == fits, probes, 0), 0), hi)
            lo = new_lo
        return lo, hi

    @triton.jit
    def _segment_mass(P, SEARCHED, MAXES, MASSES, V, stride, S, rows, budget, done, SEGMENT: tl.constexpr,
                      BLOCK: tl.constexpr, SBLOCK: tl.constexpr):
        """Pass ``done``: one segment's mass below each of the pass's 16 probes (of a searched row)."""
        row, seg = tl.program_id(0), tl.program_id(1)
        if tl.load(SEARCHED + row) != 0:
            lo, hi = _bounds(MAXES, MASSES, row, S, rows, budget, done, SBLOCK)
            lanes = tl.arange(0, 16)
            thresholds = (lo + (hi - lo) * lanes.to(tl.int64) // 16).to(tl.int32).to(tl.float32, bitcast=True)
            base = P + row.to(tl.int64) * stride
            mass = tl.zeros([16], tl.float32)
            for off in range(0, SEGMENT, BLOCK):
                idx = seg * SEGMENT + off + tl.arange(0, BLOCK)
                p = tl.load(base + idx, mask=idx < V, other=0.0)
                mass += tl.sum(tl.where(p[:, None] <= thresholds[None, :], p[:, None], 0.0), 0)
            tl.store(MASSES + ((done * rows + row) * S + seg) * 16 + lanes, mass)

    @triton.jit
    def _finish(SEARCHED, MAXES, MASSES, OUT, S, rows, budget, not_searched, PASSES: tl.constexpr,
                SBLOCK: tl.constexpr):
        row = tl.program_id(0)
        if tl.load(SEARCHED + row) != 0:
            lo, _ = _bounds(MAXES, MASSES, row, S, rows, budget, PASSES, SBLOCK)
            tl.store(OUT + row, lo.to(tl.int32).to(tl.float32, bitcast=True))
        else:
            tl.store(OUT + row, not_searched)
