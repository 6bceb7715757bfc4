"""``papo score``: score a PAPO-Eval inference file exactly as PAPO-Eval's ``run_eval`` does.

Each JSONL line is ``{"idx", "id", "prompt", "predict", "label"}``. A response is correct when mathruler's
``grade_answer(extract_boxed_content(predict), label)`` holds after whitespace around ``<``, ``>`` and ``/`` is
removed (no box counts as wrong). Lines are grouped by (id, prompt, label); avg@k is the mean over groups of
the group mean, and pass@k is the unbiased estimator.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from papo.errors import UserError
from papo.evaluation.pass_at_k import avg_and_pass_at_k
from papo.rewards import score_responses

REQUIRED = ("id", "prompt", "predict", "label")


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {lineno}: not JSON ({err.msg})") from None
            missing = [k for k in REQUIRED if k not in row] if isinstance(row, dict) else list(REQUIRED)
            if missing:
                raise UserError(f"{path} line {lineno}: missing key(s) {', '.join(missing)}")
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no predictions")
    return rows


def score_predictions(path: str | Path, k: int | None = None) -> dict[str, Any]:
    rows = read_predictions(path)
    scores = score_responses([str(r["predict"]) for r in rows], [str(r["label"]) for r in rows],
                             ["math"] * len(rows), None, reward="math_only")
    groups: OrderedDict[tuple, list[float]] = OrderedDict()
    for row, s in zip(rows, scores):
        groups.setdefault((str(row["id"]), str(row["prompt"]), str(row["label"])), []).append(s["accuracy"])
    sizes = {len(g) for g in groups.values()}
    k = k or min(sizes)
    short = [key[0] for key, g in groups.items() if len(g) < k]
    if short:
        raise UserError(f"{path}: {len(short)} question(s) have fewer than k={k} predictions (e.g. id {short[0]})")
    avg, passk = avg_and_pass_at_k(list(groups.values()), k)
    return {"avg_at_k": avg, "pass_at_k": passk, "k": k, "n": len(groups), "responses": len(rows),
            "responses_per_question": sorted(sizes)}


def run_score(predictions: str, out: str, k: int | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    summary = score_predictions(predictions, k)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    table = Table(title=f"papo score: {predictions}")
    for col in ("questions", "responses", f"avg@{summary['k']}", f"pass@{summary['k']}"):
        table.add_column(col, justify="right")
    table.add_row(str(summary["n"]), str(summary["responses"]), f"{100 * summary['avg_at_k']:.2f}", f"{100 * summary['pass_at_k']:.2f}")
    Console().print(table)
    return summary
