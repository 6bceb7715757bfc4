"""Held-out accuracy of a model on the synthetic suite's test split, per family (sampled at T=1, avg@k, and
greedy), written as JSON. Used to document the embedded default model. The sampling noise is keyed by
(``--noise-seed``, question, response), so a rerun gives the same figures.

    python scripts/heldout_default.py --per-task 100 --k 8 --out docs/models/default-model/heldout.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from papo.data.synthetic import FAMILIES, dataset_from_spec
from papo.models.policy import Policy
from papo.rollout.graded import generate_and_score, summarize
from papo.rollout.sampler import Sampler
from papo.rollout.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the embedded default model")
    ap.add_argument("--per-task", type=int, default=100)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    policy = Policy.from_pretrained(args.model)
    samples = list(dataset_from_spec(f"synthetic:{'+'.join(FAMILIES)}", split="test", n=args.per_task * len(FAMILIES), size=args.image_size))
    t0 = time.time()
    sampler = Sampler(policy)  # one engine (and its compiled graphs) for both passes
    sampled = summarize(generate_and_score(sampler, samples, SamplingParams(64, temperature=1.0), k=args.k,
                                           noise_seed=args.noise_seed), args.k)
    greedy = summarize(generate_and_score(sampler, samples, SamplingParams(64, greedy=True), k=1), 1)
    report = {"model": args.model or "default", "split": "test", "seed": 0, "noise_seed": args.noise_seed, "image_size": args.image_size,
              "per_task_n": args.per_task, "sampled_t1": sampled.to_dict(), "greedy": greedy.to_dict(),
              "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(report, indent=1))
    for task in sampled.per_task:
        print(f"{task:>15}  sampled avg@{args.k} {sampled.per_task[task]:.3f}  greedy {greedy.per_task[task]:.3f}")
    print(f"{'all':>15}  sampled avg@{args.k} {sampled.avg_at_k:.3f}  greedy {greedy.avg_at_k:.3f}  format {sampled.format_rate:.3f}")


if __name__ == "__main__":
    main()
