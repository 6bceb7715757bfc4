"""Evaluation suites: a paper's benchmark set evaluated in one command and printed in the paper's layout.

``papo eval --suite papo-eval`` reads the authors' hub dataset ``PAPO-Galaxy/PAPO_eval`` (or a local copy in
the same layout: ``data/<split>-*.parquet`` plus ``<split>_images.zip`` at the root), evaluates its nine
splits, and prints Table 1's columns: General (Geo3K, MathVista, We-Math, MMK12, MathVerse) and
Vision-Dependent (LogicVista, Counting, MMMU-Pro, MathVerse_V), group averages as unweighted means, the
overall mean of the nine, and Δ%rel against a baseline run as the mean of per-column relative gains.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from papo.errors import UserError


@dataclass(frozen=True)
class Suite:
    repo: str  # hub dataset id
    columns: tuple[tuple[str, str], ...]  # (column name in the paper's table, split name in the dataset)
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # (group name, its columns)


SUITES = {
    "papo-eval": Suite(
        repo="PAPO-Galaxy/PAPO_eval",
        columns=(("Geo3K", "hiyouga_geometry3k"), ("MathVista", "AI4Math_MathVista"), ("We-Math", "We_Math"),
                 ("MMK12", "PAPO_MMK12"), ("MathVerse", "AI4Math_MathVerse"), ("LogicVista", "lscpku_LogicVista"),
                 ("Counting", "BUAADreamer_clevr_count_70k"), ("MMMU-Pro", "MMMU_MMMU_Pro"),
                 ("MathVerse_V", "AI4Math_MathVerse_vision_dependent")),
        groups=(("General", ("Geo3K", "MathVista", "We-Math", "MMK12", "MathVerse")),
                ("Vision-Dependent", ("LogicVista", "Counting", "MMMU-Pro", "MathVerse_V"))),
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    return SUITES[name]


def suite_files(suite: Suite, root: str | Path | None = None, cache_dir: str | None = None) -> list[tuple[str, str]]:
    """(column, parquet path) per split, from ``root`` or a download of the hub dataset; images unzipped next
    to the data so the rows' relative paths (``./data/images/...``) resolve."""
    if root is None:
        from huggingface_hub import snapshot_download

        root = snapshot_download(suite.repo, repo_type="dataset", cache_dir=cache_dir)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"suite directory {root} does not exist")
    out = []
    for column, split in suite.columns:
        files = sorted((root / "data").glob(f"{split}-*.parquet"))
        if not files:
            raise FileNotFoundError(f"{root}: no data/{split}-*.parquet for {column} (the {suite.repo} layout)")
        if len(files) > 1:
            raise UserError(f"{root}: several parquet files for split {split}: {[f.name for f in files]}")
        _unzip_images(root, split)
        out.append((column, str(files[0])))
    return out


def _unzip_images(root: Path, split: str) -> None:
    archive = root / f"{split}_images.zip"
    marker = root / f".{split}_images.unzipped"
    if not archive.is_file() or marker.exists():
        return
    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        for name in names:  # a member may not escape the dataset directory
            if name.startswith("/") or ".." in Path(name).parts:
                raise UserError(f"{archive}: refusing member {name!r} outside the dataset directory")
        # rows point at ./data/images/<folder>/<file>: put the archive's tree where those paths land
        target = root if all(n.startswith("data/") for n in names) else root / "data" if all(
            n.startswith("images/") for n in names) else root / "data" / "images"
        z.extractall(target)
    marker.write_text("ok\n")


def suite_scores(summary: dict[str, Any], suite: Suite, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Columns, group averages and overall in percent, and Δ%rel per group / overall against ``baseline``
    (both ``papo eval`` summaries, or ``{"benchmarks": {column: {"avg_at_k": x}}}``)."""
    def scores(s: dict[str, Any]) -> dict[str, float]:
        missing = [c for c, _ in suite.columns if c not in s["benchmarks"]]
        if missing:
            raise UserError(f"summary lacks suite columns {missing}")
        return {c: 100 * s["benchmarks"][c]["avg_at_k"] for c, _ in suite.columns}

    cols = scores(summary)
    groups = {g: sum(cols[c] for c in members) / len(members) for g, members in suite.groups}
    result: dict[str, Any] = {"columns": cols, "groups": groups, "overall": sum(cols.values()) / len(cols)}
    if baseline is not None:
        base = scores(baseline)
        gain = {c: 100 * (cols[c] / base[c] - 1) if base[c] else float("nan") for c in cols}
        result["delta_rel"] = {g: sum(gain[c] for c in members) / len(members) for g, members in suite.groups}
        result["delta_rel"]["overall"] = sum(gain.values()) / len(gain)
    return result


def suite_table(scores: dict[str, Any], suite: Suite, title: str):
    """A terminal-width table: one row per benchmark, grouped, with group averages and the overall mean."""
    from rich.table import Table

    delta = scores.get("delta_rel")
    table = Table(title=title)
    for col in ["benchmark", "avg@k"] + (["Δ%rel"] if delta else []):
        table.add_column(col, justify="right")
    for group, members in suite.groups:
        for c in members:
            table.add_row(c, f"{scores['columns'][c]:.2f}", *([""] if delta else []))
        table.add_row(f"[bold]{group} AVG", f"[bold]{scores['groups'][group]:.2f}",
                      *([f"{delta[group]:+.2f}%"] if delta else []), end_section=True)
    table.add_row("[bold]Overall", f"[bold]{scores['overall']:.2f}", *([f"{delta['overall']:+.2f}%"] if delta else []))
    return table


def suite_markdown(scores: dict[str, Any], suite: Suite, label: str) -> str:
    """The paper's Table 1 layout: one row, the benchmarks of each group followed by its average, then overall."""
    head, row = ["Method"], [label]
    for group, members in suite.groups:
        head += list(members) + [f"{group} AVG"]
        row += [f"{scores['columns'][c]:.2f}" for c in members] + [f"{scores['groups'][group]:.2f}"]
    head.append("Overall")
    row.append(f"{scores['overall']:.2f}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"]
    if "delta_rel" in scores:
        d = scores["delta_rel"]
        delta = ["Δ%rel"]
        for group, members in suite.groups:
            delta += [""] * len(members) + [f"{d[group]:+.2f}"]
        lines.append("| " + " | ".join(delta + [f"{d['overall']:+.2f}"]) + " |")
    return "\n".join(lines) + "\n"
