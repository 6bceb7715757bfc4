"""The short crash-safety run (the full one: python scripts/crash_test.py --kills 10 --steps 40)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "crash_test.py"


def test_sigkilled_runs_resume_to_the_unkilled_result(tmp_path):
    spec = importlib.util.spec_from_file_location("crash_test", SCRIPT)
    crash_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crash_test)
    result = crash_test.run_crash_test(tmp_path, kills=3, steps=4, seed=1, log=lambda *_: None)
    assert result["kills"] >= 2  # a wall-clock kill may come after the run finished
    assert all(e["latest_checkpoint"] != "" for e in result["events"])
    assert result["each_step_once"] and result["equals_reference"]


@pytest.mark.slow  # 1.5 min on 2 cores; make test-all runs it
def test_sigkilled_two_process_runs_resume_to_the_unkilled_result(tmp_path):
    """The same with two processes under torchrun: sharded checkpoints survive kills at any point."""
    spec = importlib.util.spec_from_file_location("crash_test", SCRIPT)
    crash_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crash_test)
    # seed 5: killed writing a sharded checkpoint (rank 0 at checkpoint.state, rank 1 waiting), then at a random time
    result = crash_test.run_crash_test(tmp_path, kills=2, steps=3, seed=5, log=lambda *_: None, nproc=2)
    assert result["kills"] >= 1
    assert any(e["latest_checkpoint"].startswith("step-") for e in result["events"])  # a sharded checkpoint survived
    assert result["each_step_once"] and result["equals_reference"], result
