"""load_samples on files written here in each official schema, bad rows, the hub path (offline) and datasets."""

import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from papo.data.hub import select_split_files
from papo.data.images import to_rgb
from papo.data.loaders import ColumnMap, DataError, LoadReport, filter_by_prompt_length, load_samples
from papo.data.sample import PAPO_FORMAT_SUFFIX, Sample

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(seed: int, size=(28, 28)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def same_pixels(ref, data: bytes) -> bool:
    return np.array_equal(np.asarray(to_rgb(ref)), np.asarray(to_rgb(data)))


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("problem", pa.string()), ("answer", pa.string()), ("images", pa.list_(IMAGE_STRUCT)),
                        ("category", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def papo_row(i: int, n_images: int = 1, **kw) -> dict:
    row = {"problem": "<image>" * n_images + f"Question {i}?", "answer": str(i),
           "images": [{"bytes": png(10 * i + k), "path": f"img{i}-{k}.png"} for k in range(n_images)],
           "category": "(GradeSchool) Geometric"}
    row.update(kw)
    return row


# ---------------------------------------------------------------- official schemas


def test_papo_train_parquet(tmp_path):
    rows = [papo_row(0), papo_row(1, n_images=2), papo_row(2)]
    path = write_parquet(tmp_path / "train.parquet", rows)
    result = load_samples(path)
    assert result.report.summary() == "train.parquet: 3 of 3 rows kept"
    s = result.samples[1]
    assert (s.id, s.prompt, s.answer, s.answer_type) == ("train-1", "<image><image>Question 1?", "1", "math")
    assert s.meta == {"category": "(GradeSchool) Geometric"}  # unknown columns carried in meta
    assert s.images[1]["path"] == "img1-1.png" and same_pixels(s.images[1], png(11))
    assert [im.size for im in s.load_images(None, None)] == [(28, 28), (28, 28)]


def test_virl39k_jsonl_with_relative_paths(tmp_path, monkeypatch):
    root = tmp_path / "ViRL39K"
    (root / "images").mkdir(parents=True)
    for i in range(2):
        (root / "images" / f"Processed-{i}-0.jpg").write_bytes(png(i))
    rows = [{"question": "<image>Find x.", "answer": "\\boxed{3}", "image": ["images/Processed-0-0.jpg"],
             "qid": "q0", "category": "math", "source": "MMK12", "PassRate_7BBase": 0.25},
            {"question": "<image>Which?", "answer": "\\boxed{A}", "image": "images/Processed-1-0.jpg", "qid": "q1"}]
    (root / "39Krelease.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    monkeypatch.chdir(tmp_path)  # paths resolve against the file, not the cwd
    result = load_samples(root / "39Krelease.jsonl")
    first, second = result.samples
    assert first.prompt == "<image>Find x." and first.answer == "\\boxed{3}"
    assert first.meta == {"qid": "q0", "category": "math", "source": "MMK12", "PassRate_7BBase": 0.25}
    assert first.images == [str((root / "images" / "Processed-0-0.jpg").resolve())]
    assert len(second.images) == 1 and same_pixels(second.images[0], png(1))  # single image -> list


def test_papo_eval_sharegpt(tmp_path):
    # LLaMA-Factory layout: <root>/data/<split>.json with images "./data/images/<folder>/<file>" relative to <root>
    folder = tmp_path / "data" / "images" / "MathVista"
    folder.mkdir(parents=True)
    (folder / "1.png").write_bytes(png(1))
    (folder / "2.png").write_bytes(png(2))
    records = [
        {"messages": [{"role": "user", "content": "<image>How many?\n\n" + PAPO_FORMAT_SUFFIX},
                      {"role": "assistant", "content": "3"}], "images": ["./data/images/MathVista/1.png"]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "<image>Choices: A. 1 B. 2\n\n" + PAPO_FORMAT_SUFFIX},
                      {"role": "assistant", "content": "B"}], "images": ["./data/images/MathVista/2.png"]},
    ]
    (tmp_path / "data" / "AI4Math_MathVista.json").write_text(json.dumps(records))
    result = load_samples(tmp_path / "data" / "AI4Math_MathVista.json")
    assert [s.prompt for s in result.samples] == ["<image>How many?", "<image>Choices: A. 1 B. 2"]
    assert [s.answer for s in result.samples] == ["3", "B"]
    assert [s.id for s in result.samples] == ["AI4Math_MathVista-0", "AI4Math_MathVista-1"]
    assert same_pixels(result.samples[1].images[0], png(2))


def test_conversations_variant(tmp_path):
    (tmp_path / "x.png").write_bytes(png(5))
    data = {"data": [{"conversations": [{"from": "human", "value": "<image>Count."}, {"from": "gpt", "value": 7}],
                      "images": ["x.png"], "id": "c0", "task": "count", "answer_type": "int",
                      "meta": json.dumps({"truth": 7})}]}
    (tmp_path / "conv.json").write_text(json.dumps(data))
    (s,) = load_samples(tmp_path / "conv.json").samples
    assert (s.id, s.prompt, s.answer, s.task, s.answer_type, s.meta) == ("c0", "<image>Count.", "7", "count",
                                                                         "int", {"truth": 7})


def test_column_map_and_placeholders():
    rows = [{"q": "What colour?", "gt": "red", "pic": png(1), "uid": 11, "label": "ignored"},
            {"q": "<image>Shape?", "gt": "circle", "pic": {"bytes": png(2), "path": None}, "uid": 12}]
    columns = ColumnMap(prompt="q", answer="gt", images="pic", id="uid")
    result = load_samples(rows, columns=columns)
    assert [s.id for s in result.samples] == ["12"]  # row 0 has no <image>
    result = load_samples(rows, columns=columns, add_missing_placeholders=True)
    assert [(s.id, s.prompt) for s in result.samples] == [("11", "<image>What colour?"), ("12", "<image>Shape?")]
    assert result.samples[0].meta == {"label": "ignored"}
    assert result.samples[0].images == [{"bytes": png(1), "path": None}]


def test_directory_layouts(tmp_path):
    for name in ("b.parquet", "a.parquet"):
        write_parquet(tmp_path / "shards" / name, [papo_row(ord(name[0]))])
    assert [s.answer for s in load_samples(tmp_path / "shards").samples] == ["97", "98"]  # sorted file order
    write_parquet(tmp_path / "nested" / "data" / "data.parquet", [papo_row(1), papo_row(2), papo_row(3)])
    result = load_samples(tmp_path / "nested", limit=2)
    assert result.report.source == "nested/data/data.parquet"
    assert [s.id for s in result.samples] == ["nested-0", "nested-1"] and result.report.rows_read == 2
    for split in ("train", "test"):
        write_parquet(tmp_path / "splits" / "data" / f"{split}-00000-of-00001.parquet", [papo_row(len(split))])
    assert [s.answer for s in load_samples(tmp_path / "splits", split="test").samples] == ["4"]


def test_unknown_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_samples(str(tmp_path / "missing" / "train.parquet"))
    with pytest.raises(TypeError):
        load_samples(42)


# ---------------------------------------------------------------- bad rows


def bad_rows(tmp_path: Path) -> list:
    truncated = png(3, size=(64, 64))
    return [
        {"problem": "<image>ok", "answer": "1", "images": [png(1)]},
        {"problem": "<image>corrupt", "answer": "1", "images": [b"not an image at all"]},
        {"problem": "<image>truncated", "answer": "1", "images": [truncated[: len(truncated) // 2]]},
        {"problem": "<image>missing file", "answer": "1", "images": [str(tmp_path / "gone.png")]},
        {"problem": "<image><image>mismatch", "answer": "1", "images": [png(1)]},
        {"problem": "<image>no answer", "answer": "  ", "images": [png(1)]},
        {"problem": "<image>bad type", "answer": "1", "images": [png(1)], "answer_type": "integer"},
        {"problem": "<image>images int", "answer": "1", "images": 5},
        {"messages": "not a list", "images": []},
        {"problem": "<image>zero", "answer": "1", "images": [Image.new("RGB", (0, 0))]},
        {"problem": "", "answer": "1"},
        {"problem": "<image>no answer either", "images": [png(1)]},
        {"problem": "text only", "answer": 0},
    ]


def test_bad_rows_skipped_and_reported(tmp_path):
    result = load_samples(bad_rows(tmp_path), name="bad")
    assert [s.prompt for s in result.samples] == ["<image>ok", "<image>bad type", "text only"]
    assert result.samples[2].answer == "0"
    # a dataset's own answer_type vocabulary (MathVista: integer/float/...) is kept and graded with mathruler
    assert result.samples[1].answer_type == "math" and result.samples[1].meta["source_answer_type"] == "integer"
    report = result.report
    assert (report.rows_read, report.rows_kept, len(report.skipped)) == (13, 3, 10)
    reasons = dict(report.skipped)
    assert reasons["1"].startswith("undecodable image") and reasons["2"].startswith("undecodable image")
    assert reasons["3"].startswith("missing image file") and "gone.png" in reasons["3"]
    assert reasons["4"].startswith("placeholder/image mismatch")
    assert reasons["9"].startswith("zero-size image")
    assert report.summary() == (
        "bad: 3 of 13 rows kept; skipped 10: undecodable image x2 (rows 1, 2), missing image file x1 (row 3), "
        "placeholder/image mismatch x1 (row 4), missing answer x2 (rows 5, 11), "
        "wrong type x2 (rows 7, 8), zero-size image x1 (row 9), missing prompt x1 (row 10)"
    )


def test_strict_raises_naming_the_row(tmp_path):
    rows = bad_rows(tmp_path)
    write_parquet(tmp_path / "p.parquet", [papo_row(0), papo_row(1, images=[{"bytes": b"junk", "path": "j.png"}])])
    with pytest.raises(DataError, match=r"^p.parquet row 1: undecodable image"):
        load_samples(tmp_path / "p.parquet", strict=True)
    with pytest.raises(DataError, match=r"row 1: undecodable image"):
        load_samples(rows, strict=True)
    assert len(load_samples(rows[:1], strict=True).samples) == 1


def test_invalid_jsonl_line_and_bad_json_file(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"problem": "q", "answer": "a"}\n{oops\n[1, 2]\n')
    report = load_samples(tmp_path / "d.jsonl").report
    assert report.rows_kept == 1 and [r for r, _ in report.skipped] == ["1", "2"]
    assert "invalid JSON line" in report.summary()
    (tmp_path / "d.json").write_text('{"rows": []}')
    with pytest.raises(DataError):
        load_samples(tmp_path / "d.json")


def test_summary_lists_at_most_ten_ids():
    report = LoadReport("x", rows_read=12, rows_kept=0, skipped=[(str(i), "missing answer") for i in range(12)])
    assert report.summary() == (
        "x: 0 of 12 rows kept; skipped 12: missing answer x12 (rows 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...)"
    )


def test_filter_by_prompt_length():
    samples = [Sample(f"s{i}", "word " * i, "a") for i in range(1, 6)]
    kept, report = filter_by_prompt_length(samples, lambda s: len(s.prompt.split()), 3)
    assert [s.id for s in kept] == ["s1", "s2", "s3"]
    assert report.skipped == [("s4", "prompt longer than 3 tokens (4)"), ("s5", "prompt longer than 3 tokens (5)")]
    assert report.summary().endswith("skipped 2: prompt longer than 3 tokens x2 (rows s4, s5)")


# ---------------------------------------------------------------- hub (offline) and datasets


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """An HF hub cache holding dataset repos, with every network path switched off."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    if "datasets" in sys.modules:  # imported earlier in this process: its config too was read at import
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", True)

    def add_repo(repo: str, files: dict[str, list[dict]]) -> None:
        commit = "0123456789abcdef0123456789abcdef01234567"
        repo_dir = cache / f"datasets--{repo.replace('/', '--')}"
        for rel, rows in files.items():
            write_parquet(repo_dir / "snapshots" / commit / rel, rows)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)

    return cache, add_repo


def test_hub_snapshot_fallback_offline(fake_hub, caplog):
    cache, add_repo = fake_hub
    add_repo("owner/name", {"data/train-00000-of-00001.parquet": [papo_row(0), papo_row(1)],
                            "data/test-00000-of-00001.parquet": [papo_row(9)]})
    with caplog.at_level(logging.INFO, logger="papo.data.hub"):
        result = load_samples("owner/name", cache_dir=cache)
    assert "snapshot_download + pyarrow" in caplog.text
    assert [s.answer for s in result.samples] == ["0", "1"]
    assert result.report.source == "owner/name@train" and result.samples[0].id == "name-train-0"
    assert same_pixels(result.samples[1].images[0], png(10))
    assert [s.answer for s in load_samples("owner/name@test", cache_dir=cache, use_datasets=False).samples] == ["9"]
    assert [s.answer for s in load_samples("owner/name", split="test", cache_dir=cache).samples] == ["9"]
    with pytest.raises(FileNotFoundError, match="splits found: test, train"):
        load_samples("owner/name", split="validation", cache_dir=cache, use_datasets=False)
    with pytest.raises(FileNotFoundError, match="owner/absent"):
        load_samples("owner/absent", cache_dir=cache, use_datasets=False)


def test_hub_default_cache_from_env_and_eval_split_names(fake_hub, monkeypatch):
    import huggingface_hub.constants

    cache, add_repo = fake_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    add_repo("owner/eval", {"data/AI4Math_MathVerse-00000-of-00001.parquet": [papo_row(1)],
                            "data/AI4Math_MathVerse_vision_dependent-00000-of-00001.parquet": [papo_row(2)]})
    result = load_samples("owner/eval@AI4Math_MathVerse", use_datasets=False)
    assert [s.answer for s in result.samples] == ["1"]


def test_select_split_files(tmp_path):
    names = [tmp_path / n for n in ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                                    "data/test-00000-of-00001.parquet", "data/train_small.parquet")]
    assert select_split_files(names, "train", root=tmp_path) == names[:2]
    assert select_split_files(names, "train_small", root=tmp_path) == names[3:]
    lone = [tmp_path / "39Krelease.parquet"]
    assert select_split_files(lone, "train", root=tmp_path) == lone  # one set of files: used whatever the split
    folders = [tmp_path / "train" / "0000.parquet", tmp_path / "test" / "0000.parquet"]
    assert select_split_files(folders, "test", root=tmp_path) == folders[1:]


def test_in_memory_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(
        [{"problem": "<image>Count.", "answer": 3, "images": [Image.open(io.BytesIO(png(1)))], "source": "s"},
         {"problem": "<image>Colour?", "answer": None, "images": [Image.open(io.BytesIO(png(2)))], "source": "s"}]
    )
    result = load_samples(ds)
    (s,) = result.samples
    assert (s.id, s.answer, s.meta) == ("dataset-0", "3", {"source": "s"})
    assert isinstance(s.images[0], dict) and same_pixels(s.images[0], png(1))  # stays encoded
    assert result.report.skipped == [("1", "missing answer")]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    assert len(load_samples(dd, split="test").samples) == 1


def test_synthetic_specs_go_through_the_same_entry_point():
    result = load_samples("synthetic:count+clock?n=4&size=224", split="val", limit=3)
    assert [s.task for s in result.samples] == ["count", "clock", "count"]
    assert all(s.meta["split"] == "val" for s in result.samples)
    assert "3 of 3 rows kept" in result.report.summary()


def test_rows_the_fuzzer_found_are_skipped_with_reasons():
    rows = [{"problem": "<image>?", "answer": "1", "images": ["x" * 5000]},  # name too long for the filesystem
            {"problem": "<image>?", "answer": "1", "images": ["~nosuchuser0/a.png"]},  # home of no user
            {"problem": "q?", "answer": "1", "answer_type": [0]}]  # unhashable answer_type
    report = load_samples(rows).report
    assert report.rows_kept == 0
    assert [r.split(":")[0] for _, r in report.skipped] == ["missing image file", "missing image file", "wrong type"]
    assert "(5000 characters)" in report.skipped[0][1]
