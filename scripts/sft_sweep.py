"""Run several `papo sft` configurations side by side on one GPU and pick a warm-start for the embedded default.

Tiny models leave a GPU mostly idle, so the runs share it. The criterion for the embedded default: room for
RL (sampled accuracy at T=1 inside [0.2, 0.8]) on as many families as possible, the answer format followed
most of the time, then the highest mean accuracy.

    python scripts/sft_sweep.py --out /tmp/sweep --runs tiny:600 tiny:1500 small:600 small:1500
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path


def score(result: dict) -> tuple:
    sampled = result["heldout"]["sampled_t1"]
    in_band = sum(0.2 <= acc <= 0.8 for acc in sampled["per_task"].values())
    return (in_band, sampled["format_rate"] >= 0.8, sampled["avg_at_k"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", nargs="+", required=True, help="SIZE:STEPS[:LR]")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eval-per-task", type=int, default=50)
    ap.add_argument("--bring-back", type=int, default=2, help="tar this many best model dirs into --results")
    ap.add_argument("--results", default=None, help="where the summary and tars go (default: --out)")
    args = ap.parse_args()
    out, results_dir = Path(args.out), Path(args.results or args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for spec in args.runs:
        size, steps, *lr = spec.split(":")
        name = f"{size}-{steps}" + (f"-lr{lr[0]}" if lr else "")
        cmd = [sys.executable, "-m", "papo", "sft", "--model", size, "--steps", steps, "--batch-size", str(args.batch_size),
               "--eval-per-task", str(args.eval_per_task), "--out", str(out / name), "--device", args.device, *(["--lr", lr[0]] if lr else [])]
        log = (out / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**__import__("os").environ, "PAPO_SFT_WORKERS": str(args.workers)})
    summary = {}
    for name, proc in procs.items():
        code = proc.wait()
        result_file = out / name / "sft_result.json"
        summary[name] = json.loads(result_file.read_text()) if code == 0 and result_file.exists() else {"error": (out / f"{name}.log").read_text()[-3000:]}
    ranked = sorted((n for n in summary if "heldout" in summary[n]), key=lambda n: score(summary[n]), reverse=True)
    (results_dir / "sweep.json").write_text(json.dumps({"ranking": ranked, "runs": summary}, indent=1))
    for name in ranked[: args.bring_back]:
        with tarfile.open(results_dir / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(out / name, arcname=name)
    for name in ranked:
        s = summary[name]["heldout"]["sampled_t1"]
        print(name, f"avg {s['avg_at_k']:.2f} format {s['format_rate']:.2f}", {t: round(a, 2) for t, a in s["per_task"].items()})
    for name in summary:
        if "error" in summary[name]:
            print(name, "FAILED", summary[name]["error"][-800:])


if __name__ == "__main__":
    main()
