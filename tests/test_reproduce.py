"""experiments/reproduce.py: per-run collection and the mean ± std table, on hand-made run directories."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "reproduce.py"


def _load():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(root, name, acc, gap, kl):
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "reward": 0.5, "kl_prcp": kl, "hacking_warning": ""}) + "\n"
                                               for i in range(12)))
    bench = {"avg_at_k": acc, "masked": {"0.6": {"perception_gap": gap}},
             "errors": {"perception_share_of_errors": 0.5}}
    (run / "eval" / "summary.json").write_text(json.dumps({"benchmarks": {"synthetic-all": bench}}))
    return run


def test_report_gives_mean_and_std_over_seeds(tmp_path):
    reproduce = _load()
    rows = [reproduce.collect(_run(tmp_path, f"papo_g-x-s{i}", acc, 0.1, 0.2), "PAPO-G", "papo_g", [], i)
            for i, acc in enumerate([0.30, 0.40])]
    rows.append(reproduce.collect(_run(tmp_path, "grpo-y-s0", 0.25, 0.05, 0.0), "GRPO", "grpo", [], 0))
    md, js = tmp_path / "docs" / "RESULTS.md", tmp_path / "docs" / "results" / "reproduction.json"
    md.parent.mkdir()
    md.write_text("# Results\n\nwritten by hand, kept\n")
    reproduce.report(rows, md, js, tmp_path)
    text = md.read_text()
    assert "written by hand, kept" in text
    assert "| PAPO-G | 2 | 35.0 ± 7.1 | 10.0 ± 0.0 | 50.0 ± 0.0 | 0.200 | 0 |" in text  # std of 30, 40 = 7.07
    assert "| GRPO | 1 | 25.0 | 5.0 | 50.0 | 0.000 | 0 |" in text
    assert json.loads(js.read_text())["runs"][0]["heldout_avg_at_k"] == 0.30
    reproduce.report(rows, md, js, tmp_path)  # re-running replaces the generated part only
    assert md.read_text().count("| method |") == 1
    assert (md.parent / "results" / "reward.png").is_file()
