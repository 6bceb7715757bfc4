import json

import numpy as np
from PIL import Image

from papo.cli import main
from papo.data.loaders import load_samples
from papo.data.synthetic import SyntheticDataset


def test_generate_papo_train_round_trips(tmp_path, capsys):
    out = tmp_path / "train"
    assert main(["data", "generate", "--task", "count+maze", "--n", "6", "--split", "val", "--seed", "3",
                 "--size", "224", "--out", str(out)]) == 0
    loaded = load_samples(str(out)).samples
    expected = SyntheticDataset("count+maze", split="val", n=6, seed=3, size=224)
    assert [s.id for s in loaded] == [s.id for s in expected]
    for got, want in zip(loaded, expected):
        assert (got.prompt, got.answer, got.answer_type, got.task) == (want.prompt, want.answer, want.answer_type, want.task)
        assert got.meta["solution"] == want.meta["solution"]
        np.testing.assert_array_equal(np.asarray(got.load_images(None, None)[0]), np.asarray(want.images[0]))


def test_generate_papo_eval_layout(tmp_path):
    out = tmp_path / "eval"
    assert main(["data", "generate", "--task", "clock", "--n", "3", "--split", "test", "--format", "papo-eval",
                 "--size", "224", "--out", str(out)]) == 0
    records = json.loads((out / "data.json").read_text())
    assert len(records) == 3
    for rec in records:
        user, assistant = rec["messages"]
        assert user["content"].startswith("<image>") and user["content"].endswith("\\boxed{}.")
        assert not rec["images"][0].startswith("/") and (out / rec["images"][0]).is_file()
    assert [s.answer for s in load_samples(str(out / "data.json")).samples] == [r["messages"][1]["content"] for r in records]


def test_knob_and_bad_arguments(tmp_path, capsys):
    assert main(["data", "generate", "--task", "maze", "--n", "2", "--knob", "grid=8", "--size", "224",
                 "--out", str(tmp_path / "m")]) == 0
    assert main(["data", "generate", "--task", "maze", "--n", "2", "--knob", "grid", "--out", str(tmp_path)]) == 2
    assert "KEY=INTEGER" in capsys.readouterr().err
    assert main(["data", "generate", "--task", "cats", "--n", "2", "--out", str(tmp_path)]) == 2
    assert "unknown synthetic task" in capsys.readouterr().err


def test_preview_writes_a_contact_sheet(tmp_path):
    out = tmp_path / "sheet.png"
    assert main(["data", "preview", "--task", "bar_chart", "--n", "5", "--out", str(out)]) == 0
    sheet = Image.open(out)
    assert sheet.width == 4 * (2 * 224 + 8) and sheet.height > 2 * 224


def test_check_reports_kept_and_skipped_rows(tmp_path, capsys):
    out = tmp_path / "d"
    main(["data", "generate", "--task", "count", "--n", "4", "--size", "224", "--format", "papo-eval", "--out", str(out)])
    records = json.loads((out / "data.json").read_text())
    records[1]["messages"][1]["content"] = ""  # missing answer
    (out / records[2]["images"][0]).unlink()  # missing image file
    (out / "data.json").write_text(json.dumps(records))
    capsys.readouterr()
    assert main(["data", "check", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 of 4 rows kept" in text and "missing answer" in text
    assert main(["data", "check", str(out), "--strict"]) == 2
    assert "row" in capsys.readouterr().err
