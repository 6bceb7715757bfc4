"""Fuzzing the two places untrusted bytes enter papo: dataset rows and model outputs.

CI runs a few hundred generated cases. The full campaign (10,000+ rows and 10,000+ outputs) with its figures:

    PAPO_FUZZ_SCALE=25 PAPO_FUZZ_REPORT=benchmarks/results/fuzz.json python -m pytest tests/test_fuzz.py -q
"""

import io
import json
import math
import os
import struct
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from papo.data.loaders import DataError, load_samples
from papo.data.sample import ANSWER_TYPES, IMAGE_PLACEHOLDER
from papo.rewards import score_responses

SCALE = float(os.environ.get("PAPO_FUZZ_SCALE", "1"))
STATS = {"rows": 0, "rows_kept": 0, "skip_reasons": Counter(), "max_row_batch_s": 0.0,
         "outputs": 0, "max_output_batch_s": 0.0, "max_output_s": 0.0, "output_kinds": Counter()}
KNOWN_REASONS = {"missing prompt", "missing answer", "wrong type", "placeholder/image mismatch", "missing image file",
                 "undecodable image", "zero-size image", "image too large", "bad meta", "invalid JSON line"}
def fuzz(n: int):
    return settings(max_examples=int(n * SCALE), deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)



@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if path := os.environ.get("PAPO_FUZZ_REPORT"):
        Path(path).write_text(json.dumps({k: dict(v) if isinstance(v, Counter) else round(v, 3) if isinstance(v, float) else v
                                          for k, v in STATS.items()}, indent=1))


# ------------------------------------------------------------------ image payloads


def _png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares any size (0 x 5, 10^5 x 10^5) with one tiny IDAT: headers are all a bomb needs."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


GOOD = [_png((8, 8)), _png((1, 1), "L"), _png((5, 3), "RGBA"), _png((4, 4), "P"), _png((3, 3), "I;16"), _jpeg()]
BAD = [b"", b"\x00" * 64, GOOD[0][: len(GOOD[0]) // 2], _jpeg()[:40], b"GIF89a" + b"\xff" * 30, b"not an image",
       _png_header(0, 5), _png_header(100_000, 100_000), _png_header(9000, 9000), "é".encode() * 100]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "good.png").write_bytes(GOOD[0])
    (root / "bad.png").write_bytes(BAD[2])
    (root / "dir.png").mkdir()
    return root


text = st.text(st.characters(codec="utf-8"), max_size=40) | st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                                                                  exclude_categories=("Cs",)), max_size=20)
garbage = st.none() | st.booleans() | st.integers() | st.floats() | text | st.binary(max_size=20) | st.lists(st.integers(), max_size=3)
good_image = st.sampled_from(GOOD) | st.builds(lambda b: {"bytes": b, "path": None}, st.sampled_from(GOOD)) | st.just("good.png")
image = (good_image | good_image | st.sampled_from(BAD) | st.builds(lambda b: {"bytes": b, "path": None}, st.sampled_from(BAD))
         | st.sampled_from(["bad.png", "dir.png", "missing.png", "", "/dev/null", {"path": "good.png"}, {}])
         | st.builds(lambda s: Image.new("RGB", s), st.tuples(st.integers(1, 6), st.integers(1, 6))) | garbage)
images = st.none() | image | st.lists(image, max_size=3)


@st.composite
def prompts(draw):
    parts = draw(st.lists(text, min_size=1, max_size=4))
    return IMAGE_PLACEHOLDER.join(parts) if draw(st.booleans()) else draw(text | garbage)


@st.composite
def rows(draw):
    kind = draw(st.sampled_from(["papo", "papo", "virl", "chat", "random", "not a dict"]))
    if kind == "not a dict":
        return draw(garbage)
    row = {}
    if kind in ("papo", "virl"):
        imgs = draw(st.lists(image, max_size=3))
        if draw(st.integers(0, 3)) > 0:  # well-formed apart from what the images hold: the kept path gets exercised
            row["problem" if kind == "papo" else "question"] = IMAGE_PLACEHOLDER * len(imgs) + draw(text) + "?"
            row["answer"] = draw(text.filter(str.strip) | st.integers())
        else:
            row["problem" if kind == "papo" else "question"] = draw(prompts())
            row["answer"] = draw(text | garbage)
        row["images" if kind == "papo" else "image"] = imgs if imgs or draw(st.booleans()) else draw(images)
    elif kind == "chat":
        turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]), "content": prompts()})
        row[draw(st.sampled_from(["messages", "conversations"]))] = draw(st.lists(turn, max_size=3) | garbage)
        row["images"] = draw(images)
    extra_keys = st.lists(st.sampled_from(["id", "meta", "answer_type", "task", "problem", "answer", "images", "zz"]), max_size=3)
    for key in draw(extra_keys) if draw(st.booleans()) else []:
        value = draw(st.sampled_from([None, "", "{}", "[1]", "{bad json", "count"] + list(ANSWER_TYPES)) | garbage)
        row[key] = value
    return row


def _reason_kind(reason: str) -> str:
    return reason.split(": ", 1)[0].split(" (")[0]


@fuzz(80)
@given(batch=st.lists(rows(), min_size=1, max_size=12))
def test_generated_rows_never_crash_and_every_skip_has_a_known_reason(batch, image_files, monkeypatch):
    monkeypatch.chdir(image_files)  # relative image paths resolve against the working directory
    t = time.perf_counter()
    result = load_samples(batch)
    STATS["max_row_batch_s"] = max(STATS["max_row_batch_s"], time.perf_counter() - t)
    report = result.report
    assert report.rows_read == len(batch) == report.rows_kept + len(report.skipped)
    STATS["rows"] += len(batch)
    STATS["rows_kept"] += report.rows_kept
    for row_id, reason in report.skipped:
        kind = _reason_kind(reason)
        assert kind in KNOWN_REASONS, reason
        STATS["skip_reasons"][kind] += 1
    for sample in result.samples:  # what is kept is usable: placeholders match, every image decodes
        assert isinstance(sample.prompt, str) and sample.prompt.count(IMAGE_PLACEHOLDER) == len(sample.images)
        assert all(im.width > 0 for im in sample.load_images(None, None))
        sample.formatted_prompt()
    if report.skipped:
        first_bad = int(report.skipped[0][0])
        with pytest.raises(DataError, match=rf"^<memory> row {first_bad}: "):
            load_samples(batch, strict=True)


@fuzz(20)
@given(lines=st.lists(st.one_of(rows().map(lambda r: json.dumps(r, default=repr)), text.map(str)), min_size=1, max_size=8))
def test_generated_jsonl_files_load_or_name_the_bad_line(lines, tmp_path_factory):
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8")
    report = load_samples(str(path)).report
    assert report.rows_kept + len(report.skipped) == report.rows_read
    assert all(_reason_kind(reason) in KNOWN_REASONS for _, reason in report.skipped)


# ------------------------------------------------------------------ model outputs for the graders


def _nest(open_, close, n, core="1"):
    return open_ * n + core + close * n


pathological = st.one_of(
    st.integers(1, 200_000).map(lambda n: _nest("\\boxed{", "}", n)),
    st.integers(1, 100_000).map(lambda n: "\\boxed{" + "{" * n),
    st.integers(1, 60).map(lambda n: "\\boxed{" + _nest("9^{", "}", n, "9") + "}"),
    st.integers(1, 2000).map(lambda n: "\\boxed{" + _nest("\\frac{1}{", "}", n) + "}"),
    st.integers(1, 2000).map(lambda n: "\\boxed{" + _nest("\\sqrt{", "}", n, "2") + "}"),
    st.integers(1, 100_000).map(lambda n: "\\boxed{" + "+".join(["1"] * n) + "}"),
    st.integers(1, 1_000_000).map(lambda n: "\\boxed{" + "7" * n + "}"),
    st.integers(1, 1000).map(lambda n: "\\boxed{\\begin{pmatrix}" + "1&" * n + "1\\end{pmatrix}}"),
    st.sampled_from(["\\boxed{9**9**9**9}", "\\boxed{().__class__}", "\\boxed{().__ⅽⅼass__}", "\\boxed{__import__('os')}",
                     "\\boxed{x'or'__import__(\"os\").system(\"touch pwned\")'}", "\\boxed{\\x00}", "\\boxed{}", "\\boxed",
                     "<think>" * 1000, "\\boxed{" * 100_000, "}" * 100_000, "\\boxed{1/0}", "\\boxed{oo-oo}", "\\boxed{nan}"]),
)
outputs = st.one_of(
    text, pathological,
    st.tuples(text, text, text).map(lambda t: f"<think>{t[0]}</think>{t[1]} \\boxed{{{t[2]}}}"),
    st.lists(st.sampled_from(["\\boxed{", "}", "{", "\\frac", "^", "\\", "<think>", "</think>", "1", "x", "\\sqrt", " "]),
             max_size=200).map("".join),
)
answers = st.one_of(st.integers(-10**6, 10**6).map(str), st.sampled_from(["1/2", "\\frac{1}{2}", "x^2+1", "A", "B, C",
                                                                          "yes", "3.14", "\\sqrt{2}", "0.5"]), text)


@fuzz(100)
@given(cases=st.lists(st.tuples(outputs, answers, st.sampled_from(list(ANSWER_TYPES))), min_size=1, max_size=20))
def test_generated_outputs_grade_without_crash_hang_or_code_execution(cases, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.getbasetemp())  # where a payload's "touch pwned" would land
    t = time.perf_counter()
    scores = score_responses([c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases])
    elapsed = time.perf_counter() - t
    STATS["outputs"] += len(cases)
    STATS["max_output_batch_s"] = max(STATS["max_output_batch_s"], elapsed)
    STATS["max_output_s"] = max(STATS["max_output_s"], elapsed / len(cases))
    STATS["output_kinds"].update(c[2] for c in cases)
    assert len(scores) == len(cases)
    for score in scores:
        assert math.isfinite(score["overall"]) and 0.0 <= score["overall"] <= 1.0
    assert not Path("pwned").exists()
