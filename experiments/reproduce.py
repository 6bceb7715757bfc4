"""Reproduce PAPO's claims at small scale: many `papo train` runs at once on one GPU, then held-out evaluation.

    nvidia-cuda-mps-control -d    # optional, recommended: the runs' kernels overlap (3.4x faster for 16 runs)
    python experiments/reproduce.py --plan main --seeds 4 --jobs 16 --budget-s 500 --model START --out experiments/runs/main
    python experiments/reproduce.py --plan ablations --seeds 3 --jobs 15 --steps 138 --model START --out experiments/runs/main
    python experiments/reproduce.py --plan perception --seeds 3 --jobs 18 --steps 138 --model START --out experiments/runs/later
    python experiments/reproduce.py --report-only --out experiments/runs/main     # tables and plots from finished runs
    python experiments/reproduce.py --combine a/reproduction.json b/reproduction.json --section S  # blocks of calls

Each run is one `papo train` process from the same starting model (`--model`, default the embedded one)
with equal steps and rollouts per step; tiny models leave a GPU mostly idle, so `--jobs` of them share it.
`--budget-s` sizes the step count from a measured probe instead of `--steps`; `--extend` continues the runs of
an earlier call (their directories kept) by as many steps as the new budget allows. Under a budget each run
also gets a time limit (`trainer.max_time_s`) that ends it at its last whole step before the evaluation
reserve, so a run slower than sized is still evaluated (at fewer steps, which the tables show). A SIGTERM or SIGUSR1 (from
`timeout`, a scheduler) stops the call cleanly: every run saves its last step, nothing is evaluated, and the
same command with `--extend` continues them; `--no-eval` leaves evaluation to a later call. Each finished run is then
evaluated on the synthetic test split with `papo eval` (avg@k, perception gap with masked images,
perception/reasoning error breakdown). Results: `docs/results/reproduction.json` (one entry per run) and
`docs/RESULTS.md` (mean ± std over seeds per method, curves of reward, KL_prcp and entropies).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from papo.rollout.graded import paired_change
from papo.training.loop import read_metrics
from papo.training.monitor import HackingMonitor

# (method name, preset, overrides): the paper's comparisons and ablations (docs/papo-algorithm claims, §3.2, §7, §8)
PLANS = {
    "main": [("GRPO", "grpo", []), ("PAPO-G", "papo_g", []), ("DAPO", "dapo", []), ("PAPO-D", "papo_d", [])],
    "ablations": (
        [(f"PAPO-G mask {r}", "papo_g", [f"algorithm.mask_ratio={r}"]) for r in (0.4, 0.8, 1.0)]
        + [(f"PAPO-G γ={g}", "papo_g", [f"algorithm.kl_prcp_coef={g}"]) for g in (0.01, 0.04, 0.08)]
        + [("PAPO-G + double entropy", "papo_g", ["algorithm.entropy_coef=0.03", "algorithm.masked_entropy_coef=0.03"])]
        # the paper's PAPO-G 7B setting (PAPO_H): γ = 0.02 with η = 0.05
        + [("PAPO-G + double entropy η=0.05", "papo_g", ["algorithm.entropy_coef=0.05",
                                                         "algorithm.masked_entropy_coef=0.05"])]
        + [("PAPO-G γ=0.08 + double entropy", "papo_g", ["algorithm.kl_prcp_coef=0.08", "algorithm.entropy_coef=0.03",
                                                         "algorithm.masked_entropy_coef=0.03"])]
        + [("PAPO-G with-grad masked branch", "papo_g", ["algorithm.masked_grad=true"]),
           ("PAPO-G with-grad masked branch + double entropy", "papo_g",
            ["algorithm.masked_grad=true", "algorithm.entropy_coef=0.03", "algorithm.masked_entropy_coef=0.03"]),
           ("PAPO-G noise masking", "papo_g", ["algorithm.masking_strategy=noise"])]
    ),
    # the perception-aware methods after PAPO (docs/algorithm.md), each beside the method it builds on: VPPO and
    # PGPO reshape DAPO's token advantages, DVRP and NoisyRollout change GRPO. NoisyRollout samples half of each
    # group from a noised image, so its groups need an even size: 6 rollouts (3 + 3) against the others' n
    "perception": [("DAPO", "dapo", []), ("VPPO", "vppo", []), ("PGPO", "pgpo", []), ("GRPO", "grpo", []),
                   ("DVRP", "dvrp", []), ("NoisyRollout", "noisy_rollout", ["rollout.n=6"])],
}
# what each method is compared with, seed by seed on the same held-out questions: the paper's pairs, every
# ablation of PAPO-G against PAPO-G at its defaults, and the later methods against the method they build on
BASELINES = {"PAPO-G": "GRPO", "PAPO-D": "DAPO", "VPPO": "DAPO", "PGPO": "DAPO", "DVRP": "GRPO", "NoisyRollout": "GRPO"}
TEST = "synthetic:all?split=test&size=224&n={n}"
START, START_METHOD = "start", "start (no RL)"  # evaluation of the starting model, which every method is compared with


_children: set[subprocess.Popen] = set()  # the papo processes running now
_stopped: list[int] = []  # the signal that asked this call to stop, once one has
finished: set[Path] = set()  # runs whose papo train ended well in this call (or earlier): final/ is current


def _on_stop(signum: int, frame: object) -> None:
    """Each `papo train` saves its last step and exits (a group signal from `timeout` reaches it anyway; a second
    SIGTERM changes nothing); the runs not yet started are not started."""
    _stopped[:] = _stopped or [signum]
    for child in list(_children):
        child.send_signal(signal.SIGTERM)


def run_dir(method: str, preset: str, overrides: list[str], seed: int, out: Path) -> Path:
    digest = hashlib.sha1(json.dumps([method, overrides]).encode()).hexdigest()[:8]
    return out / f"{preset}-{digest}-s{seed}"


def job_env(threads: int) -> dict[str, str]:
    # jobs share the CPU: without a per-job thread budget every process's BLAS/OpenMP pool claims every core
    # (a first 6-job H100 attempt ran ~30 s steps instead of ~1 s, all of it outside the GPU phases).
    # They also share GPU memory: expandable segments keep each process's cached-but-free blocks small
    # (18 runs at once on an 80 GB H100 ran out of memory in 4 runs without it)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}


def train(method: str, preset: str, overrides: list[str], seed: int, steps: int, args: argparse.Namespace) -> Path:
    """Train one run to `steps` steps: start it, or continue it from its last checkpoint (also past an
    earlier, smaller `steps`: the learning rate is constant after warm-up, so a run extended from a probe
    follows the same trajectory as one started with the larger count). A run whose `papo train` ended well is
    added to `finished`: its final/ is the model after its last step."""
    run = run_dir(method, preset, overrides, seed, Path(args.out))
    run.mkdir(parents=True, exist_ok=True)
    (run / "method.txt").write_text(method + "\n")
    if len(read_metrics(run / "metrics.jsonl")) >= steps and (run / "final" / "config.json").exists():
        finished.add(run)
        return run
    log = Path(args.out) / f"{run.name}.log"
    settings = [f"trainer.max_steps={steps}", f"trainer.save_every={max(1, steps // 2)}",
                f"trainer.log_samples_every={max(1, steps // 4)}"]
    fresh = [sys.executable, "-m", "papo", "train", "--preset", preset, "--device", args.device, "--out", str(run),
             *(["--model", args.model] if args.model else [])]
    fresh_settings = [*args.set, *overrides, f"trainer.seed={seed}", "trainer.eval_before_after=false", "trainer.report_to=[none]"]
    # a second attempt resumes a run that failed (out of memory while sharing the GPU, say)
    for attempt in range(2):
        if attempt and (not (run / "checkpoints").exists() or _stopped):
            break
        if (left := _time_left(args)) and left < MIN_TRAIN_S:  # a late wave or retry: no step would fit
            print(f"{run.name}: {left:.0f} s left before the evaluation reserve; not started", flush=True)
            break
        timed = [*settings, f"trainer.max_time_s={left}"]
        if (run / "config.yaml").exists():
            cmd = [sys.executable, "-m", "papo", "train", "--resume", str(run), *_sets(timed)]
        else:
            cmd = [*fresh, *_sets(fresh_settings + timed)]
        if _call(cmd, log, args) == 0:
            if read_metrics(run / "metrics.jsonl"):  # a time limit may end a fresh run before its first step
                finished.add(run)
            break
    return run


MIN_TRAIN_S = 60.0  # a run given less than this before the evaluation reserve is not started: load and one step


def _time_left(args: argparse.Namespace) -> float:
    """Seconds a run started now may train: to --budget-s less --eval-reserve-s, so that a run slower than sized
    (DAPO's steps grow) ends at its last whole step and is evaluated there; 0 (no limit) without a budget."""
    deadline = getattr(args, "train_deadline", None)
    return round(max(1.0, deadline - time.time()), 1) if deadline else 0


def _sets(settings: list[str]) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def evaluate(model: Path | str, ev: Path, log: Path, args: argparse.Namespace, steps: int | None = None) -> None:
    """Held-out avg@k on the test split, the perception gap at --mask-ratio and the error breakdown. `steps`: how
    far the run has trained; an evaluation of fewer steps (the run was extended since) moves to eval-step{N}."""
    done = ev / "trained_steps.txt"
    if steps is not None and done.exists() and (evaluated := int(done.read_text())) < steps:
        ev.rename(ev.parent / f"eval-step{evaluated}")
    if (ev / "summary.json").exists() or (isinstance(model, Path) and not (model / "config.json").exists()):
        return  # done already, or the run never finished
    t0 = time.time()
    _call([sys.executable, "-m", "papo", "eval", "--model", str(model), "--data", args.eval_data.format(n=args.eval_n),
           "--k", str(args.eval_k), "--max-new-tokens", str(args.eval_max_new_tokens), "--mask-ratio", str(args.mask_ratio), "--device",
           args.device, "--out", str(ev)], log, args)
    if (ev / "summary.json").exists():
        (ev / "eval_s.txt").write_text(f"{time.time() - t0:.1f}\n")
        if steps is not None:
            done.write_text(f"{steps}\n")


def _call(cmd: list[str], log_path: Path, args: argparse.Namespace) -> int | None:
    """The command's exit status (None: not started, this call is stopping)."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if _stopped:
        return None
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=job_env(threads), stdout=log, stderr=subprocess.STDOUT)
        _children.add(proc)
        if _stopped:  # the signal came while it started
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait()
        finally:
            _children.discard(proc)


def _waves(runs: int, jobs: int) -> int:
    """How many rounds of --jobs concurrent runs it takes to run them all."""
    return -(-runs // jobs)


def size_steps(jobs: list[tuple], args: argparse.Namespace, t0: float) -> dict:
    """Run every job for --probe-steps steps at the concurrency of the real runs, then size the step count so
    that training and evaluation fit in --budget-s (counted from the script's start)."""
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda j: train(*j, args.probe_steps, args), jobs))
    probe_wall = time.time() - t0
    if _stopped:
        _exit_stopped(runs, args.probe_steps)
    if any(len(read_metrics(run / "metrics.jsonl")) < 2 for run in runs):
        raise SystemExit(f"a probe run logged fewer than 2 steps; see the logs in {args.out}")
    waves = _waves(len(jobs), args.jobs)
    pace = measured_pace(runs, [0] * len(runs), probe_wall, waves)
    left = args.budget_s - probe_wall - args.eval_reserve_s - waves * pace["startup_s"]
    steps = max(args.probe_steps, int(left / (waves * pace["step_s"] * 1.1)))
    return {"steps": steps, **pace, "jobs": args.jobs, "runs": len(jobs), "probe_steps": args.probe_steps,
            "budget_s": args.budget_s}


PACE_WINDOW = 10  # the last steps whose median is a run's pace: DAPO's steps grow as fewer groups pass its filter


def measured_pace(runs: list[Path], steps_before: list[int], wall_s: float, waves: int) -> dict:
    """Step time and start-up as this call's runs showed them: each run's median over its last PACE_WINDOW steps
    here, not counting the first (which compiles and captures graphs), the slowest run's setting the pace (DAPO's
    steps grow as its filter needs more rounds, docs/RESULTS.md seventh run); start-up (process start, model
    load, first steps, saves) is the rest of a wave's wall time. Empty if no run trained two steps here."""
    trained = [[r["step_s"] for r in read_metrics(run / "metrics.jsonl")[n:][1:] if r.get("step_s")]
               for run, n in zip(runs, steps_before)]
    times = [statistics.median(t[-PACE_WINDOW:]) for t in trained if t]
    if not times:
        return {}
    startup_s = max(0.0, wall_s / waves - max(sum(t) for t in trained))
    return {"step_s": round(max(times), 3), "startup_s": round(startup_s, 1)}


def _exit_stopped(runs: list[Path], steps: int) -> None:
    done = sorted(len(read_metrics(run / "metrics.jsonl")) for run in runs)
    print(f"{signal.Signals(_stopped[0]).name} received: the runs stopped at steps {done[0]}–{done[-1]} of {steps}, "
          "each with its last step saved; nothing was evaluated. The same command with --extend continues them.",
          flush=True)
    sys.exit(128 + _stopped[0])


def extend_plan(plan: dict, n_jobs: int, args: argparse.Namespace, trained: list[int] | None = None) -> dict:
    """The step count for continuing an earlier call's runs: to --steps if given, else by as many steps as fit
    in --budget-s at the step time and start-up an earlier call measured (the runs keep their concurrency).
    `trained`: the steps each run has now; counted from the fewest (runs a stop signal cut short may stand at
    different steps, below the plan's), so that every run ends at the same step within the budget."""
    base = min(trained) if trained else plan["steps"]
    if args.budget_s is None:
        return {**plan, "steps": args.steps, "extended_from": base}
    if "step_s" not in plan:
        raise SystemExit("--extend with --budget-s needs the step time an earlier call measured, and its plan.json "
                         "has none: pass --extend --steps N instead")
    waves = _waves(n_jobs, args.jobs)
    left = args.budget_s - args.eval_reserve_s - waves * plan["startup_s"]
    more = max(0, int(left / (waves * plan["step_s"] * 1.1)))
    steps = max(base + more, max(trained) if trained else 0)
    return {**plan, "steps": steps, "extended_from": base, "budget_s": args.budget_s}


def collect(run: Path, method: str, preset: str, overrides: list[str], seed: int) -> dict:
    row = {"method": method, "preset": preset, "overrides": overrides, "seed": seed, "run": run.name}
    if (run / "config.yaml").exists():  # what actually ran
        import yaml

        row["config"] = yaml.safe_load((run / "config.yaml").read_text())["algorithm"]
    metrics = read_metrics(run / "metrics.jsonl")
    row["steps"] = len(metrics)
    if metrics:
        tail = metrics[-10:]
        row["first_train_reward"] = statistics.mean(m["reward"] for m in metrics[:10])
        row["final_train_reward"] = statistics.mean(m["reward"] for m in tail)
        for key in ("kl_prcp", "entropy", "masked_entropy"):
            row[f"final_{key}"] = statistics.mean(m.get(key) or 0.0 for m in tail)
        # GRPO and DAPO log KL_prcp only when asked; a non-finite value would make the maximum order-dependent
        kls = [m["kl_prcp"] for m in metrics if isinstance(m.get("kl_prcp"), (int, float)) and math.isfinite(m["kl_prcp"])]
        row["first_kl_prcp"], row["max_kl_prcp"] = metrics[0].get("kl_prcp"), max(kls) if kls else None
        # how much of a step carries signal (groups that all agree have no advantage) and what DAPO's filter
        # cost; the first and last 10 steps, from runs that log them
        for key in ("groups_all_correct", "groups_all_wrong", "filter_rounds", "accuracy_before_filter",
                    "response_clip_ratio"):
            if all(key in m for m in metrics):
                row[f"first_{key}"] = statistics.mean(m[key] for m in metrics[:10])
                row[f"final_{key}"] = statistics.mean(m[key] for m in tail)
        # replayed over the logged metrics, so runs logged by an older monitor are judged by the current one
        monitor = HackingMonitor()
        flagged = [m["step"] for m in metrics if monitor.observe(m)]
        row["hacking_warnings"] = len(flagged)
        row["first_hacking_warning_step"] = flagged[0] if flagged else None
        times = [m["step_s"] for m in metrics if m.get("step_s")]
        row["median_step_s"] = statistics.median(times) if times else None
    # held-out avg@k after each call of an extended run (earlier evaluations in eval-step{N})
    by_step = {int(ev.name.removeprefix("eval-step")): ev for ev in run.glob("eval-step*")}
    if (run / "eval" / "trained_steps.txt").exists():
        by_step[int((run / "eval" / "trained_steps.txt").read_text())] = run / "eval"
    curve = {n: _bench(ev)["avg_at_k"] for n, ev in sorted(by_step.items()) if (ev / "summary.json").exists()}
    if len(curve) > 1:
        row["heldout_by_steps"] = curve
    summary = run / "eval" / "summary.json"
    if summary.exists():
        bench = _bench(run / "eval")
        row["eval_k"] = bench["k"]
        row[f"heldout_avg_at_{bench['k']}"] = bench["avg_at_k"]
        row["heldout_per_task"] = bench.get("per_task", {})
        masked = next(iter(bench.get("masked", {}).values()), None)
        row["masked_avg_at_k"] = masked["avg_at_k"] if masked else None
        row["perception_gap"] = masked["perception_gap"] if masked else None
        if cued := bench.get("cued"):  # data with a language-prior shortcut: answers that follow the text
            row["cued_answer_share"], row["cued_truth_share"] = cued["answers"], cued["truth"]
        errors = bench.get("errors")
        if errors:
            row["perception_share_of_errors"] = errors["perception_share_of_errors"]
            row["error_rates"] = errors["shares"]  # per response: correct, lucky_guess, perception, reasoning, format
    return row


def baseline(method: str) -> str | None:
    return BASELINES.get(method) or ("PAPO-G" if method.startswith("PAPO-G ") else None)


def question_accuracies(ev: Path) -> dict[str, float]:
    """Each held-out question's accuracy over its k responses (full images), by question id."""
    accs = {}
    for f in sorted((ev / "samples").glob("*.jsonl")):
        if ".masked-" not in f.name:
            for line in f.read_text().splitlines():
                r = json.loads(line)
                accs[f"{f.stem}/{r['id']}"] = sum(map(bool, r["correct"])) / len(r["correct"])
    return accs


def paired(a: dict[str, float], b: dict[str, float]) -> dict | None:
    """b - a over the held-out questions both evaluations share (question_accuracies), with the standard error of
    that paired difference (papo.rollout.graded.paired_change); None where they share fewer than two."""
    ids = sorted(a.keys() & b.keys())
    if len(ids) < 2:
        return None
    mean = lambda accs: sum(accs[i] for i in ids) / len(ids)  # noqa: E731
    return paired_change({"accuracies": [a[i] for i in ids], "avg_at_k": mean(a)},
                         {"accuracies": [b[i] for i in ids], "avg_at_k": mean(b)})


def add_pairs(rows: list[dict], runs: Path) -> None:
    """Give each evaluated run its paired change against the starting model (`change_vs_start`) and against its
    baseline method's run of the same seed (`change_vs_baseline`, e.g. PAPO-G seed 1 - GRPO seed 1)."""
    accs = {(r["method"], r["seed"]): question_accuracies(runs / r["run"] / "eval")  # each run's samples read once
            for r in rows if r["method"] != START_METHOD}
    start = question_accuracies(runs / START / "eval")
    for r in rows:
        if r["method"] == START_METHOD or heldout(r) is None:
            continue
        own = accs[(r["method"], r["seed"])]
        if change := paired(start, own):
            r["change_vs_start"] = change
        base = baseline(r["method"])
        if base and (base, r["seed"]) in accs and (change := paired(accs[(base, r["seed"])], own)):
            r["change_vs_baseline"] = {"baseline": base, **change}


def _bench(ev: Path) -> dict:
    return next(iter(json.loads((ev / "summary.json").read_text())["benchmarks"].values()))


def heldout(row: dict) -> float | None:
    return row.get(f"heldout_avg_at_{row.get('eval_k')}")


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = f"{scale * statistics.mean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {scale * statistics.stdev(values):.{digits}f}"


def _flagged(rows: list[dict]) -> str:
    firsts = [r["first_hacking_warning_step"] for r in rows if r.get("first_hacking_warning_step")]
    return f"{len(firsts)}/{len(rows)}" + (f" (from step {min(firsts)})" if firsts else "")


def tables(rows: list[dict]) -> str:
    """The generated part of RESULTS.md, one row per method (mean ± std over seeds): held-out accuracy and
    training signals, the perception/reasoning error breakdown, and accuracy per task family."""
    evaluated = [r for r in rows if heldout(r) is not None]
    order = [START_METHOD] + [m for plan in PLANS.values() for m, _, _ in plan]
    methods = sorted(dict.fromkeys(r["method"] for r in evaluated), key=lambda m: order.index(m) if m in order else len(order))
    by_method = {m: [r for r in evaluated if r["method"] == m] for m in methods}
    k = evaluated[0]["eval_k"] if evaluated else "k"
    lines = [f"| method | seeds | steps | held-out avg@{k} (%) | masked-image avg@{k} (%) | perception gap (points) | "
             "final KL_prcp | final entropy | final masked entropy | steps flagged by the hacking monitor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, rs in by_method.items():
        lines.append(" | ".join([
            f"| {m}", str(len(rs)), _range([r["steps"] for r in rs]), _mean_std([heldout(r) for r in rs]),
            _mean_std([r.get("masked_avg_at_k") for r in rs]), _mean_std([r.get("perception_gap") for r in rs]),
            *(_mean_std([r.get(f"final_{key}") for r in rs], 1.0, 3) for key in ("kl_prcp", "entropy", "masked_entropy")),
            _flagged(rs) + " |"]))
    classes = ("correct", "lucky_guess", "perception", "reasoning", "format")
    lines += ["", "Every response of the held-out evaluation, classified from the facts its `<think>` states (papo.evaluation.analysis), "
              "% of responses, mean ± std over seeds:", "",
              "| method | " + " | ".join(c.replace("_", " ") for c in classes) + " | perception errors, % of wrong answers |",
              "|---|" + "---|" * (len(classes) + 1)]
    for m, rs in by_method.items():
        cells = [_mean_std([r.get("error_rates", {}).get(c) for r in rs]) for c in classes]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_mean_std([r.get('perception_share_of_errors') for r in rs])} |")
    lines += pair_table(by_method)
    lines += run_table(by_method, [r for r in rows if r["method"] == START_METHOD])
    cued = {m: rs for m, rs in by_method.items() if any("cued_answer_share" in r for r in rs)}
    if cued:
        truth = next(r["cued_truth_share"] for rs in cued.values() for r in rs if "cued_truth_share" in r)
        lines += ["", "Held-out answers equal to the answer the question's text suggests (the train split's shortcut), "
                  f"% of responses, mean ± std over seeds; {100 * truth:.1f}% of the questions really have it:", "",
                  "| method | answers that follow the text |", "|---|---|"]
        lines += [f"| {m} | {_mean_std([r.get('cued_answer_share') for r in rs])} |" for m, rs in cued.items()]
    tasks = sorted({t for r in evaluated for t in r.get("heldout_per_task", {})})
    if tasks:  # a one-family evaluation has no split by family
        lines += ["", f"Held-out avg@{k} (%) per task family, mean ± std over seeds:", "",
                  "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for m, rs in by_method.items():
            lines.append(f"| {m} | " + " | ".join(_mean_std([r["heldout_per_task"].get(t) for r in rs]) for t in tasks) + " |")
    return "\n".join(lines)


def _range(values: list[int]) -> str:
    return f"{min(values)}–{max(values)}" if min(values) != max(values) else str(values[0])


def _points(change: dict) -> str:
    return f"{100 * change['change']:+.1f} ± {100 * change['se']:.1f}"


def _mean_se(values: list[float]) -> str:
    mean = f"{100 * statistics.mean(values):+.1f}"
    return mean if len(values) == 1 else f"{mean} ± {100 * statistics.stdev(values) / len(values) ** 0.5:.1f}"


def pair_table(by_method: dict[str, list[dict]]) -> list[str]:
    """Every seed's paired held-out change (points, ± the standard error over questions) against the start and
    against its baseline method's run of the same seed, and the mean over seeds ± its standard error."""
    lines = []
    for key, against in (("change_vs_start", lambda m: "the start"), ("change_vs_baseline", baseline)):
        chosen = {m: sorted((r for r in rs if key in r), key=lambda r: r["seed"]) for m, rs in by_method.items()}
        chosen = {m: rs for m, rs in chosen.items() if rs}
        if not chosen:
            continue
        seeds = sorted({r["seed"] for rs in chosen.values() for r in rs})
        if not lines:
            lines += ["", "Paired held-out changes in points over the same questions, each ± its standard error over "
                      "questions; the last column is the mean over seeds ± its standard error:", ""]
        lines += ["| method | against | " + " | ".join(f"seed {s}" for s in seeds) + " | mean over seeds |",
                  "|---|---|" + "---|" * (len(seeds) + 1)]
        for m, rs in chosen.items():
            by_seed = {r["seed"]: r[key] for r in rs}
            cells = [_points(by_seed[s]) if s in by_seed else "–" for s in seeds]
            lines.append(f"| {m} | {against(m)} | " + " | ".join(cells) + f" | {_mean_se([c['change'] for c in by_seed.values()])} |")
        lines.append("")
    return lines[:-1] if lines else lines


def run_table(by_method: dict[str, list[dict]], starts: list[dict]) -> list[str]:
    """One line per run, seed by seed: its held-out and masked-image changes over its own start (its block's, where
    calls were combined), the train reward and KL_prcp over its first and last 10 steps, and the signs of KL_prcp
    hacking (masked entropy, format errors, the monitor's first flag)."""
    def start_of(r: dict) -> dict | None:
        same = [s for s in starts if s["seed"] == r["seed"]]
        return same[0] if same else starts[0] if len(starts) == 1 else None

    def num(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    runs = [r for m, rs in by_method.items() if m != START_METHOD for r in sorted(rs, key=lambda r: r["seed"])]
    if not runs:
        return []
    cued = any("cued_answer_share" in r for r in runs)
    lines = ["", "Each run (KL_prcp and reward over the first and last 10 steps; format errors, % of held-out responses):", "",
             "| run | held-out change | masked-image change | train reward, first → last | " + ("cued share | " if cued else "")
             + "KL_prcp, first → max → last | masked entropy, last | format errors | monitor flag from |",
             "|---|---|---|---|" + ("---|" if cued else "") + "---|---|---|---|"]
    for r in runs:
        start = start_of(r)
        masked = (r.get("masked_avg_at_k"), (start or {}).get("masked_avg_at_k"))
        kl = " → ".join(num(r.get(k), ".3f") for k in ("first_kl_prcp", "max_kl_prcp", "final_kl_prcp"))
        cells = [f"{r['method']}, seed {r['seed']}", _points(r["change_vs_start"]) if "change_vs_start" in r else "–",
                 num(100 * (masked[0] - masked[1]), "+.1f") if None not in masked else "–",
                 f"{num(r.get('first_train_reward'), '.2f')} → {num(r.get('final_train_reward'), '.2f')}",
                 *([num(100 * r["cued_answer_share"], ".1f") + "%" if "cued_answer_share" in r else "–"] if cued else []),
                 kl if r.get("first_kl_prcp") is not None else "–", num(r.get("final_masked_entropy"), ".3f"),
                 num(100 * r["error_rates"]["format"], ".1f") + "%" if "format" in r.get("error_rates", {}) else "–",
                 f"step {r['first_hacking_warning_step']}" if r.get("first_hacking_warning_step") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# figures of RESULTS.md: (file name, methods named exactly, methods whose names start with, metrics.jsonl keys; a
# key no chosen run logs gets no panel). Under DAPO's filter `reward` is the kept groups' (near 0.6 by construction),
# so its runs also show `accuracy_before_filter`, over every rollout they generated.
FIGURES = [("main", {"GRPO", "PAPO-G", "DAPO", "PAPO-D"}, None, ("reward", "accuracy_before_filter", "kl_prcp")),
           ("gamma", {"GRPO", "PAPO-G", "PAPO-G + double entropy", "PAPO-G + double entropy η=0.05"}, "PAPO-G γ",
            ("reward", "kl_prcp", "entropy", "masked_entropy")),
           ("mask", {"PAPO-G", "PAPO-G noise masking"}, "PAPO-G mask", ("reward", "kl_prcp")),
           ("grad", {"PAPO-G"}, "PAPO-G with-grad", ("reward", "kl_prcp", "entropy", "masked_entropy")),
           ("later", {"GRPO", "DAPO", "VPPO", "PGPO", "DVRP", "NoisyRollout"}, None,
            ("reward", "accuracy_before_filter", "kl_prcp", "entropy"))]


def report(rows: list[dict], out_md: Path, out_json: Path, runs: Path, section: str = "table") -> None:
    """Write the rows to out_json and the tables and figures between this section's markers in out_md. Other
    sections (e.g. runs of another length, reported with --section) are kept in both files."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(out_json.read_text())["runs"] if out_json.exists() else []
    rows = [{**r, "section": section} for r in rows]
    out_json.write_text(json.dumps({"runs": [r for r in kept if r.get("section", "table") != section] + rows}, indent=1))
    figures = []
    for name, exact, prefix, keys in FIGURES:
        chosen = [r for r in rows if r["method"] in exact or (prefix and r["method"].startswith(prefix))]
        file = name if section == "table" else f"{section}-{name}"
        if len({r["method"] for r in chosen}) > 1 and _plot(chosen, runs, out_md.parent / "results" / f"{file}.png", keys):
            figures.append(f"![{file}](results/{file}.png)")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    existing = out_md.read_text() if out_md.exists() else ""
    marker = f"<!-- reproduce.py {section} -->"
    table = f"{marker}\n" + tables(rows) + "\n\n" + "\n".join(figures) + f"\n{marker}"
    if marker in existing:
        head, _, rest = existing.partition(marker)
        _, _, tail = rest.partition(marker)
        out_md.write_text(head + table + tail)
    else:
        out_md.write_text(existing + ("\n" if existing else "") + table + "\n")


def logged_keys(keys: tuple[str, ...], runs_metrics) -> tuple[str, ...]:
    """The keys that at least one run's metrics log: the figure's panels."""
    runs_metrics = list(runs_metrics)
    return tuple(k for k in keys if any(k in m for metrics in runs_metrics for m in metrics))


def _plot(rows: list[dict], runs: Path, path: Path, keys: tuple[str, ...]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {r["run"]: read_metrics(runs / r["run"] / "metrics.jsonl") for r in rows}
    keys = logged_keys(keys, metrics.values())
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    drawn = False
    for ax, key in zip(axes[0], keys):
        for method in dict.fromkeys(r["method"] for r in rows):
            curves = [[m.get(key) or 0.0 for m in metrics[r["run"]]]
                      for r in rows if r["method"] == method and any(key in m for m in metrics[r["run"]])]
            curves = [c for c in curves if c]
            if curves:
                n = min(len(c) for c in curves)
                mean = [statistics.mean(c[i] for c in curves) for i in range(n)]
                w = max(1, n // 20)
                smooth = [statistics.mean(mean[max(0, i - w + 1): i + 1]) for i in range(n)]
                ax.plot(range(1, n + 1), smooth, label=method, lw=1.2)
                drawn = True
        ax.set(xlabel="step", title=key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("mean over seeds, moving average over 5% of the run", fontsize=9)
    fig.tight_layout()
    if drawn:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def train_all(jobs: list[tuple], args: argparse.Namespace, out: Path, t0: float) -> bool:
    """Train every job to the plan's step count (sized, extended, or --steps), then evaluate the finished runs
    and the start. False when nothing was evaluated (--no-eval); a stop signal ends the process here."""
    sizing = out / "plan.json"  # a rerun (after a kill) keeps the step count of the first

    def trained() -> list[int]:  # the steps each job's run has logged so far
        return [len(read_metrics(run_dir(*job, out) / "metrics.jsonl")) for job in jobs]

    if args.extend:
        if not sizing.exists():
            raise SystemExit(f"--extend continues earlier runs, and {sizing} does not exist: "
                             "run without --extend first")
        plan = extend_plan(json.loads(sizing.read_text()), len(jobs), args, trained())
        sizing.write_text(json.dumps(plan, indent=1) + "\n")
    elif not sizing.exists():
        chosen = size_steps(jobs, args, t0) if args.budget_s else {"steps": args.steps}
        sizing.write_text(json.dumps(chosen, indent=1) + "\n")
    chosen = json.loads(sizing.read_text())
    steps = chosen["steps"]
    print(f"{len(jobs)} runs of {steps} steps, {args.jobs} at a time ({chosen})", flush=True)
    before = trained()  # after the probe, if one ran
    t_train = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda j: train(*j, steps, args), jobs))
        # the pace this call showed sizes a later --extend --budget-s, whether or not a probe sized this one
        pace = measured_pace(runs, before, time.time() - t_train, _waves(len(jobs), args.jobs))
        sizing.write_text(json.dumps({**chosen, **pace}, indent=1) + "\n")
        if _stopped:
            _exit_stopped(runs, steps)
        if short := sorted(n for run in runs if run in finished and (n := len(read_metrics(run / "metrics.jsonl"))) < steps):
            print(f"{len(short)} of {len(runs)} runs ended at steps {short[0]}–{short[-1]} of {steps} (the time limit "
                  "before --eval-reserve-s, or a stop their logs name); they are evaluated there (--extend continues them)",
                  flush=True)
        if args.no_eval:
            print(f"trained in {time.time() - t0:.0f} s; not evaluated (--no-eval)", flush=True)
            return False
        print(f"trained in {time.time() - t0:.0f} s; evaluating", flush=True)
        # a run that failed twice may keep an older final/ (from an earlier call): evaluating it would mislabel it
        evals = [(run / "final", run / "eval", out / f"{run.name}.log", len(read_metrics(run / "metrics.jsonl")))
                 for run in runs if run in finished]
        if not args.no_start_eval:
            evals.append((args.model or "default", out / START / "eval", out / f"{START}.log", None))
        list(pool.map(lambda e: evaluate(*e[:3], args, steps=e[3]), evals))
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", choices=[*PLANS, "all"], default="main")
    ap.add_argument("--methods", default=None, help="comma-separated method names of the plan to run (default: all)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every method")
    ap.add_argument("--seed-list", default=None, help="comma-separated seeds instead, e.g. 3,4 to add seeds")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: cores / --jobs)")
    ap.add_argument("--no-start-eval", action="store_true", help="do not evaluate the starting model")
    ap.add_argument("--no-eval", action="store_true", help="train only; a later call (--extend) evaluates")
    ap.add_argument("--steps", type=int, default=100, help="training steps of every run (see --budget-s)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="size --steps from a probe so that all runs and their evaluation finish in this many seconds")
    ap.add_argument("--probe-steps", type=int, default=6)
    ap.add_argument("--extend", action="store_true",
                    help="continue the runs in --out to --steps, or by what fits in --budget-s; earlier evaluations are kept")
    ap.add_argument("--eval-reserve-s", type=float, default=120.0, help="time kept for evaluation when sizing steps")
    ap.add_argument("--jobs", type=int, default=6, help="runs at once (they share the GPU)")
    ap.add_argument("--model", default=None, help="starting model (default: the embedded one)")
    ap.add_argument("--set", action="append", default=[], help="config override for every run, e.g. optim.lr=3e-5")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eval-k", type=int, default=8)
    ap.add_argument("--eval-n", type=int, default=140)
    ap.add_argument("--eval-data", default=TEST, help="held-out data spec; {n} stands for --eval-n")
    ap.add_argument("--eval-max-new-tokens", type=int, default=48, help="match rollout.max_new_tokens of the runs")
    ap.add_argument("--mask-ratio", type=float, default=0.6, help="masked images for the perception gap")
    ap.add_argument("--out", default="experiments/runs")
    ap.add_argument("--results", default="docs/results/reproduction.json")
    ap.add_argument("--markdown", default="docs/RESULTS.md")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--combine", nargs="+", default=[], metavar="JSON",
                    help="report the --section rows of these reproduction.json files together: blocks of one seed "
                    "each (regime_run.sh SEED_LIST), every run paired within its own call's start and baseline")
    ap.add_argument("--section", default="table", help="name of this report's part of the markdown and JSON files")
    args = ap.parse_args()
    entries = [x for name in (PLANS if args.plan == "all" else [args.plan]) for x in PLANS[name]]
    plan = list({(m, p, tuple(o)): (m, p, o) for m, p, o in entries}.values())  # plans share their baselines
    if args.methods:
        wanted = set(args.methods.split(","))
        plan = [x for x in plan if x[0] in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    jobs = [(m, p, o, s) for m, p, o in plan for s in seeds]
    t0 = time.time()
    if args.combine:
        report(combine_blocks([Path(f) for f in args.combine], args.section), Path(args.markdown), Path(args.results),
               out, args.section)
        print(f"{len(args.combine)} blocks; wrote {args.results} and {args.markdown}")
        return
    args.train_deadline = t0 + args.budget_s - args.eval_reserve_s if args.budget_s else None
    if not args.report_only:
        previous = {sig: signal.signal(sig, _on_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            if not train_all(jobs, args, out, t0):
                return
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    rows = [collect(d, *_describe(d)) for d in sorted(out.iterdir()) if (d / "config.yaml").exists()]
    if (out / START / "eval" / "summary.json").exists():
        rows.insert(0, collect(out / START, START_METHOD, "", [], 0))
    add_pairs(rows, out)
    report(rows, Path(args.markdown), Path(args.results), out, args.section)
    print(f"{len(rows)} runs in {time.time() - t0:.0f} s; wrote {args.results} and {args.markdown}")


def combine_blocks(files: list[Path], section: str) -> list[dict]:
    """The ``section`` rows of several calls' reproduction.json files, each call a block with its own start and
    seeds no other block has: its paired changes stay those against its own start and baseline runs. A block's
    start row takes the block's seed, so each block's start is reported beside its runs."""
    rows, seen = [], {}
    for f in files:
        block = [r for r in json.loads(f.read_text())["runs"] if r.get("section", "table") == section]
        if not block:
            raise SystemExit(f"{f}: no runs of section {section!r}")
        seeds = {r["seed"] for r in block if r["method"] != START_METHOD}
        for r in block:
            if r["method"] == START_METHOD:
                r = {**r, "seed": min(seeds)} if len(seeds) == 1 else r
            elif (r["method"], r["seed"]) in seen:
                raise SystemExit(f"{f}: {r['method']} seed {r['seed']} is also in {seen[r['method'], r['seed']]}; "
                                 "blocks must run distinct seeds (regime_run.sh SEED_LIST)")
            else:
                seen[r["method"], r["seed"]] = f
            rows.append(r)
    return rows


def _describe(run: Path) -> tuple[str, str, list[str], int]:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    seed = cfg["trainer"]["seed"]
    name = (run / "method.txt").read_text().strip() if (run / "method.txt").exists() else cfg["preset"]
    return name, cfg["preset"], [], seed


if __name__ == "__main__":
    main()
