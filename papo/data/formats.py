"""Writers for the two on-disk layouts PAPO's code reads; ``papo.data.loaders`` reads both back.

* PAPO train (``PAPOGalaxy/PAPO_ViRL39K_train``): one parquet file, columns ``problem`` (prompt with one
  ``<image>`` per image, no format suffix), ``answer``, ``images`` (list of ``{bytes, path}`` structs with the
  encoded image embedded), plus our ``id``, ``task``, ``answer_type`` and ``meta`` (JSON string).
* PAPO-Eval (LLaMA-Factory "sharegpt"): ``data.json``, a list of ``{"messages": [user, assistant], "images":
  [...]}`` records whose user turn is the *formatted* prompt (suffix included) and whose image paths are
  relative to the directory of ``data.json``; the image files live under ``images/`` next to it.

Both write to a temporary file in the target directory and ``os.replace`` it into place, so a crash leaves
either the previous file or none, never a truncated one that a later run would half-read.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from papo.data.images import to_rgb
from papo.data.sample import Sample, format_prompt

TRAIN_FILE = "data.parquet"
EVAL_FILE = "data.json"
EVAL_IMAGE_DIR = "images"



def train_schema():
    """The PAPO train parquet schema; PAPO's three columns first, as in the released parquet.
    (pyarrow is imported here so that machines that never write parquet need not install it.)"""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema([
        ("problem", pa.string()), ("answer", pa.string()), ("images", pa.list_(image)), ("id", pa.string()),
        ("task", pa.string()), ("answer_type", pa.string()),
        ("meta", pa.string()),  # json.dumps(sample.meta)
    ])


_ROWS_PER_BATCH = 256  # bounds the image bytes held in memory while writing
_PNG_SAFE_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_EXT_BY_FORMAT = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}


# ---------------------------------------------------------------- image encoding


def encode_image(image: Any) -> tuple[bytes, str]:
    """(encoded bytes, file extension) of anything ``to_rgb`` reads. Already-encoded bytes (a ``{bytes, path}``
    dict, raw bytes, a file) are kept byte for byte; PIL images and arrays become PNG (lossless)."""
    if isinstance(image, dict):
        if image.get("bytes"):
            return bytes(image["bytes"]), _sniff_ext(image["bytes"], image.get("path"))
        if image.get("path"):
            image = image["path"]
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), _sniff_ext(image, None)
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file not found: {image}")
        data = Path(image).read_bytes()
        return data, _sniff_ext(data, str(image))
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot encode an image from {type(image).__name__}")
    if image.mode not in _PNG_SAFE_MODES:  # e.g. CMYK, YCbCr: PNG cannot hold them
        image = to_rgb(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def _sniff_ext(data: bytes | bytearray | memoryview, path: str | None) -> str:
    # name files after what the bytes are, not what a caller called them
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:  # reads the header only
            ext = _EXT_BY_FORMAT.get(im.format or "")
    except Exception:  # undecodable bytes are written as they are; the loader reports them
        ext = None
    return ext or (Path(path).suffix.lower() if path and Path(path).suffix else ".bin")


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.-]", "_", text).strip("._") or "sample"


def _image_names(sample: Sample, used: set[str]) -> Iterator[tuple[int, str, bytes]]:
    """(index, unique file name ``<id>-<i><ext>``, bytes) for each image of ``sample``."""
    stem = _safe_name(sample.id)
    for i, image in enumerate(sample.images):
        data, ext = encode_image(image)
        name, n = f"{stem}-{i}{ext}", 1
        while name in used:  # duplicate ids must not overwrite each other's files
            name, n = f"{stem}-{i}-{n}{ext}", n + 1
        used.add(name)
        yield i, name, data


def _meta_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"meta value of type {type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------- atomic writes


def _atomic_target(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return fd, Path(tmp)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- writers


def write_papo_train(samples: Iterable[Sample], out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/data.parquet`` in the PAPO train schema (``train_schema()``); returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = train_schema()
    path = Path(out_dir) / TRAIN_FILE
    fd, tmp = _atomic_target(path)
    os.close(fd)  # pyarrow opens the path itself
    used: set[str] = set()
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            batch: list[dict[str, Any]] = []
            for sample in samples:
                images = [{"bytes": data, "path": name} for _, name, data in _image_names(sample, used)]
                batch.append(
                    {
                        "problem": sample.prompt,
                        "answer": str(sample.answer),
                        "images": images,
                        "id": sample.id,
                        "task": sample.task,
                        "answer_type": sample.answer_type,
                        "meta": _meta_json(sample.meta),
                    }
                )
                if len(batch) >= _ROWS_PER_BATCH:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            # an empty table still gives the file its schema when there were no samples
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_papo_eval(samples: Iterable[Sample], out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/data.json`` (sharegpt records) and ``out_dir/images/*``; returns the json path."""
    out_dir = Path(out_dir)
    image_dir = out_dir / EVAL_IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    records = []
    for sample in samples:
        rel_paths = []
        for _, name, data in _image_names(sample, used):
            # images go first and data.json last, so data.json never names an image not yet on disk
            _write_bytes_atomic(image_dir / name, data)
            rel_paths.append(f"{EVAL_IMAGE_DIR}/{name}")
        records.append(
            {
                "messages": [
                    {"role": "user", "content": format_prompt(sample.prompt)},
                    {"role": "assistant", "content": str(sample.answer)},
                ],
                "images": rel_paths,
                "id": sample.id,
                "task": sample.task,
                "answer_type": sample.answer_type,
                "meta": json.loads(_meta_json(sample.meta)),  # same JSON normalisation as the train writer
            }
        )
    path = out_dir / EVAL_FILE
    _write_bytes_atomic(path, json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8"))
    return path
