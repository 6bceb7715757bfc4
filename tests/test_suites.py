"""papo eval --suite papo-eval: the authors' layout, Table 1's arithmetic, and a run on a local copy."""

import io
import json
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from papo.cli import main
from papo.data.sample import PAPO_FORMAT_SUFFIX
from papo.evaluation.suites import SUITES, suite_files, suite_scores

SUITE = SUITES["papo-eval"]
# Table 1 of the paper (avg@8, %), in the suite's column order
GRPO_3B = [28.72, 59.34, 58.90, 57.24, 55.25, 38.14, 55.81, 25.66, 52.26]
PAPO_G_3B = [30.95, 61.38, 60.09, 57.39, 57.14, 38.67, 62.56, 27.11, 53.95]


def _summary(values):
    return {"benchmarks": {c: {"avg_at_k": v / 100} for (c, _), v in zip(SUITE.columns, values)}}


def test_table_1_arithmetic_matches_the_paper():
    grpo = suite_scores(_summary(GRPO_3B), SUITE)
    assert grpo["groups"]["General"] == pytest.approx(51.89, abs=0.005)
    assert grpo["groups"]["Vision-Dependent"] == pytest.approx(42.97, abs=0.005)
    assert grpo["overall"] == pytest.approx(47.92, abs=0.005)
    papo = suite_scores(_summary(PAPO_G_3B), SUITE, baseline=_summary(GRPO_3B))
    assert papo["delta_rel"]["General"] == pytest.approx(3.38, abs=0.01)  # the table rounds its inputs
    assert papo["delta_rel"]["Vision-Dependent"] == pytest.approx(5.60, abs=0.01)
    assert papo["delta_rel"]["overall"] == pytest.approx(4.36, abs=0.01)


def _png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, "PNG")
    return buf.getvalue()


def _suite_dir(root, zip_prefix="data/"):
    (root / "data").mkdir(parents=True)
    for i, (_, split) in enumerate(SUITE.columns):
        rows = {"messages": [[{"role": "user", "content": f"<image>How many red stars are there?\n\n{PAPO_FORMAT_SUFFIX}"},
                              {"role": "assistant", "content": str(i % 3)}]],
                "images": [[f"./data/images/{split}/0.png"]]}
        pq.write_table(pa.table(rows), root / "data" / f"{split}-00000-of-00001.parquet")
        prefix = zip_prefix if i % 2 == 0 else "images/"  # both archive layouts seen in the wild
        with zipfile.ZipFile(root / f"{split}_images.zip", "w") as z:
            z.writestr(f"{prefix}{'images/' if prefix == 'data/' else ''}{split}/0.png", _png((200, 30 * i, 40)))
    return root


def test_suite_files_unzip_images_where_the_rows_point(tmp_path):
    root = _suite_dir(tmp_path / "PAPO_eval")
    files = suite_files(SUITE, root)
    assert [c for c, _ in files] == [c for c, _ in SUITE.columns]
    for _, split in SUITE.columns:
        assert (root / "data" / "images" / split / "0.png").is_file()
    with zipfile.ZipFile(root / "AI4Math_MathVista_images.zip", "w") as z:
        z.writestr("../escape.png", b"x")
    (root / ".AI4Math_MathVista_images.unzipped").unlink()
    with pytest.raises(ValueError, match="outside the dataset directory"):
        suite_files(SUITE, root)
    (root / "data" / "We_Math-00000-of-00001.parquet").unlink()
    (root / "AI4Math_MathVista_images.zip").unlink()
    with pytest.raises(FileNotFoundError, match="We-Math"):
        suite_files(SUITE, root)


def test_papo_eval_suite_end_to_end_with_a_baseline(tmp_path, capsys):
    root = _suite_dir(tmp_path / "PAPO_eval")
    base = tmp_path / "base"
    base.mkdir()
    (base / "summary.json").write_text(json.dumps(_summary([50.0] * 9)))
    out = tmp_path / "run"
    assert main(["eval", "--suite", "papo-eval", "--suite-dir", str(root), "--baseline", str(base), "--k", "1",
                 "--max-new-tokens", "16", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["benchmarks"]) == [c for c, _ in SUITE.columns]
    assert all(b["n"] == 1 for b in summary["benchmarks"].values())  # every image resolved: no row skipped
    scores = summary["suite"]
    gains = [100 * (scores["columns"][c] / 50 - 1) for c, _ in SUITE.columns]
    assert scores["delta_rel"]["overall"] == pytest.approx(sum(gains) / 9)
    printed = capsys.readouterr().out
    assert "Vision-Dependent AVG" in printed and "Overall" in printed
    table = (out / "suite.md").read_text().splitlines()  # Table 1's layout: one row per model
    assert table[0].startswith("| Method | Geo3K | MathVista | We-Math | MMK12 | MathVerse | General AVG | LogicVista")
    assert table[3].startswith("| Δ%rel |") and table[3].endswith(f"| {scores['delta_rel']['overall']:+.2f} |")
    assert main(["eval", "--out", str(tmp_path / "x")]) == 2  # neither --data nor --suite
