"""A scheduler's stop signal: the step under way finishes, a checkpoint is saved, and --resume continues."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from papo.cli import TORCHRUN_SHUTDOWN_ENV
from papo.training import faults
from papo.training.distributed import DistContext
from papo.training.loop import read_metrics
from papo.training.stop_signal import StopOnSignal

SETTINGS = ["trainer.rollout_batch_size=2", "trainer.mini_batch_size=2", "rollout.n=4", "rollout.max_new_tokens=16",
            "trainer.eval_before_after=false", "trainer.report_to=none", "trainer.log_samples_every=0",
            "trainer.save_every=0"]  # no periodic checkpoint: the one the stop writes is the only one


def test_stop_signals_set_a_flag_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert stop.requested(DistContext()) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing: the first is kept
        assert stop.requested(DistContext()) == signal.SIGUSR1
    assert signal.getsignal(signal.SIGTERM) is before


def _start(out: Path, nproc: int, steps: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "papo", "train", "--nproc-per-node", str(nproc), "--out", str(out),
           "--max-steps", str(steps), "--device", "cpu"]
    for s in SETTINGS:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _stop_after(proc: subprocess.Popen, out: Path, steps: int, signum: int) -> tuple[int, str]:
    deadline = time.time() + 300
    while len(read_metrics(out / "metrics.jsonl")) < steps and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signalled_run_saves_its_last_step_and_resumes_from_it(signum, tmp_path):
    out = tmp_path / "run"
    rc, err = _stop_after(_start(out, 1, 50), out, 2, signum)
    done = len(read_metrics(out / "metrics.jsonl"))
    assert rc == 128 + signum, err[-2000:]
    assert f"{signal.Signals(signum).name} received; stopped after step {done} of 50" in err
    assert 2 <= done < 50 and (out / "checkpoints" / f"step-{done}" / "trainer_state.pt").exists()
    assert not (out / "final").exists()  # not finished: --resume continues it
    resumed = subprocess.run([sys.executable, "-m", "papo", "train", "--resume", str(out), "--max-steps", str(done + 1)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, done + 2))
    assert (out / "final" / "config.json").exists()


def test_a_signal_to_the_launcher_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    rc, err = _stop_after(_start(out, 2, 50), out, 1, signal.SIGTERM)
    done = len(read_metrics(out / "metrics.jsonl"))
    assert rc == 128 + signal.SIGTERM and err.count("SIGTERM received; stopped after step") == 1, err[-3000:]  # rank 0 reports
    ckpt = out / "checkpoints" / f"step-{done}"
    assert (ckpt / "dcp").is_dir() and not (out / "final").exists(), sorted(p.name for p in out.rglob("*"))[:40]


@pytest.mark.slow
def test_a_stop_checkpoint_may_outlast_torchruns_grace(tmp_path):
    """The launcher signals the ranks, not torchrun, which would kill ranks still running 30 s after passing a
    stop on (its grace; torch < 2.12 cannot change it): a checkpoint that takes longer still completes."""
    assert faults.STALL_S > 30
    out = tmp_path / "run"
    env = {**os.environ, TORCHRUN_SHUTDOWN_ENV: "30",  # the grace of torch < 2.12
           faults.ENV: "checkpoint.model=stall@1"}  # every rank's stop checkpoint stalls STALL_S seconds
    rc, err = _stop_after(_start(out, 2, 50, env), out, 1, signal.SIGTERM)
    done = len(read_metrics(out / "metrics.jsonl"))
    assert rc == 128 + signal.SIGTERM and err.count("SIGTERM received; stopped after step") == 1, err[-3000:]
    ckpt = out / "checkpoints" / f"step-{done}"
    assert (ckpt / "trainer_state.pt").exists(), sorted(p.name for p in out.rglob("*"))[:40]
