"""Turn any dataset PAPO meets into ``Sample`` records, validating each row and reporting what was dropped.

Sources: a local ``.parquet`` / ``.json`` / ``.jsonl`` file or a directory holding them, a Hugging Face hub
dataset id ``owner/name[@split]``, or an in-memory iterable of dict rows (a ``datasets.Dataset`` included).
Row schemas, detected per row: PAPO train (``problem``, ``answer``, ``images``), ViRL39K's original release
(``question``, ``answer``, ``image``), PAPO-Eval / LLaMA-Factory sharegpt (``messages`` or ``conversations``
plus ``images``), or any columns named through ``ColumnMap``.

Every image is decoded once here so a corrupt one fails at load time, with its row named, instead of inside
a rollout worker hours later; the ``Sample`` keeps only the undecoded reference (``{bytes, path}`` dict or an
absolute path), which is what keeps a 39K-row dataset in memory cheaply.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from papo.data.hub import arrow_dataset_rows, is_hub_id, load_hub_rows, parquet_rows, select_split_files
from papo.data.images import ImageTooLarge, to_rgb
from papo.data.sample import ANSWER_TYPES, IMAGE_PLACEHOLDER, Sample, strip_format_suffix
from papo.data.synthetic import SPEC_PREFIX, dataset_from_spec
from papo.errors import DataError

log = logging.getLogger(__name__)

PROMPT_KEYS = ("problem", "question", "prompt")
ANSWER_KEYS = ("answer", "label", "ground_truth", "solution")
IMAGE_KEYS = ("images", "image")
DATA_FILES = ("data.parquet", "data.json", "data.jsonl")
_USER_ROLES = ("user", "human")
_ASSISTANT_ROLES = ("assistant", "gpt")
_MAX_IDS_SHOWN = 10
_WARNED_TYPES: set = set()


class _BadRow(Exception):
    pass


@dataclass(frozen=True)
class ColumnMap:
    """Column names to read; ``None`` falls back to the first present of ``PROMPT_KEYS`` etc."""

    prompt: str | None = None
    answer: str | None = None
    images: str | None = None
    id: str | None = None


@dataclass
class LoadReport:
    source: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (row id, reason)

    def summary(self) -> str:
        """E.g. ``data.parquet: 97 of 100 rows kept; skipped 3: missing answer x2 (rows 4, 17), ...``."""
        text = f"{self.source}: {self.rows_kept} of {self.rows_read} rows kept"
        if not self.skipped:
            return text
        groups: dict[str, list[str]] = defaultdict(list)
        for row_id, reason in self.skipped:
            groups[_reason_kind(reason)].append(row_id)
        parts = []
        for kind, ids in groups.items():
            shown = ", ".join(ids[:_MAX_IDS_SHOWN]) + (", ..." if len(ids) > _MAX_IDS_SHOWN else "")
            parts.append(f"{kind} x{len(ids)} ({'row' if len(ids) == 1 else 'rows'} {shown})")
        return f"{text}; skipped {len(self.skipped)}: " + ", ".join(parts)


def _reason_kind(reason: str) -> str:
    # reasons read "<kind>: <detail>" or "<kind> (<value>)"; the summary groups on the kind
    return re.sub(r"\s*\(.*\)$", "", reason.split(": ", 1)[0])


@dataclass
class LoadResult:
    samples: list[Sample]
    report: LoadReport


@dataclass
class _Source:
    """Rows plus what the parser needs to know about where they came from."""

    rows: Iterable[Any]
    name: str  # shown in the report and DataError messages
    id_prefix: str  # default ids are f"{id_prefix}-{row_index}"
    base_dirs: list[Path]  # where relative image paths are looked up, in order


# ---------------------------------------------------------------- entry point


def load_samples(
    spec: Any,
    *,
    split: str | None = None,
    columns: ColumnMap | None = None,
    strict: bool = False,
    limit: int | None = None,
    add_missing_placeholders: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_datasets: bool | None = None,
    check_images: bool = True,
    name: str | None = None,
) -> LoadResult:
    """Load ``spec`` (path, hub id ``owner/name[@split]`` or iterable of dict rows) into validated Samples.

    ``cache_dir``: hub cache for hub ids; ``use_datasets``: for hub ids, None tries ``datasets`` first when it is
    installed, False goes straight to ``snapshot_download`` + pyarrow; ``check_images=False`` skips decoding
    (only for data known to be clean); ``name`` overrides the source name in reports and default ids.
    """
    if isinstance(spec, str) and spec.startswith(SPEC_PREFIX):
        return _synthetic(spec, split, limit)
    source = _open_source(spec, split=split, cache_dir=cache_dir, use_datasets=use_datasets)
    if name:
        source.name = source.id_prefix = name
    columns = columns or ColumnMap()
    report = LoadReport(source.name)
    samples: list[Sample] = []
    for index, row in enumerate(source.rows):
        if limit is not None and len(samples) >= limit:
            break
        report.rows_read += 1
        try:
            samples.append(_parse_row(row, index, source, columns, add_missing_placeholders, check_images))
        except _BadRow as bad:
            if strict:
                raise DataError(f"{source.name} row {index}: {bad}") from None
            report.skipped.append((str(index), str(bad)))
    report.rows_kept = len(samples)
    (log.warning if report.skipped else log.info)("%s", report.summary())
    return LoadResult(samples, report)


def _synthetic(spec: str, split: str | None, limit: int | None) -> LoadResult:
    """``synthetic:...`` specs: generated, never bad; ``split`` / ``limit`` act as defaults / caps."""
    ds = dataset_from_spec(spec, **({"split": split} if split else {}))
    samples = list(ds[: limit if limit is not None else len(ds)])
    return LoadResult(samples, LoadReport(repr(ds), rows_read=len(samples), rows_kept=len(samples)))


def filter_by_prompt_length(
    samples: Iterable[Sample], count_tokens: Callable[[Sample], int], max_length: int
) -> tuple[list[Sample], LoadReport]:
    """Drop samples whose prompt (as ``count_tokens`` counts it, vision tokens included) exceeds ``max_length``;
    PAPO's ``filter_overlong_prompts`` with max_prompt_length 4096."""
    report = LoadReport("prompt length filter")
    kept = []
    for sample in samples:
        report.rows_read += 1
        n = int(count_tokens(sample))
        if n > max_length:
            report.skipped.append((sample.id, f"prompt longer than {max_length} tokens ({n})"))
        else:
            kept.append(sample)
    report.rows_kept = len(kept)
    if report.skipped:
        log.info("%s", report.summary())
    return kept, report


# ---------------------------------------------------------------- sources


def _open_source(spec: Any, *, split: str | None, cache_dir: Any, use_datasets: bool | None) -> _Source:
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if path.is_file():
            return _file_source(path)
        if path.is_dir():
            return _dir_source(path, split)
        if isinstance(spec, str) and is_hub_id(spec):
            repo, _, at_split = spec.partition("@")
            split = split or at_split or "train"
            rows, base_dirs = load_hub_rows(repo, split, cache_dir=cache_dir, use_datasets=use_datasets)
            return _Source(rows, f"{repo}@{split}", f"{repo.split('/')[-1]}-{split}", base_dirs)
        raise FileNotFoundError(f"no such data file or directory: {spec} (and it is not a hub id owner/name)")
    if isinstance(spec, Mapping):
        if split or "train" in spec:  # a DatasetDict or {split: rows}
            return _open_source(spec[split or "train"], split=None, cache_dir=cache_dir, use_datasets=use_datasets)
        raise TypeError("load_samples needs an iterable of rows, not a single dict row")
    if hasattr(spec, "with_format") and hasattr(spec, "features") and hasattr(spec, "__len__"):
        return _Source(arrow_dataset_rows(spec), "<dataset>", "dataset", [Path.cwd()])
    if isinstance(spec, Iterable):
        return _Source(spec, "<memory>", "row", [Path.cwd()])
    raise TypeError(f"cannot load samples from {type(spec).__name__}")


def _file_source(path: Path, display: str | None = None) -> _Source:
    base = path.resolve().parent
    # then up to two parents (PAPO-Eval's "./data/images/..." is relative to the folder above data/), then cwd
    base_dirs = [base, *list(base.parents)[:2], Path.cwd()]
    return _Source(_file_rows(path), display or path.name, path.stem, base_dirs)


def _file_rows(path: Path) -> Iterator[Any]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from parquet_rows([path])
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        yield _InvalidRow(f"invalid JSON line: {err}")
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, Mapping) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records or {{'data': [...]}}")
        yield from data
    else:
        raise DataError(f"{path}: unsupported data file type {suffix!r} (want .parquet, .json or .jsonl)")


@dataclass
class _InvalidRow:
    reason: str


def _dir_source(path: Path, split: str | None) -> _Source:
    for folder in (path, path / "data"):
        for name in DATA_FILES:
            if (folder / name).is_file():
                source = _file_source(folder / name, f"{path.name}/{(folder / name).relative_to(path)}")
                source.id_prefix = path.resolve().name
                return source
    files = sorted(path.glob("*.parquet")) or sorted((path / "data").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{path}: no {', '.join(DATA_FILES)} and no *.parquet files (also looked in data/)")
    if split:
        files = select_split_files(files, split, root=path)
    base = files[0].resolve().parent
    rows = parquet_rows(files)
    return _Source(rows, path.name, path.resolve().name, [base, *list(base.parents)[:2], Path.cwd()])


# ---------------------------------------------------------------- rows


def _parse_row(
    row: Any, index: int, source: _Source, columns: ColumnMap, add_placeholders: bool, check_images: bool
) -> Sample:
    if isinstance(row, _InvalidRow):
        raise _BadRow(row.reason)
    if not isinstance(row, Mapping):
        raise _BadRow(f"wrong type: row is {type(row).__name__}, not a dict")
    used: set[str] = set()
    if columns.prompt is None and ("messages" in row or "conversations" in row):
        prompt, answer = _chat_turns(row, used)
        if columns.answer is not None:
            answer = _column(row, columns.answer, (), used)
    else:
        prompt = _column(row, columns.prompt, PROMPT_KEYS, used)
        answer = _column(row, columns.answer, ANSWER_KEYS, used)

    if not isinstance(prompt, str) and prompt is not None:
        raise _BadRow(f"wrong type: prompt is {type(prompt).__name__}")
    if prompt is None or not prompt.strip():
        raise _BadRow("missing prompt")
    answer = _answer_text(answer)

    images = _image_list(_column(row, columns.images, IMAGE_KEYS, used))
    n_placeholders = prompt.count(IMAGE_PLACEHOLDER)
    if n_placeholders == 0 and images and add_placeholders:
        prompt = IMAGE_PLACEHOLDER * len(images) + prompt
    elif n_placeholders != len(images):
        raise _BadRow(f"placeholder/image mismatch: {n_placeholders} {IMAGE_PLACEHOLDER} but {len(images)} images")
    images = [_image_ref(im, i, source.base_dirs, check_images) for i, im in enumerate(images)]

    sample_id = _column(row, columns.id, ("id",), used)
    sample_id = f"{source.id_prefix}-{index}" if sample_id is None or sample_id == "" else str(sample_id)
    answer_type = row.get("answer_type") or "math"
    if not isinstance(answer_type, str):
        raise _BadRow(f"wrong type: answer_type is {type(answer_type).__name__}")
    meta = _meta(row.get("meta"))
    if answer_type not in ANSWER_TYPES:
        # a dataset's own answer_type column (MathVista: integer/float/text/list) is not a papo verifier name:
        # keep the row, grade it with mathruler, keep the original value
        if answer_type not in _WARNED_TYPES:
            _WARNED_TYPES.add(answer_type)
            log.warning("%s: answer_type %r is not one of %s; grading such rows with 'math'",
                        source.name, answer_type, ", ".join(ANSWER_TYPES))
        meta.setdefault("source_answer_type", answer_type)
        answer_type = "math"
    task = row.get("task") or ""
    used |= {"answer_type", "task", "meta"}
    for key, value in row.items():
        if key not in used and key not in meta and not _is_image_like(value):
            meta[key] = value
    return Sample(sample_id, prompt, answer, images, answer_type=answer_type, task=str(task), meta=meta)


def _column(row: Mapping, explicit: str | None, fallbacks: tuple[str, ...], used: set[str]) -> Any:
    if explicit is not None:
        used.add(explicit)
        return row.get(explicit)
    for key in fallbacks:
        if row.get(key) is not None:
            used.add(key)
            return row[key]
    used.update(k for k in fallbacks if k in row)  # present but null: not worth carrying into meta
    return None


def _chat_turns(row: Mapping, used: set[str]) -> tuple[Any, Any]:
    """(user text without the format suffix, assistant text) of a sharegpt row."""
    key = "messages" if "messages" in row else "conversations"
    used.add(key)
    turns = row[key]
    if not isinstance(turns, list) or not all(isinstance(t, Mapping) for t in turns):
        raise _BadRow(f"wrong type: {key} is not a list of dicts")

    def text(turn: Mapping) -> Any:
        return turn.get("content", turn.get("value"))

    user = [t for t in turns if (t.get("role") or t.get("from")) in _USER_ROLES]
    assistant = [t for t in turns if (t.get("role") or t.get("from")) in _ASSISTANT_ROLES]
    if not user:
        raise _BadRow(f"wrong type: {key} has no user turn")
    prompt = text(user[0])
    if isinstance(prompt, str):
        prompt = strip_format_suffix(prompt)
    return prompt, text(assistant[0]) if assistant else None


def _answer_text(answer: Any) -> str:
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise _BadRow("missing answer")
    if isinstance(answer, str):
        return answer
    if isinstance(answer, (int, float)):  # bool included; integer counts are common (CLEVR)
        return str(answer)
    raise _BadRow(f"wrong type: answer is {type(answer).__name__}")


def _image_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, bytes, bytearray, Mapping, Image.Image, os.PathLike)):
        return [value]  # a single image
    raise _BadRow(f"wrong type: images is {type(value).__name__}")


def _image_ref(image: Any, i: int, base_dirs: list[Path], check: bool) -> Any:
    """The undecoded reference to keep: a ``{bytes, path}`` dict, an absolute path, or an in-memory PIL image."""
    if isinstance(image, Mapping) and not image.get("bytes") and image.get("path"):
        image = image["path"]
    if isinstance(image, (str, os.PathLike)):
        image = _resolve(str(image), base_dirs, i)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        image = {"bytes": bytes(image), "path": None}
    elif isinstance(image, Mapping):
        image = {"bytes": image.get("bytes"), "path": image.get("path")}
    elif not isinstance(image, Image.Image):  # PIL: the caller already holds the pixels, keep the object
        raise _BadRow(f"wrong type: image {i} is {type(image).__name__}")
    if check:
        try:
            to_rgb(image, source=f"image {i}")
        except FileNotFoundError as err:
            raise _BadRow(f"missing image file: {err}") from None
        except ImageTooLarge as err:
            raise _BadRow(f"image too large: {err}") from None
        except ValueError as err:
            kind = "zero-size image" if "zero-size" in str(err) else "undecodable image"
            raise _BadRow(f"{kind}: {err}") from None
        except TypeError as err:
            raise _BadRow(f"wrong type: {err}") from None
    return image


def _resolve(path: str, base_dirs: list[Path], i: int) -> str:
    try:
        p = Path(path).expanduser()
    except RuntimeError:  # "~user" with no such user: not a path papo can read
        p = Path(path)
    candidates = [p] if p.is_absolute() else [base / p for base in base_dirs]
    shown = path if len(path) <= 120 else f"{path[:100]}... ({len(path)} characters)"
    for candidate in candidates:
        try:
            if candidate.is_file():
                return str(candidate.resolve())
        except (OSError, ValueError) as err:  # a name too long for the filesystem, a NUL byte: not a file
            raise _BadRow(f"missing image file: image {i} {shown} ({getattr(err, 'strerror', None) or err})") from None
    raise _BadRow(f"missing image file: image {i} {shown}")


def _meta(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise _BadRow(f"bad meta: not JSON ({err})") from None
    if not isinstance(value, Mapping):
        raise _BadRow(f"bad meta: {type(value).__name__}, not a dict")
    return dict(value)


def _is_image_like(value: Any) -> bool:
    if isinstance(value, (bytes, bytearray, memoryview, Image.Image)):
        return True
    if isinstance(value, Mapping):
        return "bytes" in value
    if isinstance(value, (list, tuple)):
        return any(_is_image_like(v) for v in value)
    return False
