"""Training curves of the same run at two world sizes, side by side (docs/results/world-size-curves.png).

    python benchmarks/plot_world_sizes.py benchmarks/results/world-size-curves-h200.json --out docs/results/world-size-curves.png

The input holds each run's metrics rows under ``runs`` (label -> rows, as ``metrics.jsonl`` has them). With
keyed sampling noise the runs draw the same rollouts, so their curves differ only by reduction order and
bf16 rounding; the figure shows that, and prints the largest relative difference per metric.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = [("reward", "reward"), ("kl_prcp", "KL_prcp"), ("entropy", "entropy (full image)"),
           ("masked_entropy", "entropy (masked image)"), ("grad_norm", "gradient norm"), ("response_length", "response tokens")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(Path(args.data).read_text())["runs"]
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5))
    for ax, (key, title) in zip(axes.flat, METRICS):
        for (label, rows), style in zip(runs.items(), ("-o", "--x")):
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, ms=4, lw=1.2, label=label)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    (a, ra), (b, rb) = list(runs.items())[:2]
    for key, _ in METRICS:
        worst = max(abs(x[key] - y[key]) / max(abs(x[key]), 1e-12) for x, y in zip(ra, rb))
        print(f"{key}: largest relative difference {a} vs {b} over {len(ra)} steps: {worst:.2%}")


if __name__ == "__main__":
    main()
