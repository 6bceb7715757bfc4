"""Reproduce PAPO's claims at small scale: many `papo train` runs at once on one GPU, then held-out evaluation.

    python experiments/reproduce.py --plan main --seeds 3 --steps 100 --jobs 6 --out experiments/runs
    python experiments/reproduce.py --plan ablations --seeds 3 --steps 200 --jobs 8 --out experiments/runs
    python experiments/reproduce.py --report-only --out experiments/runs     # tables and plots from finished runs

Each run is one `papo train` process from the same starting model (`--model`, default the embedded one)
with equal steps and rollouts per step; tiny models leave a GPU mostly idle, so `--jobs` of them share it.
Each finished run is then evaluated on the synthetic test split with `papo eval` (avg@k, perception gap with
masked images, perception/reasoning error breakdown). Results: `docs/results/reproduction.json` (one entry per
run) and `docs/RESULTS.md` (mean ± std over seeds per method, curves of reward and KL_prcp).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# (method name, preset, overrides): the paper's comparisons and ablations (docs/papo-algorithm claims, §3.2, §7, §8)
PLANS = {
    "main": [("GRPO", "grpo", []), ("PAPO-G", "papo_g", []), ("DAPO", "dapo", []), ("PAPO-D", "papo_d", [])],
    "ablations": (
        [(f"PAPO-G mask {r}", "papo_g", [f"algorithm.mask_ratio={r}"]) for r in (0.4, 0.8, 1.0)]
        + [(f"PAPO-G γ={g}", "papo_g", [f"algorithm.kl_prcp_coef={g}"]) for g in (0.01, 0.04, 0.08)]
        + [("PAPO-G γ=0.08 + double entropy", "papo_g", ["algorithm.kl_prcp_coef=0.08", "algorithm.entropy_coef=0.03",
                                                         "algorithm.masked_entropy_coef=0.03"])]
        + [("PAPO-G with-grad masked branch", "papo_g", ["algorithm.masked_grad=true"]),
           ("PAPO-G noise masking", "papo_g", ["algorithm.masking_strategy=noise"])]
    ),
}
TEST = "synthetic:all?split=test&size=224&n={n}"


def run_one(method: str, preset: str, overrides: list[str], seed: int, args: argparse.Namespace) -> dict:
    digest = hashlib.sha1(json.dumps([method, overrides]).encode()).hexdigest()[:8]
    run = Path(args.out) / f"{preset}-{digest}-s{seed}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "method.txt").write_text(method + "\n")
    # jobs share the CPU: without a per-job thread budget every process's BLAS/OpenMP pool claims every core
    # (a first 6-job H100 attempt ran ~30 s steps instead of ~1 s, all of it outside the GPU phases)
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    log_path = Path(args.out) / f"{run.name}.log"
    if not (run / "final" / "config.json").exists():
        if (run / "config.yaml").exists():  # interrupted: continue from its last checkpoint
            cmd = [sys.executable, "-m", "papo", "train", "--resume", str(run)]
        else:
            cmd = [sys.executable, "-m", "papo", "train", "--preset", preset, "--max-steps", str(args.steps),
                   "--device", args.device, "--out", str(run)] + (["--model", args.model] if args.model else [])
            for o in overrides + [f"trainer.seed={seed}", "trainer.eval_before_after=false", "trainer.report_to=[none]",
                                  f"trainer.save_every={max(1, args.steps // 4)}", "trainer.log_samples_every=0"]:
                cmd += ["--set", o]
        with open(log_path, "a") as log:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    ev = run / "eval"
    if not (ev / "summary.json").exists() and (run / "final" / "config.json").exists():
        cmd = [sys.executable, "-m", "papo", "eval", "--model", str(run / "final"), "--data", TEST.format(n=args.eval_n),
               "--k", str(args.eval_k), "--max-new-tokens", "48", "--mask-ratio", str(args.mask_ratio), "--device",
               args.device, "--out", str(ev)]
        with open(log_path, "a") as log:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return collect(run, method, preset, overrides, seed)


def collect(run: Path, method: str, preset: str, overrides: list[str], seed: int) -> dict:
    row = {"method": method, "preset": preset, "overrides": overrides, "seed": seed, "run": run.name}
    if (run / "config.yaml").exists():  # what actually ran
        import yaml

        row["config"] = yaml.safe_load((run / "config.yaml").read_text())["algorithm"]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    row["steps"] = len(metrics)
    if metrics:
        tail = metrics[-10:]
        row["final_train_reward"] = statistics.mean(m["reward"] for m in tail)
        row["final_kl_prcp"] = statistics.mean(m.get("kl_prcp") or 0.0 for m in tail)
        row["hacking_warnings"] = sum(bool(m.get("hacking_warning")) for m in metrics)
    summary = run / "eval" / "summary.json"
    if summary.exists():
        bench = next(iter(json.loads(summary.read_text())["benchmarks"].values()))
        row["heldout_avg_at_k"] = bench["avg_at_k"]
        row["heldout_per_task"] = bench.get("per_task", {})
        masked = next(iter(bench.get("masked", {}).values()), None)
        row["perception_gap"] = masked["perception_gap"] if masked else None
        row["perception_share_of_errors"] = bench.get("errors", {}).get("perception_share_of_errors")
    return row


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def report(rows: list[dict], out_md: Path, out_json: Path, runs: Path) -> None:
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"runs": rows}, indent=1))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | seeds | held-out avg@k (%) | perception gap (points) | perception share of errors (%) | final KL_prcp | hacking warnings |",
             "|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m and "heldout_avg_at_k" in r]
        if not rs:
            continue
        lines.append(f"| {m} | {len(rs)} | {_mean_std([r['heldout_avg_at_k'] for r in rs])} | "
                     f"{_mean_std([r['perception_gap'] for r in rs if r.get('perception_gap') is not None])} | "
                     f"{_mean_std([r['perception_share_of_errors'] for r in rs if r.get('perception_share_of_errors') is not None])} | "
                     f"{statistics.mean(r['final_kl_prcp'] for r in rs):.3f} | {sum(r['hacking_warnings'] for r in rs)} |")
    _plot(rows, runs, out_md.parent / "results")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    existing = out_md.read_text() if out_md.exists() else ""
    marker = "<!-- reproduce.py table -->"
    table = f"{marker}\n" + "\n".join(lines) + f"\n\n![reward](results/reward.png)\n![kl_prcp](results/kl_prcp.png)\n{marker}"
    if marker in existing:
        head, _, rest = existing.partition(marker)
        _, _, tail = rest.partition(marker)
        out_md.write_text(head + table + tail)
    else:
        out_md.write_text(existing + ("\n" if existing else "") + table + "\n")


def _plot(rows: list[dict], runs: Path, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for key in ("reward", "kl_prcp"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for method in dict.fromkeys(r["method"] for r in rows):
            curves = []
            for r in rows:
                path = runs / r["run"] / "metrics.jsonl"
                if r["method"] == method and path.exists():
                    curves.append([json.loads(x).get(key) or 0.0 for x in path.read_text().splitlines()])
            if curves:
                n = min(len(c) for c in curves)
                mean = [statistics.mean(c[i] for c in curves) for i in range(n)]
                w = max(1, n // 20)
                smooth = [statistics.mean(mean[max(0, i - w + 1): i + 1]) for i in range(n)]
                ax.plot(range(1, n + 1), smooth, label=method, lw=1.2)
        ax.set(xlabel="step", ylabel=key, title=f"{key} (mean over seeds, smoothed)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / f"{key}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", choices=[*PLANS, "all"], default="main")
    ap.add_argument("--methods", default=None, help="comma-separated method names of the plan to run (default: all)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=6, help="runs at once (they share the GPU)")
    ap.add_argument("--model", default=None, help="starting model (default: the embedded one)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eval-k", type=int, default=8)
    ap.add_argument("--eval-n", type=int, default=140)
    ap.add_argument("--mask-ratio", type=float, default=0.6, help="masked images for the perception gap")
    ap.add_argument("--out", default="experiments/runs")
    ap.add_argument("--results", default="docs/results/reproduction.json")
    ap.add_argument("--markdown", default="docs/RESULTS.md")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    plan = [x for name in (PLANS if args.plan == "all" else [args.plan]) for x in PLANS[name]]
    if args.methods:
        wanted = set(args.methods.split(","))
        plan = [x for x in plan if x[0] in wanted]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    jobs = [(m, p, o, s) for m, p, o in plan for s in range(args.seeds)]
    t0 = time.time()
    if args.report_only:
        rows = [collect(d, *_describe(d)) for d in sorted(Path(args.out).iterdir()) if (d / "config.yaml").exists()]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda j: run_one(*j, args), jobs))
    report(rows, Path(args.markdown), Path(args.results), Path(args.out))
    print(f"{len(rows)} runs in {time.time() - t0:.0f} s; wrote {args.results} and {args.markdown}")


def _describe(run: Path) -> tuple[str, str, list[str], int]:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    seed = cfg["trainer"]["seed"]
    name = (run / "method.txt").read_text().strip() if (run / "method.txt").exists() else cfg["preset"]
    return name, cfg["preset"], [], seed


if __name__ == "__main__":
    main()
