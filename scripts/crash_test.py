"""Crash safety of ``papo train``: SIGKILL it again and again, resume each time, compare with an unkilled run.

    python scripts/crash_test.py --kills 10 --steps 40 --out runs/crash-test [--seed 0] [--json results.json]

A reference run trains the embedded model on CPU for ``--steps`` steps (small settings, a checkpoint every
step). A second run is killed ``--kills`` times: half the kills fire inside the trainer through papo.training.faults
(during a rollout, an update, the metrics write, or at one of three moments of a checkpoint write), half come
from this script at a random wall-clock time (model loading included). After every kill the latest
checkpoint must load (trainer state with ``weights_only``, weights through ``from_pretrained``); the run is
then resumed with ``--resume``. At the end ``metrics.jsonl`` must hold each step exactly once and equal the
reference's, timings and memory peaks aside. Exit status 1 if anything failed.

``--device cuda`` does the same on a GPU (the compiled engine and CUDA graphs: exact resume needs the CUDA
generator in the checkpoint); ``--set KEY=VALUE`` adds config overrides to both runs, e.g. fp32 compute.
``--nproc 2`` runs both under torchrun with two processes (sharded checkpoints): a kill takes down the whole
job, as losing one rank does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = [
    "trainer.rollout_batch_size=2", "trainer.mini_batch_size=2", "trainer.micro_batch_size=8", "rollout.n=4",
    "rollout.max_new_tokens=16", "trainer.eval_before_after=false", "trainer.report_to=none",
    "trainer.log_samples_every=0", "trainer.save_every=1", "trainer.keep_last=2",
]
KILL_POINTS = ["rollout", "update", "metrics", "checkpoint.model", "checkpoint.state", "checkpoint.rename"]


def _train(out: Path, steps: int, resume: bool, failpoints: str = "", kill_after: float | None = None,
           device: str = "cpu", extra: tuple[str, ...] = (), nproc: int = 1) -> int:
    cmd = [sys.executable, "-m", "papo", "train", "--nproc-per-node", str(nproc)]
    cmd += ["--resume", str(out)] if resume else ["--out", str(out), "--max-steps", str(steps), "--device", device]
    if not resume:
        for s in [*SETTINGS, *extra]:
            cmd += ["--set", s]
    env = {**os.environ, "PAPO_FAILPOINTS": failpoints}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)  # the launcher, torchrun and every worker (they run in sessions of their own)
        proc.communicate()
        return -signal.SIGKILL
    if proc.returncode != 0 and nproc > 1 and "exitcode  : -9" in err:  # a worker killed itself at a failpoint;
        return -signal.SIGKILL  # torchrun has stopped the others
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"papo train failed ({proc.returncode}):\n{err[-3000:]}")
    return proc.returncode



def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, found through /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _check_latest(out: Path) -> str:
    """Load the newest checkpoint the way --resume would; returns its name ("none" before the first)."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    from papo.training.checkpoint import is_sharded_checkpoint, latest_checkpoint, load_trainer_state

    hf_logging.disable_progress_bar()

    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is None:
        return "none"
    state = load_trainer_state(ckpt)
    if is_sharded_checkpoint(ckpt):  # shards load in the resumed run; here: complete metadata and RNG files
        assert (ckpt / "dcp" / ".metadata").is_file() and list(ckpt.glob("rng-*.pt")), f"{ckpt}: incomplete"
    else:
        AutoModelForImageTextToText.from_pretrained(ckpt)
    assert state["step"] == int(ckpt.name.split("-")[1]), f"{ckpt}: trainer state says step {state['step']}"
    return ckpt.name


def _rows(out: Path) -> list[dict]:
    measured = lambda k: k.endswith(("_s", "_gib"))  # noqa: E731 - times and memory peaks differ between any two runs
    return [{k: v for k, v in json.loads(line).items() if not measured(k)}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_crash_test(out: Path, kills: int, steps: int, seed: int = 0, log=print, device: str = "cpu",
                   extra: tuple[str, ...] = (), nproc: int = 1) -> dict:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run_opts = dict(device=device, extra=extra, nproc=nproc)
    _train(out / "reference", steps, resume=False, **run_opts)
    log(f"reference run: {steps} steps in {time.time() - t0:.0f} s")
    run, events, started = out / "killed", [], False
    for i in range(kills):
        if i % 2 == 0:
            where = f"{rng.choice(KILL_POINTS)}=kill@{rng.randint(1, 2)}"
            rc = _train(run, steps, resume=started, failpoints=where, **run_opts)
        else:
            delay = rng.uniform(3.0, 12.0)
            where = f"SIGKILL after {delay:.1f} s"
            rc = _train(run, steps, resume=started, kill_after=delay, **run_opts)
        started = started or (run / "config.yaml").exists()
        event = {"kill": i + 1, "where": where, "killed": rc == -signal.SIGKILL, "latest_checkpoint": _check_latest(run)}
        events.append(event)
        log(f"kill {i + 1:2d}: {where:32s} {'killed' if event['killed'] else 'finished first'}; "
            f"latest checkpoint {event['latest_checkpoint']} loads")
    _train(run, steps, resume=started, **run_opts)
    reference, killed = _rows(out / "reference"), _rows(run)
    result = {
        "kills": sum(e["killed"] for e in events), "steps": steps, "events": events,
        "each_step_once": [r["step"] for r in killed] == list(range(1, steps + 1)),
        "equals_reference": killed == reference,
        "seconds": round(time.time() - t0, 1),
    }
    result["passed"] = result["each_step_once"] and result["equals_reference"]
    log(f"{result['kills']} kills; metrics.jsonl has each step once: {result['each_step_once']}; "
        f"equals the unkilled run: {result['equals_reference']} ({result['seconds']} s)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/crash-test")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: exact resume of GPU sampling (CUDA RNG, graphs)")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for both runs")
    ap.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun; 2: sharded checkpoints)")
    args = ap.parse_args()
    result = run_crash_test(Path(args.out), args.kills, args.steps, args.seed, device=args.device, extra=tuple(args.set),
                            nproc=args.nproc)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
