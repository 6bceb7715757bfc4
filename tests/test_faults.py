"""Faults injected through papo.training.faults: full disks, non-finite values and out-of-memory never corrupt a run."""

import json

import pytest
import torch
from model_fixtures import small_cfg

from papo.cli import main
from papo.errors import CheckpointError, TrainingStopped
from papo.models.policy import Policy
from papo.training import faults
from papo.training.checkpoint import checkpoint_dirs, load_trainer_state
from papo.training.loop import run_train
from papo.training.trainer import Trainer, nonfinite_inputs


@pytest.fixture(autouse=True)
def _no_failpoints_after():
    yield
    faults.configure(None)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the failpoint registry


def test_failpoint_specs_fire_on_the_hits_they_name():
    faults.configure("rewards=nan@2-3; grad=nan@*")
    assert [faults.failpoint("rewards") for _ in range(4)] == [None, "nan", "nan", None]
    assert [faults.failpoint("grad") for _ in range(3)] == ["nan"] * 3
    assert faults.failpoint("update") is None  # not configured
    faults.configure("checkpoint.state=enospc")
    with pytest.raises(OSError, match="No space left"):
        faults.failpoint("checkpoint.state")
    faults.configure("update=oom@1")
    with pytest.raises(torch.OutOfMemoryError):
        faults.failpoint("update")


def test_a_rank_prefix_limits_a_failpoint_to_that_process(monkeypatch):
    monkeypatch.setenv("RANK", "1")  # what torchrun sets in each worker
    faults.configure("rank0:update=oom@1; rank1:rewards=nan@1")
    assert faults.failpoint("update") is None and faults.failpoint("rewards") == "nan"


@pytest.mark.parametrize("spec, message", [("nowhere=kill", "unknown failpoint"), ("update=explode", "unknown action"),
                                           ("update=kill@two", "bad hit count"), ("update", "unknown failpoint"),
                                           ("rankx:update=oom", "bad rank prefix"),
                                           ("rank1:updte=oom", "unknown failpoint")])  # another rank's rule is checked too
def test_bad_failpoint_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        faults.configure(spec)


# ------------------------------------------------------------------ disk


def test_a_full_disk_mid_checkpoint_keeps_the_previous_one_usable(tmp_path, capsys):
    out = tmp_path / "run"
    faults.configure("checkpoint.state=enospc@2")  # the second checkpoint fails after its model files are written
    with pytest.raises(CheckpointError, match="step-2 .*No space left on device.*step-1 is intact"):
        run_train(small_cfg("grpo", ["trainer.max_steps=3", "trainer.save_every=1", "trainer.keep_last=3"]), str(out))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]  # no step-2, no step-2.tmp
    step1 = out / "checkpoints" / "step-1"
    assert load_trainer_state(step1)["step"] == 1
    Policy.from_pretrained(str(step1))
    faults.configure(None)
    assert main(["train", "--resume", str(out)]) == 0  # and the run continues from it
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]


def test_the_cli_reports_a_failed_checkpoint_without_a_traceback(tmp_path, capsys):
    faults.configure("checkpoint.model=enospc@1")
    args = ["train", "--out", str(tmp_path / "run"), "--max-steps", "1", "--preset", "grpo"]
    assert main(args + sum((["--set", s] for s in ["trainer.save_every=1", "trainer.rollout_batch_size=2",
                                                   "trainer.mini_batch_size=2", "rollout.n=2", "rollout.max_new_tokens=8",
                                                   "trainer.eval_before_after=false", "trainer.report_to=none"]), [])) == 1
    err = capsys.readouterr().err
    assert "papo train: stopped: could not write checkpoint step-1" in err and "Traceback" not in err


# ------------------------------------------------------------------ numbers


def test_nonfinite_inputs_names_each_cause():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logps = {"old": torch.tensor([[0.0, -1.0, float("nan")], [-2.0, float("inf"), 0.0]])}  # padding is ignored
    assert nonfinite_inputs(torch.tensor([1.0, 0.0]), logps, mask) == ""
    logps["masked"] = torch.tensor([[float("-inf"), 0.0, 0.0], [0.0, 0.0, 0.0]])
    cause = nonfinite_inputs(torch.tensor([float("nan"), 0.0]), logps, mask)
    assert cause == "non-finite reward (1 of 2); non-finite masked log-probs (1 tokens)"


@pytest.mark.parametrize("spec, cause, extra", [
    ("rewards=nan@2", "non-finite reward", []),
    ("logprobs=nan@2", "non-finite old log-probs", ["trainer.mini_batch_size=1"]),  # two updates: an old-log-prob pass
    ("logprobs=nan@2", "non-finite masked log-probs", []),  # one update: the masked pass is the first
    ("grad=nan@2", "non-finite gradient norm in mini-batch 0 (not finite in 1 of", [])])
def test_a_nonfinite_step_is_skipped_logged_and_training_continues(spec, cause, extra, tmp_path):
    trainer = Trainer(small_cfg("papo_g", extra), tmp_path, "cpu")
    trainer.step()
    faults.configure(spec)
    faults.failpoint(spec.split("=")[0])  # the first hit passes, the second (the next step) fires
    before = _params(trainer.policy.model)
    row = trainer.step()
    assert cause in row["skipped"] and row["skipped_updates"] == 1
    assert _same(before, trainer.policy.model.parameters())  # nothing non-finite reached the weights
    assert all(torch.isfinite(p).all() for p in trainer.policy.model.parameters())
    assert trainer.bad_steps == 1
    row = trainer.step()  # the fault is gone: training goes on
    assert row["skipped"] == "" and not _same(before, trainer.policy.model.parameters())
    assert trainer.bad_steps == 0


def test_repeated_faults_stop_the_run_with_the_weights_untouched(tmp_path):
    out = tmp_path / "run"
    faults.configure("rewards=nan@*")
    cfg = small_cfg("papo_g", ["trainer.max_steps=5", "trainer.max_bad_steps=2", "trainer.save_every=1"])
    with pytest.raises(TrainingStopped, match="stopped at step 2: 2 consecutive steps were skipped .*non-finite reward"):
        run_train(cfg, str(out))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all("non-finite reward" in r["skipped"] for r in rows)
    assert all(v is None or not isinstance(v, float) or v == v for r in rows for v in r.values())  # strict JSON
    initial = Policy.from_pretrained(None).model.state_dict()
    saved = Policy.from_pretrained(str(checkpoint_dirs(out / "checkpoints")[-1][1])).model.state_dict()
    assert all(torch.equal(initial[k], saved[k]) for k in initial)


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize("point, setting, extra", [
    ("update", "trainer.micro_batch_size (now 8)", []),
    ("update", "trainer.update_micro_batch_size (now 8)", ["trainer.micro_batch_size=4", "trainer.update_micro_batch_size=8"]),
    ("rollout", "trainer.rollout_batch_size (now 2; x rollout.n = 8", []),
])
def test_out_of_memory_names_the_setting_to_lower_and_saves_nothing(point, setting, extra, tmp_path):
    out = tmp_path / "run"
    faults.configure(f"{point}=oom@2")  # during step 2 (rollout: its 2nd rollout; update: its 2nd update pass)
    cfg = small_cfg("papo_g", ["trainer.max_steps=3", "trainer.save_every=1", *extra])
    with pytest.raises(TrainingStopped, match="out of memory") as info:
        run_train(cfg, str(out))
    assert setting in str(info.value) and "resume from step-1" in str(info.value)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    assert [r["step"] for r in _metrics(out)] == [1]
