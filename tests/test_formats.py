"""Writers of papo.data.formats, checked by reading the files back raw and through load_samples."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from papo.data.formats import encode_image, write_papo_eval, write_papo_train
from papo.data.images import to_rgb
from papo.data.loaders import load_samples
from papo.data.sample import PAPO_FORMAT_SUFFIX, Sample


def noise_image(seed: int, size=(56, 56), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode)


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    noise_image(seed).save(buf, format="JPEG")
    return buf.getvalue()


def pixels(image) -> np.ndarray:
    return np.asarray(to_rgb(image))


@pytest.fixture
def samples(tmp_path):
    png_file = tmp_path / "src" / "disk.png"
    png_file.parent.mkdir()
    noise_image(7).save(png_file)
    return [
        Sample("geo/1", "<image>What is the angle?", "30", [noise_image(1)], "math", "geo", {"facts": [1, 2]}),
        Sample("cmp-2", "<image> left, <image> right: which is larger?", "B", [noise_image(2), noise_image(3)],
               "choice", "compare", {"solution": "B because", "nested": {"k": "v"}}),
        Sample("jpg-3", "<image>Count the dots.", "4", [{"bytes": jpeg_bytes(4), "path": "orig.jpg"}], "int"),
        Sample("file-4", "<image>Name the colour.", "red", [str(png_file)], "word", "colour"),
        Sample("rgba-5", "<image>Transparent?", "no", [noise_image(5, (30, 40), "RGBA")], "exact"),
    ]


def assert_same(loaded: list[Sample], written: list[Sample]) -> None:
    assert [s.id for s in loaded] == [s.id for s in written]
    for got, want in zip(loaded, written):
        assert (got.prompt, got.answer, got.task, got.answer_type) == (want.prompt, want.answer, want.task,
                                                                      want.answer_type)
        assert got.meta == want.meta
        assert len(got.images) == len(want.images)
        for a, b in zip(got.images, want.images):
            np.testing.assert_array_equal(pixels(a), pixels(b))


def test_train_round_trip(tmp_path, samples):
    path = write_papo_train(samples, tmp_path / "out")
    assert path == tmp_path / "out" / "data.parquet"
    schema = pq.read_schema(path)
    assert schema.names[:3] == ["problem", "answer", "images"]
    assert schema.field("images").type == pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    rows = pq.read_table(path).to_pylist()
    assert [im["path"] for im in rows[1]["images"]] == ["cmp-2-0.png", "cmp-2-1.png"]
    assert rows[0]["images"][0]["path"] == "geo_1-0.png"  # ids made file-name safe
    assert rows[2]["images"][0] == {"bytes": samples[2].images[0]["bytes"], "path": "jpg-3-0.jpg"}  # bytes kept
    assert rows[3]["images"][0]["bytes"] == Path(samples[3].images[0]).read_bytes()
    assert json.loads(rows[1]["meta"]) == samples[1].meta
    assert PAPO_FORMAT_SUFFIX not in rows[0]["problem"]

    result = load_samples(tmp_path / "out")
    assert result.report.rows_kept == len(samples) and not result.report.skipped
    assert_same(result.samples, samples)
    # only undecoded references are kept
    assert all(isinstance(im, dict) and isinstance(im["bytes"], bytes) for s in result.samples for im in s.images)


def test_eval_round_trip(tmp_path, samples):
    path = write_papo_eval(samples, tmp_path / "eval")
    assert path == tmp_path / "eval" / "data.json"
    records = json.loads(path.read_text())
    assert len(records) == len(samples)
    first = records[0]
    assert first["messages"][0] == {"role": "user", "content": "<image>What is the angle?\n\n" + PAPO_FORMAT_SUFFIX}
    assert first["messages"][1] == {"role": "assistant", "content": "30"}
    for record in records:
        for rel in record["images"]:
            assert not Path(rel).is_absolute() and rel.startswith("images/")
            assert (path.parent / rel).is_file()
    assert records[2]["images"] == ["images/jpg-3-0.jpg"]
    assert (path.parent / records[2]["images"][0]).read_bytes() == samples[2].images[0]["bytes"]

    result = load_samples(path)
    assert_same(result.samples, samples)
    assert all(PAPO_FORMAT_SUFFIX not in s.prompt for s in result.samples)
    assert all(Path(im).is_absolute() for s in result.samples for im in s.images)


def test_eval_paths_survive_moving_the_directory(tmp_path, samples):
    write_papo_eval(samples[:2], tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    result = load_samples(tmp_path / "b")
    assert_same(result.samples, samples[:2])


def test_empty_and_duplicate_ids(tmp_path):
    assert pq.read_table(write_papo_train([], tmp_path / "empty")).num_rows == 0
    assert json.loads(write_papo_eval([], tmp_path / "empty").read_text()) == []
    twins = [Sample("x", "<image>a", "1", [noise_image(1)]), Sample("x", "<image>b", "2", [noise_image(2)])]
    records = json.loads(write_papo_eval(twins, tmp_path / "dup").read_text())
    assert records[0]["images"] != records[1]["images"]
    loaded = load_samples(tmp_path / "dup").samples
    np.testing.assert_array_equal(pixels(loaded[1].images[0]), pixels(twins[1].images[0]))


@pytest.mark.parametrize("writer", [write_papo_train, write_papo_eval])
def test_failed_write_keeps_previous_file(tmp_path, writer, samples):
    path = writer(samples[:1], tmp_path)
    before = path.read_bytes()

    def rows():
        yield samples[1]
        raise RuntimeError("generator died mid-way")

    with pytest.raises(RuntimeError):
        writer(rows(), tmp_path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(TypeError):
        writer([Sample("bad", "<image>?", "1", [42])], tmp_path)
    assert path.read_bytes() == before


def test_encode_image_kinds(tmp_path):
    data, ext = encode_image(noise_image(1))
    assert ext == ".png" and data.startswith(b"\x89PNG")
    jpg = jpeg_bytes(2)
    assert encode_image(jpg) == (jpg, ".jpg")
    assert encode_image({"bytes": jpg, "path": "x.png"}) == (jpg, ".jpg")  # named after the content
    cmyk = noise_image(3).convert("CMYK")
    assert encode_image(cmyk)[1] == ".png"
    with pytest.raises(FileNotFoundError):
        encode_image(str(tmp_path / "none.png"))
