"""The Python API: papo.train with rows in memory and a reward callable, and examples/python_api.py as written."""

import json
import runpy
import sys
from pathlib import Path

import pytest

import papo
from papo.config.schema import ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"


def test_the_python_api_example_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), str(out)])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert "trained 2 steps" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and (out / "final" / "config.json").is_file()
    saved = (out / "config.yaml").read_text()
    assert "<list in memory>" in saved and "python:says_the_answer" in saved and "n: 2" in saved


def test_the_reward_callable_and_rows_are_what_training_sees(tmp_path):
    seen = []

    def reward(response, answer, answer_type="math", meta=None, **kw):
        seen.append(answer)
        return {"overall": 1.0 if answer == "7" else 0.0, "accuracy": 0.0}

    rows = [{"prompt": "What is 3 + 4?", "answer": "7"}, {"prompt": "What is 2 + 2?", "answer": "4"}]
    result = papo.train("grpo", ["rollout.n=2", "rollout.max_new_tokens=8", "trainer.rollout_batch_size=2",
                                 "trainer.mini_batch_size=2", "trainer.eval_before_after=false", "trainer.report_to=none"],
                        dataset=rows, reward=reward, max_steps=1, device="cpu", out=tmp_path / "r")
    assert result["steps"] == 1 and sorted(set(seen)) == ["4", "7"] and len(seen) == 4
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text())
    assert row["reward"] == 0.5  # 1 for both rollouts of "7", 0 for both of "4"


def test_a_config_object_takes_overrides_and_bad_keys_fail(tmp_path):
    cfg = load_config("dapo")
    with pytest.raises(ConfigError, match="unknown config key"):
        papo.train(config=cfg, overrides={"rollout.nn": 2}, out=tmp_path / "x")
    assert cfg.rollout.n == 8  # the caller's object is left as it was
