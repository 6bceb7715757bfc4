"""JSON-lines files that a killed process may have left with a torn last line: read what is whole, rewrite
atomically. The training metrics and the evaluation records both resume from such files."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per line, skipping a line cut short by a crash (and anything not an
    object); [] if the file does not exist."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` with ``records`` in one rename, so appends after it start on a clean line."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf become null: a metrics file stays strict JSON for every reader."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
