"""``papo eval``: generate k responses per question and score them, per benchmark, resumable.

Protocol defaults follow PAPO-Eval: k = 8 samples at temperature 1.0, top_p 1.0, top_k 50 (LLaMA-Factory's
default, which PAPO-Eval inherits), 2048 new tokens, images bounded to [32², 768²] pixels, and the last
``\\boxed{}`` graded by mathruler (``papo_math`` adds typed verifiers for papo's synthetic answers; choose
``--reward math_only`` for PAPO-Eval's scorer on every row). With ``--mask-ratio`` the same questions are also
answered with masked images (1.0: blank images), giving masked accuracy and the perception gap.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from papo.data.loaders import ColumnMap, load_samples
from papo.data.masking import MaskingConfig
from papo.data.synthetic import SPEC_PREFIX
from papo.errors import UserError
from papo.evaluation.analysis import breakdown, classify
from papo.evaluation.pass_at_k import avg_and_pass_at_k
from papo.evaluation.suites import get_suite, suite_files, suite_markdown, suite_scores, suite_table
from papo.jsonl import read_records, write_records
from papo.models.policy import Policy
from papo.rollout.graded import SampleResult, generate_and_score, summarize_scores
from papo.rollout.sampler import Sampler
from papo.rollout.sampling import SamplingParams

PAPO_EVAL_MIN_PIXELS = 32 * 32
PAPO_EVAL_MAX_PIXELS = 768 * 768


@dataclass
class EvalConfig:
    data: list[str]
    out: str
    model: str | None = None  # None: the embedded default
    k: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    max_new_tokens: int = 2048
    limit: int | None = None
    mask_ratios: list[float] = field(default_factory=list)
    batch_size: int = 64  # sequences per generate call
    reward: str = "papo_math"
    seed: int = 0
    device: str = "auto"
    split: str | None = None
    min_pixels: int = PAPO_EVAL_MIN_PIXELS
    max_pixels: int = PAPO_EVAL_MAX_PIXELS
    columns: dict[str, str | None] = field(default_factory=dict)  # ColumnMap fields for non-standard datasets
    suite: str | None = None  # papo.evaluation.suites name: its splits become the data, its table is printed
    suite_dir: str | None = None  # a local copy of the suite's hub dataset (default: download it)
    baseline: str | None = None  # a papo eval output dir to compute Δ%rel against
    # per-token visual dependency of the first response to each question (papo.evaluation.dependency)
    dependency: bool = False
    dependency_threshold: float = 0.1  # nats: tokens at or above it count as highly dependent
    dependency_pictures: int = 4  # responses drawn with their tokens shaded, per benchmark

    def __post_init__(self) -> None:
        if self.k < 1:
            raise UserError(f"--k must be >= 1, got {self.k}")
        for r in self.mask_ratios:
            if not 0 < r <= 1:
                raise UserError(f"--mask-ratio must be in (0, 1], got {r}")
        if not self.data and not self.suite:
            raise UserError("give --data or --suite")
        if self.suite:
            get_suite(self.suite)
        if self.baseline and not (Path(self.baseline) / "summary.json").is_file():
            raise FileNotFoundError(f"--baseline {self.baseline}: no summary.json there (give a papo eval output dir)")


def benchmark_name(spec: str) -> str:
    if spec.startswith(SPEC_PREFIX):
        return "synthetic-" + spec[len(SPEC_PREFIX):].split("?")[0].replace("+", "-")
    path = Path(spec)
    if path.exists():
        return path.parent.name if path.is_file() and path.stem in ("data", "test", "train") else path.stem if path.is_file() else path.name
    return re.sub(r"[^\w.-]+", "_", spec)


def _record(r: SampleResult) -> dict[str, Any]:
    s = r.sample
    rec = {"id": s.id, "task": s.task, "prompt": s.prompt, "answer": s.answer, "answer_type": s.answer_type,
           "responses": r.responses, "extracted": [x.get("answer") for x in r.scores],
           "correct": [x["accuracy"] for x in r.scores], "format": [x["format"] for x in r.scores]}
    if "cued_answer" in s.meta:  # the answer the question's text suggests (synthetic shortcut knob)
        rec["cued_answer"] = s.meta["cued_answer"]
    if isinstance(s.meta.get("facts"), dict):  # ground truth known: classify each response's error exactly
        rec["errors"] = [classify(text, s.meta["facts"], x["accuracy"] > 0.5, x["format"] > 0.5,
                                  s.meta.get("answer_facts", ()))
                         for text, x in zip(r.responses, r.scores)]
    return rec


def _read_done(path: Path, k: int) -> dict[str, dict]:
    """Finished records of an interrupted run; a torn last line (killed mid-write) is ignored."""
    done: dict[str, dict] = {}
    for rec in read_records(path):
        if len(rec.get("correct", [])) != k:
            raise UserError(f"{path} was written with k={len(rec.get('correct', []))}; rerun with --k {len(rec['correct'])} or a new --out")
        done[rec["id"]] = rec
    if path.exists():
        write_records(path, done.values())  # without the torn tail, so appends start on a clean line
    return done


def _run_split(sampler: Sampler, samples, path: Path, cfg: EvalConfig, params: SamplingParams,
               masking: MaskingConfig | None, progress, label: str) -> list[dict]:
    done = _read_done(path, cfg.k)
    todo = [s for s in samples if s.id not in done]
    bar = progress.add_task(label, total=len(samples), completed=len(samples) - len(todo), acc=_mean_acc(done.values()))
    with path.open("a", encoding="utf-8") as f:
        def append(batch: list[SampleResult]) -> None:
            for r in batch:
                rec = _record(r)
                done[rec["id"]] = rec
                f.write(json.dumps(rec) + "\n")
            f.flush()
            progress.update(bar, advance=len(batch), acc=_mean_acc(done.values()))

        generate_and_score(sampler, todo, params, k=cfg.k, batch_size=cfg.batch_size, reward=cfg.reward,
                           masking=masking, seed=cfg.seed, on_results=append)
    return [done[s.id] for s in samples]


def _mean_acc(records) -> float:
    records = list(records)
    return sum(sum(r["correct"]) / len(r["correct"]) for r in records) / len(records) if records else 0.0


def _summary(records: list[dict], k: int) -> dict[str, Any]:
    summary = summarize_scores([r["task"] for r in records], [sum(r["correct"]) / k for r in records],
                               [sum(r["format"]) / k for r in records], k)
    _, passk = avg_and_pass_at_k([r["correct"] for r in records], k)
    out = {"avg_at_k": summary.avg_at_k, "pass_at_k": passk, "k": k, "n": len(records), "format_rate": summary.format_rate}
    if len(summary.per_task) > 1:
        out["per_task"] = summary.per_task
    if records and all("errors" in r for r in records):
        out["errors"] = breakdown((c for r in records for c in r["errors"]), (x > 0.5 for r in records for x in r["correct"]))
    if records and all("cued_answer" in r for r in records):
        out["cued"] = cued_shares(records)
    return out


def cued_shares(records: list[dict]) -> dict[str, float]:
    """How far answers follow the question's text: the share of responses whose answer is the one the text
    suggests under the synthetic ``shortcut`` knob (``answers``), beside the share of questions whose true
    answer it is (``truth``, what an image reader would match)."""
    same = lambda a, b: str(a).strip().lower() == str(b).strip().lower()  # noqa: E731
    answers = [same(x, r["cued_answer"]) for r in records for x in r["extracted"] if x is not None]
    n = sum(len(r["extracted"]) for r in records)
    return {"answers": sum(answers) / n, "truth": sum(same(r["answer"], r["cued_answer"]) for r in records) / len(records)}


def _dependency(policy: Policy, samples, records: list[dict], cfg: EvalConfig, out: Path, name: str) -> dict[str, Any]:
    from papo.evaluation.dependency import dependency_summary, response_dependencies, write_pictures

    results = response_dependencies(policy, samples, [r["responses"][0] for r in records], MaskingConfig(), cfg.seed)
    summary = dependency_summary([d for _, d in results], cfg.dependency_threshold)
    if cfg.dependency_pictures:
        paths = write_pictures(policy, samples, results, out, name, cfg.dependency_pictures)
        summary["pictures"] = [str(p) for p in paths]
    return summary


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from papo.models.loading import resolve_device

    console = Console()
    torch.manual_seed(cfg.seed)
    sampler = Sampler(Policy.from_pretrained(cfg.model, device=resolve_device(cfg.device), min_pixels=cfg.min_pixels,
                                             max_pixels=cfg.max_pixels))
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
    out = Path(cfg.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    benchmarks: dict[str, Any] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("acc {task.fields[acc]:.3f}"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        named = [(benchmark_name(spec), spec) for spec in cfg.data]
        if cfg.suite:
            named += suite_files(get_suite(cfg.suite), cfg.suite_dir)
        for name, spec in named:
            loaded = load_samples(spec, split=cfg.split, limit=cfg.limit, columns=ColumnMap(**cfg.columns))
            if loaded.report.skipped:
                console.print(loaded.report.summary())
            samples = loaded.samples
            records = _run_split(sampler, samples, out / "samples" / f"{name}.jsonl", cfg, params, None, progress, name)
            result = _summary(records, cfg.k)
            for ratio in cfg.mask_ratios:
                masking = MaskingConfig(strategy="full" if ratio >= 1.0 else "random", ratio=ratio)
                masked = _run_split(sampler, samples, out / "samples" / f"{name}.masked-{ratio:g}.jsonl", cfg, params,
                                    masking, progress, f"{name} masked {ratio:g}")
                m = _summary(masked, cfg.k)
                result.setdefault("masked", {})[f"{ratio:g}"] = {
                    "avg_at_k": m["avg_at_k"], "pass_at_k": m["pass_at_k"], "perception_gap": result["avg_at_k"] - m["avg_at_k"]}
            if cfg.dependency:
                result["visual_dependency"] = _dependency(sampler.policy, samples, records, cfg, out / "dependency", name)
            benchmarks[name] = result
    summary = {"benchmarks": benchmarks, "average": sum(b["avg_at_k"] for b in benchmarks.values()) / len(benchmarks),
               "config": {k: v for k, v in cfg.__dict__.items()}}
    console.print(summary_table(summary))
    if cfg.suite:
        suite = get_suite(cfg.suite)
        baseline = json.loads((Path(cfg.baseline) / "summary.json").read_text()) if cfg.baseline else None
        summary["suite"] = {"name": cfg.suite, **suite_scores(summary, suite, baseline)}
        console.print(suite_table(summary["suite"], suite, f"{cfg.suite}: avg@{cfg.k} (%)" + (f", Δ%rel vs {cfg.baseline}" if baseline else "")))
        (out / "suite.md").write_text(suite_markdown(summary["suite"], suite, cfg.model or "papo default"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summary_table(summary: dict[str, Any]):
    from rich.table import Table

    benchmarks = summary["benchmarks"]
    ratios = sorted({r for b in benchmarks.values() for r in b.get("masked", {})}, key=float)
    k = next(iter(benchmarks.values()))["k"]
    errors = any("errors" in b for b in benchmarks.values())
    dependency = any("visual_dependency" in b for b in benchmarks.values())
    table = Table(title="papo eval")
    cols = ["benchmark", "n", f"avg@{k}", f"pass@{k}", "format"] + [f"masked {r} / gap" for r in ratios]
    cols += ["perception / reasoning errors (% of wrong)"] if errors else []
    cols += ["visual dependency: mean / share high"] if dependency else []
    for col in cols:
        table.add_column(col, justify="right")
    for name, b in benchmarks.items():
        cells = [name, str(b["n"]), f"{100 * b['avg_at_k']:.2f}", f"{100 * b['pass_at_k']:.2f}", f"{100 * b['format_rate']:.1f}"]
        for r in ratios:
            m = b.get("masked", {}).get(r)
            cells.append(f"{100 * m['avg_at_k']:.2f} / {100 * m['perception_gap']:+.2f}" if m else "-")
        if errors:
            cells.append(_error_cell(b.get("errors")))
        if dependency:
            d = b.get("visual_dependency")
            cells.append(f"{d['mean']:.3f} / {100 * d['share_high']:.1f}%" if d else "-")
        table.add_row(*cells)
    table.add_row("average", "", f"{100 * summary['average']:.2f}", "", "", *([""] * (len(ratios) + errors + dependency)))
    return table


def _error_cell(errors: dict[str, Any] | None) -> str:
    if not errors:
        return "-"
    if not errors["wrong_answers"]:
        return "no errors"
    return f"{100 * errors['perception_share_of_errors']:.0f} / {100 * errors['reasoning_share_of_errors']:.0f}"
