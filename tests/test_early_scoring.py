"""Scoring during the rollout (papo.training.early_scoring): the same log-probs and the same step as scoring
after it, on CPU in fp32 with papo's engine."""

import time

import pytest
import torch
from model_fixtures import small_cfg

from papo.errors import ConfigError
from papo.rollout import engine as rollout_engine
from papo.training.early_scoring import EarlyScorer, use_early_scoring
from papo.training.trainer import Trainer

# two mini-batches (the second needs old log-probs, the first takes them from its update), passes of 2
BASE = ["rollout.engine=papo", "trainer.micro_batch_size=2", "trainer.mini_batch_size=1", "trainer.seed=1"]


@pytest.fixture
def slow_tail(monkeypatch):
    """The decode waits at each check until the worker has scored every full pass of ended rows: a long tail,
    without which the rollout of a tiny model can end before the worker has scored anything."""
    monkeypatch.setattr(rollout_engine, "CHECK_EVERY", 1)
    real = EarlyScorer.submit

    def submit(self, rows, completions):
        real(self, rows, completions)
        self.submitted = getattr(self, "submitted", 0) + len(rows)
        deadline = time.monotonic() + 120
        while self.error is None and time.monotonic() < deadline and not (
                len(self.pending) < self.batch_size and len(self.done) + len(self.pending) == self.submitted):
            time.sleep(0.005)

    monkeypatch.setattr(EarlyScorer, "submit", submit)


def _step(preset, extra, early, tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(small_cfg(preset, [*BASE, f"trainer.early_scoring={str(early).lower()}", *extra]),
                      tmp_path / f"{preset}-{early}", "cpu")
    assert trainer.early_scoring is early
    caught = {}
    real = trainer.score_experience

    def score(exp, batches, timing):
        caught["logps"] = real(exp, batches, timing)
        return caught["logps"]

    trainer.score_experience = score
    row = trainer.step()
    return row, caught["logps"].named(), trainer.last_experience


@pytest.mark.parametrize("preset,extra", [("papo_g", []), ("dvrp", []), ("papo_d", ["algorithm.keep_all_if_empty=true"])])
def test_scoring_during_the_rollout_gives_the_same_log_probs_and_step(preset, extra, tmp_path, slow_tail):
    (row_after, after, exp), (row_early, early, exp_early) = (_step(preset, extra, flag, tmp_path) for flag in (False, True))
    assert torch.equal(exp.ids, exp_early.ids)  # the same rollouts
    scored = row_early["early_scored"]
    assert 0 < scored <= exp.size, scored  # rows scored during the rollout (papo_g, dvrp: the last ones after it)
    assert scored < exp.size or preset == "papo_d"
    assert "early_scored" not in row_after
    assert after.keys() == early.keys() and {"old", "masked"} <= after.keys()
    for name in after:
        assert (after[name] - early[name]).abs().max() < 1e-5, name
    for key in ("loss", "pg_loss", "kl_prcp", "entropy", "grad_norm", "ppo_kl"):
        if key in row_after:
            assert row_early[key] == pytest.approx(row_after[key], rel=1e-5, abs=1e-7), key


def test_sequences_scored_early_are_not_encoded_again(tmp_path, slow_tail, monkeypatch):
    """Their encodings travel with the experience: the passes after the rollout merge them, and the processor
    runs only for the sequences scored after it."""
    torch.manual_seed(0)
    trainer = Trainer(small_cfg("papo_g", [*BASE, "trainer.early_scoring=true"]), tmp_path, "cpu")
    encoded = []
    real = trainer.policy.encode
    monkeypatch.setattr(trainer.policy, "encode", lambda prompts, images: (encoded.append(len(prompts)), real(prompts, images))[1])
    phase = {}
    real_score = trainer.score_experience

    def score(exp, batches, timing):
        phase["rollout"] = sum(encoded)
        out = real_score(exp, batches, timing)
        return out

    trainer.score_experience = score
    row = trainer.step()
    prompts, n = 2, 4
    # the rollout's one prompt batch, then full and masked images of each row scored early, one row at a time
    assert phase["rollout"] == prompts + 2 * row["early_scored"]
    # after it: full and masked images of the other rows, once, for the scoring passes and the update alike
    assert sum(encoded) - phase["rollout"] == 2 * (prompts * n - row["early_scored"])


def test_a_failing_pass_in_the_worker_stops_the_step(tmp_path, slow_tail, monkeypatch):
    torch.manual_seed(0)
    trainer = Trainer(small_cfg("papo_g", [*BASE, "trainer.early_scoring=true"]), tmp_path, "cpu")

    def fail(name, mb):
        raise RuntimeError("pass failed in the worker")

    monkeypatch.setattr(trainer, "_score_pass", fail)
    with pytest.raises(RuntimeError, match="pass failed in the worker"):
        trainer.step()


def test_where_early_scoring_runs():
    assert use_early_scoring("auto", "cuda", 1, True, False, True)
    assert not use_early_scoring("auto", "cpu", 1, True, False, True)  # the worker would take the decode's cores
    assert not use_early_scoring("auto", "cuda", 2, True, False, True)
    assert not use_early_scoring("auto", "cuda", 1, False, False, True)
    assert not use_early_scoring(True, "cpu", 1, True, False, False)  # no scoring pass: nothing to do
    assert use_early_scoring(True, "cpu", 1, True, False, True)
    for args, why in (((2, True, False), "several processes"), ((1, False, False), "rollout.engine=hf"),
                      ((1, True, True), "NoisyRollout")):
        with pytest.raises(ConfigError, match=f"trainer.early_scoring=true cannot run with {why}"):
            use_early_scoring(True, "cuda", *args, True)
    with pytest.raises(ConfigError, match="trainer.early_scoring must be true, false or auto"):
        small_cfg("papo_g", ["trainer.early_scoring=sometimes"])
