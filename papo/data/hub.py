"""Hub datasets and parquet / arrow row readers for ``papo.data.loaders``: ``datasets`` first, else PAPO's workaround.

The official loader's ``datasets.load_dataset`` fails on PAPO's parquet files ("List" feature type written by a
newer ``datasets``), and it also raises offline when ``datasets`` has no prepared cache. The workaround, as in
``verl/utils/dataset.py::_load_papo_dataset``: fetch the repo's parquet files and read them with pyarrow,
picking the requested split by file name (``data/<split>-00000-of-00001.parquet``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from papo.errors import DataError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # "train-00000-of-00001" -> "train"
_BATCH_ROWS = 256  # parquet / arrow rows turned into Python objects at a time


def parquet_rows(files: list[Path]) -> Iterator[dict[str, Any]]:
    """Rows of ``files`` in order, read in batches so only one batch is held as Python objects."""
    for file in files:
        import pyarrow as pa
        import pyarrow.parquet as pq  # imported here: only parquet sources need pyarrow

        try:  # pyarrow's own messages ("Parquet magic bytes not found") do not say which file
            batches = pq.ParquetFile(file).iter_batches(_BATCH_ROWS)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{file}: not a readable parquet file ({err})") from None
        for batch in batches:
            yield from batch.to_pylist()


def arrow_dataset_rows(ds: Any) -> Iterator[dict[str, Any]]:
    """Rows of a ``datasets.Dataset`` read through arrow, so Image features stay undecoded ``{bytes, path}``."""
    for table in ds.with_format("arrow").iter(batch_size=_BATCH_ROWS):
        yield from table.to_pylist()


def is_hub_id(spec: str) -> bool:
    """``owner/name`` or ``owner/name@split``; local paths with more parts or a file suffix are not."""
    return bool(_HUB_ID.match(spec)) and not spec.split("@")[0].endswith((".parquet", ".json", ".jsonl"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def load_hub_rows(
    repo: str, split: str, *, cache_dir: Any = None, use_datasets: bool | None = None
) -> tuple[Iterable[dict[str, Any]], list[Path]]:
    """(rows, base dirs for relative image paths) of ``repo``'s ``split``."""
    if use_datasets is not False:
        try:
            import datasets
        except ImportError:
            datasets = None
            if use_datasets:
                raise
        if datasets is not None:
            try:
                ds = datasets.load_dataset(repo, split=split, cache_dir=cache_dir)
            except Exception as err:  # noqa: BLE001 - any failure here has the parquet fallback
                log.warning("datasets.load_dataset(%r, split=%r) failed (%s: %s); falling back to "
                            "snapshot_download + pyarrow", repo, split, type(err).__name__, err)
            else:
                log.info("loaded %s split %s through datasets.load_dataset", repo, split)
                return arrow_dataset_rows(ds), [Path.cwd()]

    from huggingface_hub import constants, snapshot_download

    # the env var is read by huggingface_hub at import; honour one set later (tests, notebooks) too
    offline = constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE")
    try:
        root = Path(
            snapshot_download(
                repo,
                repo_type="dataset",
                allow_patterns=["*.parquet", "**/*.parquet"],
                cache_dir=cache_dir,
                local_files_only=offline,
            )
        )
    except Exception as err:  # noqa: BLE001 - not found, gated, offline without a cache: say which repo
        raise FileNotFoundError(
            f"{repo}: not a local path, and the hub dataset could not be fetched ({type(err).__name__}: {err})"
        ) from err
    files = sorted(p for p in root.rglob("*.parquet") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{repo}: the hub snapshot at {root} has no parquet files")
    files = select_split_files(files, split, root=root)
    log.info("loaded %s split %s through snapshot_download + pyarrow (%d parquet files under %s)",
             repo, split, len(files), root)
    base = files[0].parent
    return parquet_rows(files), [base, *list(base.parents)[:2], Path.cwd()]


def _split_of(file: Path, root: Path) -> str:
    """The split a parquet file belongs to: its stem without the shard suffix, or its folder below data/."""
    rel = file.relative_to(root)
    stem = _SHARD.sub("", file.stem)
    parent = rel.parent.name
    return parent if parent and parent != "data" and re.fullmatch(r"\d+", stem) else stem


def select_split_files(files: list[Path], split: str, *, root: Path) -> list[Path]:
    """The files of ``split``: stem ``<split>`` or ``<split>-NNNNN-of-NNNNN``, or inside a ``<split>/`` folder.
    Exact matching keeps ``AI4Math_MathVerse`` from also taking ``AI4Math_MathVerse_vision_dependent``. If
    nothing matches and all files form one split (e.g. a lone ``39Krelease.parquet``), all are used."""
    root = Path(root)
    chosen = [
        f for f in files
        if _SHARD.sub("", f.stem) == split or split in f.relative_to(root).parent.parts
    ]
    if chosen:
        return chosen
    splits = sorted({_split_of(f, root) for f in files})
    if len(splits) == 1:
        log.info("no parquet file is named after split %r; using all %d files (split %r)", split, len(files), splits[0])
        return files
    raise FileNotFoundError(f"no parquet files for split {split!r} under {root}; splits found: {', '.join(splits)}")
