"""Decode attention's key splits at few rows: one decode step's attention (36 layers of papo's Triton kernel,
Qwen2.5-VL-3B's 16 query heads over 2 KV heads, head dim 128) in a CUDA graph, with the splits per (row, KV
head) that ``split_count`` picks for each smallest split size, against the bytes of keys and values read.

    python benchmarks/decode_attention_splits.py --out /tmp/attention-splits.json

Every row attends to ``--span`` slots of a cache of 2,432 (2,048 new tokens after a 384-slot prompt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gemms import graph_ms  # noqa: E402
from train_step import copy_bandwidth  # noqa: E402

import papo.rollout.decode_attention as attention  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM, CACHE = 36, 16, 2, 128, 2432


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="2,8,16,32,64,160")
    ap.add_argument("--span", type=int, default=2048)
    ap.add_argument("--min-keys", default="64,128,256", help="smallest split sizes to try (MIN_KEYS_PER_SPLIT)")
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    default = attention.MIN_KEYS_PER_SPLIT
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "span": args.span,
           "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "default_min_keys": default, "rows": []}
    scale = HEAD_DIM ** -0.5
    for b in (int(r) for r in args.rows.split(",")):
        q = torch.randn(b, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        caches = [[torch.randn(b, KV_HEADS, CACHE, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
                  for _ in range(LAYERS)]  # a cache per layer, as in the engine: few rows' caches would fit in L2
        start = torch.zeros(b, dtype=torch.int32, device="cuda")
        length = torch.full((b,), args.span, dtype=torch.int32, device="cuda")
        kv_bytes = 2 * b * KV_HEADS * args.span * HEAD_DIM * 2 * LAYERS
        row = {"rows": b, "bound_ms": round(kv_bytes / bandwidth * 1e3, 3)}
        for min_keys in (int(m) for m in args.min_keys.split(",")):
            attention.MIN_KEYS_PER_SPLIT = min_keys
            splits = attention.split_count(b, KV_HEADS, CACHE, q.device)

            def step():
                for i in range(LAYERS):
                    k, v = caches[i]
                    attention.decode_attention(q, k, v, start, length, scale, splits)

            ms, _ = graph_ms(step, reps=5)
            row[f"min_keys_{min_keys}"] = {"splits": splits, "ms_per_step": round(ms, 3)}
        attention.MIN_KEYS_PER_SPLIT = default
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
