"""scripts/pick_checkpoint.py ranks a `papo sft --save-steps` run's checkpoints by room for RL."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pick_checkpoint.py"


def _run_with_checks(tmp_path, checks):
    run = tmp_path / "run"
    for name, per_task in checks.items():
        d = run if name == "final" else run / name
        d.mkdir(parents=True, exist_ok=True)
        mean = sum(per_task.values()) / len(per_task)
        (d / "sft_result.json").write_text(json.dumps(
            {"heldout": {"sampled_t1": {"avg_at_k": mean, "format_rate": 1.0, "per_task": per_task}}}))
    return run


def _ranking(tmp_path, run, *args):
    subprocess.run([sys.executable, str(SCRIPT), str(run), str(tmp_path / "pick"), "--no-pack", *args],
                   check=True, capture_output=True)
    return json.loads((tmp_path / "pick" / "checkpoints.json").read_text())["ranking"]


def test_most_families_in_band_first_then_highest_mean_or_nearest_target(tmp_path):
    run = _run_with_checks(tmp_path, {
        "step-300": {"clock": 0.1, "bar_chart": 0.5},   # one family in [0.2, 0.8]
        "step-400": {"clock": 0.3, "bar_chart": 0.6},   # two, mean 0.45
        "step-500": {"clock": 0.5, "bar_chart": 0.75},  # two, mean 0.625
        "final": {"clock": 0.9, "bar_chart": 1.0},      # none
    })
    assert _ranking(tmp_path, run) == ["step-500", "step-400", "step-300", "final"]
    assert _ranking(tmp_path, run, "--target", "0.4") == ["step-400", "step-500", "step-300", "final"]


def test_families_judges_by_the_rl_families_alone(tmp_path):
    """A warm start that reads bar charts but not yet clocks must not be picked for RL on clocks."""
    run = _run_with_checks(tmp_path, {
        "step-400": {"clock": 0.07, "bar_chart": 0.68},  # bar charts in band, clocks at chance
        "step-600": {"clock": 0.31, "bar_chart": 0.98},
        "step-700": {"clock": 0.51, "bar_chart": 0.95},
    })
    assert _ranking(tmp_path, run, "--target", "0.35")[0] == "step-400"
    assert _ranking(tmp_path, run, "--families", "clock", "--target", "0.4") == ["step-600", "step-700", "step-400"]
    assert _ranking(tmp_path, run, "--families", "clock", "--target", "0.45")[0] == "step-700"
    out = subprocess.run([sys.executable, str(SCRIPT), str(run), str(tmp_path / "pick"), "--no-pack", "--families", "maze"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "no held-out check of family 'maze' (checked: bar_chart, clock)" in out.stderr
