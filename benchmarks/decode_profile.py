"""Where a training rollout's time goes: papo.rollout at the training shape, against the memory-bandwidth bound.

    python benchmarks/decode_profile.py --out /tmp/decode-profile.json          # Qwen2.5-VL-3B, one GPU
    python benchmarks/decode_profile.py --smoke --out /tmp/decode-profile.json  # the embedded model, CPU

Three measurements, one process:
  * rollouts as ``Trainer.rollout`` runs them (the paper settings of ``train_step.py``: 32 prompts x 5, 2,048-token
    cap, T=1, top_p 0.99; the engine's cache and graphs released after each): wall time, prefill, decode, CUDA
    graphs captured and their host time, the decode time per active-row bucket, and the decode's bandwidth
    bound. The bound is what an ideal engine must read: the language-model weights once per step while any row
    runs, and at each step the KV cache of the rows still running, at their current length, over the measured
    device-to-device copy bandwidth;
  * one decode step replayed at fixed (rows, cache span): its time and its bound (weights + KV of every row);
  * the step's kernels (eager, its compiled parts compiled) under torch's profiler, by GPU time.
The first rollout compiles and is reported separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import byte_costs, copy_bandwidth, decode_bound_s, paper_trainer  # noqa: E402

SMOKE = ["rollout.n=2", "rollout.max_new_tokens=24", "trainer.micro_batch_size=2", "rollout.engine=papo"]


def rollouts(trainer, engine, prompts: int, count: int, bandwidth: float) -> list[dict]:
    weights, per_token = byte_costs(engine.model)
    engine.record_windows = True
    out = []
    for i in range(count):
        torch.cuda.synchronize()
        t = time.perf_counter()
        exp = trainer.rollout(trainer.stream.take(prompts))
        wall = time.perf_counter() - t
        timing = dict(engine.last_timing)
        lengths = exp.mask.sum(-1)
        bound = decode_bound_s(exp.prompt_tokens, lengths, weights, per_token, bandwidth)
        by_rows: dict[int, list[float]] = defaultdict(lambda: [0, 0.0])
        for _, steps, rows, ms in timing.pop("windows", []):
            by_rows[rows][0] += steps
            by_rows[rows][1] += ms
        row = {"rollout": i + 1, "wall_s": round(wall, 3), "prefill_s": round(timing["prefill_s"], 3),
               "decode_s": round(timing["decode_s"], 3), "decode_steps": timing["decode_steps"],
               "captures": timing["captures"], "capture_s": round(timing["capture_s"], 3),
               "decode_bound_s": round(bound, 3), "decode_of_bound": round(bound / timing["decode_s"], 3),
               "decode_of_bound_without_captures": round(bound / max(1e-9, timing["decode_s"] - timing["capture_s"]), 3),
               "rows": int(lengths.numel()), "mean_response": round(float(lengths.float().mean()), 1),
               "max_response": int(lengths.max()), "mean_prompt": round(float(exp.prompt_tokens.float().mean()), 1),
               "buckets": {rows: {"steps": s, "ms_per_step": round(ms / s, 3)} for rows, (s, ms) in sorted(by_rows.items(), reverse=True)}}
        print(json.dumps(row), flush=True)
        out.append(row)
    engine.record_windows = False
    return out


def replayed_steps(engine, params, shapes: list[tuple[int, int]], bandwidth: float, reps: int = 20) -> list[dict]:
    """One decode step at fixed (rows, span), captured and replayed ``reps`` times."""
    weights, per_token = byte_costs(engine.model)
    rows_max, span_max = max(b for b, _ in shapes), max(s for _, s in shapes)
    engine._allocate(rows_max, max(span_max, 2432), 8)  # the training cache: 2,048 new tokens after a 384-slot prompt
    buf = engine._buf
    buf.start.zero_()
    buf.limits.fill_(1 << 30)
    buf.done.zero_()
    buf.step.zero_()
    out = []
    for b, span in shapes:
        buf.prompt_len.fill_(span - 1)  # the step writes slot span - 1 and attends to slots [0, span)
        engine._run(b, params, span)  # capture
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            buf.done.zero_()  # a row that sampled an EOS would be skipped by the kernel from then on
            engine._run(b, params, span)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / reps
        bound_ms = (weights + per_token * b * span) / bandwidth * 1e3
        row = {"rows": b, "span": span, "ms_per_step": round(ms, 3), "bound_ms": round(bound_ms, 3),
               "of_bound": round(bound_ms / ms, 3)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def attention_variants(engine, shapes: list[tuple[int, int]], reps: int = 50) -> list[dict]:
    """Decode attention of one step (all layers) at (rows, span) in the training cache (2,048 new tokens after a
    384-slot prompt): the SDPA path (masked, over the first ``span`` slots) against papo's kernel (each row's
    ``span`` slots), and the largest difference between their outputs."""
    import torch.nn.functional as F

    from papo.rollout.decode_attention import decode_attention, split_count

    step, layers, L = engine.step, len(engine.step.weights), 2432
    rows = []
    for b, span in shapes:
        q = torch.randn(b, step.kv_heads, step.heads // step.kv_heads, step.head_dim, device="cuda", dtype=step.dtype)
        k, v = (torch.randn(b, step.kv_heads, L, step.head_dim, device="cuda", dtype=step.dtype) for _ in range(2))
        bias = torch.zeros(b, 1, 1, span, device="cuda", dtype=step.dtype)
        start = torch.zeros(b, dtype=torch.int32, device="cuda")
        length = torch.full((b,), span, dtype=torch.int32, device="cuda")
        splits = split_count(b, step.kv_heads, L, q.device)
        fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k[:, :, :span], v[:, :, :span], attn_mask=bias, scale=step.scaling),
               "kernel": lambda: decode_attention(q, k, v, start, length, step.scaling, splits)}
        row = {"rows": b, "span": span, "splits": splits,
               "max_abs_difference": float((fns["sdpa"]() - fns["kernel"]()).abs().max())}
        for name, fn in fns.items():
            torch.cuda.synchronize()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            row[f"{name}_ms_per_step"] = round(begin.elapsed_time(end) / reps * layers, 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def kernel_profile(engine, params, b: int, span: int, reps: int = 3) -> dict:
    """GPU time of one eager decode step (its compiled parts compiled), by kernel."""
    from torch.profiler import ProfilerActivity, profile

    engine._buf.prompt_len.fill_(span - 1)
    engine.step(b, params, span)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            engine.step(b, params, span)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    total = sum(e.self_device_time_total for e in events) / reps / 1e3
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:15]
    row = {"rows": b, "span": span, "kernel_ms_per_step": round(total, 3),
           "top": [{"kernel": e.key[:90], "ms_per_step": round(e.self_device_time_total / reps / 1e3, 3),
                    "calls_per_step": e.count // reps} for e in top]}
    print(json.dumps({k: row[k] for k in ("rows", "span", "kernel_ms_per_step")}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--rollouts", type=int, default=3, help="the first compiles")
    ap.add_argument("--shapes", default="160x1536,80x1536,16x2048,2x2048", help="rows x span of replayed steps")
    ap.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "papo-bench-models"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--gemm-autotune", action="store_true",
                    help="an experiment: compile the decode step with Inductor's GEMM autotuning (Triton templates "
                         "against cuBLAS, per shape)")
    args = ap.parse_args()
    trainer, device, _ = paper_trainer("3b", args.models_dir, args.smoke, "decode-profile", SMOKE)
    engine = trainer.sampler.engine
    if args.gemm_autotune:
        from papo.rollout import decode_step

        options = {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"}
        engine.step.qkv_fn = torch.compile(decode_step.decode_qkv, dynamic=False, options=options)
        engine.step.rest_fn = torch.compile(decode_step.decode_rest, dynamic=False, options=options)
        engine.step.head_fn = torch.compile(decode_step.decode_head, dynamic=False, options=options)
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                    "gemm_autotune": args.gemm_autotune,
                    "prompts": args.prompts, "samples_per_prompt": trainer.cfg.rollout.n,
                    "max_new_tokens": trainer.params.max_new_tokens}
    if device != "cuda":  # the CPU checks the script: no events, no graphs
        exp = trainer.rollout(trainer.stream.take(args.prompts))
        result["smoke"] = {"rows": exp.size, "timing": engine.last_timing}
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result["smoke"]))
        return
    bandwidth = copy_bandwidth()
    result["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    result["rollouts"] = rollouts(trainer, engine, args.prompts, args.rollouts, bandwidth)
    Path(args.out).write_text(json.dumps(result, indent=1))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    result["replayed_steps"] = replayed_steps(engine, trainer.params, shapes, bandwidth)
    Path(args.out).write_text(json.dumps(result, indent=1))
    result["attention"] = attention_variants(engine, shapes)
    Path(args.out).write_text(json.dumps(result, indent=1))
    result["kernels"] = [kernel_profile(engine, trainer.params, b, s) for b, s in (shapes[0], shapes[-1])]
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
