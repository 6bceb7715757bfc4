"""``DIR/report.md`` with PNG plots of a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PANELS = [
    ("reward", ["reward"], "mean reward"),
    ("accuracy", ["accuracy", "format"], "train accuracy / format"),
    ("kl_prcp", ["kl_prcp"], "KL_prcp (full || masked)"),
    ("entropy", ["entropy", "masked_entropy"], "entropy estimates"),
    ("clipfrac", ["pg_clipfrac_higher", "clipfrac_high", "clipfrac_low", "clipfrac_dual"], "clip fractions"),
    ("length", ["response_length"], "response length (tokens)"),
]


def plot_metrics(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    steps = [r["step"] for r in rows]
    for name, keys, title in PANELS:
        series = {k: [r.get(k) for r in rows] for k in keys if any(r.get(k) is not None for r in rows)}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for key, values in series.items():
            ys = [v if v is not None else float("nan") for v in values]
            line, = ax.plot(steps, ys, lw=0.8, alpha=0.35)
            # per-step values of small batches are noisy: overlay a trailing mean over 10 steps
            smooth = [sum(w) / len(w) for w in (ys[max(0, i - 9) : i + 1] for i in range(len(ys)))]
            ax.plot(steps, smooth, lw=1.6, color=line.get_color(), label=key)
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(out: Path, rows: list[dict[str, Any]], before: dict | None, after: dict | None,
                 config: dict[str, Any], warnings: list[str]) -> Path:
    plots = plot_metrics(rows, out / "plots") if rows else []
    lines = [f"# papo train report: {config.get('preset')}", ""]
    if before and after:
        lines += ["## Held-out accuracy before and after", "",
                  f"avg@{after['k']} at temperature {config['rollout']['temperature']} on {after['n']} test questions", "",
                  "| task | before | after | change |", "|---|---|---|---|"]
        for task in after.get("per_task", {}):
            b, a = before["per_task"].get(task, float("nan")), after["per_task"][task]
            lines.append(f"| {task} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
        lines.append(f"| **all** | {before['avg_at_k']:.3f} | {after['avg_at_k']:.3f} | {after['avg_at_k'] - before['avg_at_k']:+.3f} |")
        lines.append(f"| format | {before['format_rate']:.3f} | {after['format_rate']:.3f} | |")
        lines.append("")
    if rows:
        last = rows[-1]
        lines += ["## Last step", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in last.items() if k != "hacking_warning"]
        lines.append("")
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    lines += ["## Curves", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    lines += ["## Config", "", "```json", json.dumps(config, indent=1), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
