"""The decode step's matrix multiplies against their weight-bandwidth bound, and what a compute-bound pass on a
second CUDA stream does to a decode-like graph. Qwen2.5-VL-3B's language-model shapes, bf16, one GPU.

    python benchmarks/decode_gemms.py --out /tmp/decode-gemms.json
    python benchmarks/decode_gemms.py --rows 128,160,192,256 --blas cublas,cublaslt --no-concurrency --out /tmp/g.json

* ``gemm``: each projection (q/k/v stacked, o, gate/up stacked, down, LM head) at M rows, as cuBLAS runs it
  inside a CUDA graph: 8 copies of a weight per graph (more than L2 holds, as 36 layers are), its time, and the
  weight bytes over the measured copy bandwidth (what a decode step cannot go below);
* ``split_k`` (``--split-k``): a split-K Triton kernel (below) over a grid of launch shapes for each projection and
  row count, timed like cuBLAS (alone, and with the sum of its partials as a kernel of its own: in a compiled
  step that sum fuses into the next kernel), its largest difference from cuBLAS, and the shape
  ``choose`` would pick;
* ``concurrency``: a decode-like graph (36 layers of those GEMMs at M rows, then the head) replayed on a
  high-priority stream, alone and while a scoring-like GEMM (16,384 tokens x 2,048 -> 22,016) runs back to back
  on a low-priority stream: each one's time alone and together.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the split-K sweep needs it; the cuBLAS tables do not
    triton = None

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import copy_bandwidth  # noqa: E402

H, INTERMEDIATE, VOCAB, LAYERS = 2048, 11008, 151936, 36  # Qwen2.5-VL-3B's language model
SHAPES = {"qkv": (H, 2560), "o": (H, H), "gate_up": (H, 2 * INTERMEDIATE), "down": (INTERMEDIATE, H), "head": (H, VOCAB)}


def graph_ms(fn, reps: int) -> tuple[float, torch.cuda.CUDAGraph]:
    """``fn`` captured ``reps`` times in one graph: milliseconds per call, and the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps, graph


def gemms(bandwidth: float, row_counts: tuple[int, ...] = (160, 64, 16, 2), blas: str = "cublas") -> list[dict]:
    """Each projection at each row count, with ``blas`` as torch's preferred BLAS library (restored after)."""
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(blas)
    rows = []
    for m in row_counts:
        for name, (k, n) in SHAPES.items():
            count = 1 if name == "head" else 8
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
            x = torch.randn(m, 1, k, device="cuda", dtype=torch.bfloat16)
            ms, _ = graph_ms(lambda: [F.linear(x, w) for w in weights], reps=10)
            us, bound_us = ms * 1e3 / count, n * k * 2 / bandwidth * 1e6
            row = {"M": m, "gemm": name, "blas": blas, "mb": round(n * k * 2 / 1e6, 1), "bound_us": round(bound_us, 2),
                   "cublas_us": round(us, 2), "cublas_of_bw": round(bound_us / us, 3)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    torch.backends.cuda.preferred_blas_library(before)
    return rows


# ---------------------------------------------------------------- the split-K kernel the sweep measures
# Measured and not used by papo (docs/rollout.md): cuBLAS tiles a decode projection by its output columns only,
# so a projection of a few MB occupies few SMs. This kernel also splits K across the grid; each program writes
# fp32 partial products and the caller sums the splits in order (no atomics: the same bits on every run).

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
    block_m, block_n, block_k = _rows_per_program(m), 64, 128
    columns = -(-n // block_n)
    steps = k // block_k
    splits = max(1, min(steps, -(-2 * sms // columns)))
    return SplitK(block_m, block_n, block_k, splits)


def _rows_per_program(m: int) -> int:
    """One row block for up to 64 rows (tl.dot's smallest M is 16), blocks of 64 beyond."""
    return min(64, max(16, triton.next_power_of_2(m)))


def split_k_linear(x: Tensor, w: Tensor, block_m: int, block_n: int, block_k: int, splits: int, warps: int,
                   stages: int) -> Tensor:
    """x (m, k), w (n, k) on CUDA -> (splits, m, n) fp32 partial products: their sum over dim 0, added in index
    order, is x @ w.T. K is cut into ``splits`` runs of whole ``block_k`` steps (the last may be shorter)."""
    m, k = x.shape
    n = w.shape[0]
    per_split = -(-(k // block_k) // splits) * block_k
    out = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)  # row blocks of one column block run together
    _split_k[grid](x, w, out, m, n, k, per_split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                   num_warps=warps, num_stages=stages)
    return out


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


def split_k_sweep(bandwidth: float, row_counts: tuple[int, ...]) -> list[dict]:
    """Every launch shape of the grid below for each projection and row count: the fastest, and ``choose``'s."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for m in row_counts:
        for name, (k, n) in SHAPES.items():
            if name == "head":
                continue
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(8)]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, weights[0]).float()
            cublas_ms, _ = graph_ms(lambda: [F.linear(x, w) for w in weights], reps=10)
            bound_us = n * k * 2 / bandwidth * 1e6
            block_ms = sorted({_rows_per_program(m)} | ({128} if m >= 128 else set()))
            shapes = [SplitK(bm, bn, bk, s, w, st) for bm in block_ms for bn in (32, 64, 128) for bk in (64, 128, 256)
                      for s in (1, 2, 4, 8, 16) for w, st in ((4, 3), (4, 5), (8, 4)) if s <= k // bk]
            chosen = choose(m, n, k, sms)
            if chosen not in shapes:
                shapes.append(chosen)
            timed = []
            for shape in shapes:
                try:
                    partials = split_k_linear(x, weights[0], *shape)
                except triton.runtime.errors.OutOfResources:  # too much shared memory for this GPU: not a candidate
                    continue
                err = float((partials.sum(0) - ref).abs().max())
                alone, _ = graph_ms(lambda: [split_k_linear(x, w, *shape) for w in weights], reps=10)
                summed, _ = graph_ms(lambda: [split_k_linear(x, w, *shape).sum(0).to(x.dtype) for w in weights], reps=10)
                timed.append((alone, summed, err, shape))
            best = min(timed, key=lambda t: t[0])
            best_summed = min(timed, key=lambda t: t[1])
            mine = next(t for t in timed if t[3] == chosen)
            us = lambda ms: round(ms * 1e3 / 8, 2)  # noqa: E731
            row = {"M": m, "gemm": name, "bound_us": round(bound_us, 2), "cublas_us": us(cublas_ms),
                   "best_us": us(best[0]), "best": best[3]._asdict(), "best_of_bw": round(bound_us / us(best[0]), 3),
                   "best_with_sum_us": us(best_summed[1]), "best_with_sum": best_summed[3]._asdict(),
                   "chosen_us": us(mine[0]), "chosen_with_sum_us": us(mine[1]), "chosen": chosen._asdict(),
                   "max_abs_diff": max(t[2] for t in timed), "reference_max_abs": float(ref.abs().max()),
                   "shapes_timed": len(timed)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def concurrency() -> list[dict]:
    bf16 = torch.bfloat16
    layers = [{n: torch.randn(s[1], s[0], device="cuda", dtype=bf16) * 0.02 for n, s in SHAPES.items() if n != "head"}
              for _ in range(LAYERS)]
    head = torch.randn(VOCAB, H, device="cuda", dtype=bf16) * 0.02
    a = torch.randn(16384, H, device="cuda", dtype=bf16)
    b = torch.randn(H, 2 * INTERMEDIATE, device="cuda", dtype=bf16)
    c = torch.empty(16384, 2 * INTERMEDIATE, device="cuda", dtype=bf16)
    high, low = torch.cuda.Stream(priority=-1), torch.cuda.Stream(priority=0)
    rows = []
    for m in (2, 16, 64, 160):
        x = torch.randn(m, 1, H, device="cuda", dtype=bf16)

        def step():
            h = x
            for w in layers:
                q = F.linear(h, w["qkv"])
                h = h + F.linear(q[..., :H], w["o"])
                gate, up = F.linear(h, w["gate_up"]).chunk(2, -1)
                h = h + F.linear(F.silu(gate) * up, w["down"])
            return F.linear(h, head)

        alone_ms, graph = graph_ms(step, reps=10)  # one replay = 10 steps
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        torch.cuda.synchronize()
        with torch.cuda.stream(low):
            events[0].record()
            for _ in range(40):
                torch.mm(a, b, out=c)
            events[1].record()
        events[1].synchronize()
        mm_alone = events[0].elapsed_time(events[1]) / 40
        count = max(1, int(200 * alone_ms / mm_alone))  # GEMMs for about as long as 20 replays take alone
        torch.cuda.synchronize()
        with torch.cuda.stream(low):
            events[0].record()
            for _ in range(count):
                torch.mm(a, b, out=c)
            events[1].record()
        with torch.cuda.stream(high):
            events[2].record()
            for _ in range(20):
                graph.replay()
            events[3].record()
        torch.cuda.synchronize()
        row = {"M": m, "decode_alone_ms": round(alone_ms, 3), "decode_with_scoring_ms": round(events[2].elapsed_time(events[3]) / 200, 3),
               "matmul_alone_ms": round(mm_alone, 3), "matmul_with_decode_ms": round(events[0].elapsed_time(events[1]) / count, 3),
               "matmuls": count, "overlap_window_ms": round(min(events[0].elapsed_time(events[1]), events[2].elapsed_time(events[3])), 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="160,64,16,2", help="M values of the GEMM table")
    ap.add_argument("--blas", default="cublas", help="torch's preferred BLAS libraries to compare: cublas, cublaslt")
    ap.add_argument("--no-concurrency", action="store_true")
    ap.add_argument("--split-k", action="store_true", help="also sweep the split-K kernel's launch shapes")
    ap.add_argument("--no-cublas", action="store_true", help="leave out the cuBLAS table")
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    row_counts = tuple(int(m) for m in args.rows.split(","))
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
           "gemm": [] if args.no_cublas else [row for blas in args.blas.split(",") for row in gemms(bandwidth, row_counts, blas)]}
    if args.split_k:
        out["split_k"] = split_k_sweep(bandwidth, row_counts)
    if not args.no_concurrency:
        out["concurrency"] = concurrency()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
