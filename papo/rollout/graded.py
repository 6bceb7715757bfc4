"""Generate k responses per sample and grade them: the loop shared by ``papo sft``'s held-out check, the
trainer's held-out checks and ``papo eval``, and the avg@k summary of its results."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from papo.data.masking import MaskingConfig, image_pair
from papo.data.sample import Sample
from papo.rewards import score_responses
from papo.rollout.keyed_noise import HELDOUT, rollout_keys
from papo.rollout.sampler import Sampler
from papo.rollout.sampling import SamplingParams


@dataclass
class SampleResult:
    sample: Sample
    responses: list[str]
    scores: list[dict[str, Any]]  # per response: overall, accuracy, format, answer
    masked: bool = False

    @property
    def accuracy(self) -> float:  # this sample's mean over its k responses
        return sum(s["accuracy"] for s in self.scores) / max(1, len(self.scores))

    @property
    def format_rate(self) -> float:
        return sum(s["format"] for s in self.scores) / max(1, len(self.scores))


def generate_and_score(
    sampler: Sampler,
    samples: Sequence[Sample],
    params: SamplingParams,
    k: int = 1,
    batch_size: int = 32,
    reward: str = "papo_math",
    masking: MaskingConfig | None = None,  # grade with masked images instead (perception-gap metrics)
    seed: int = 0,
    on_results: Callable[[list[SampleResult]], None] | None = None,  # called after each batch (progress, appending)
    noise_seed: int | None = None,
    first_index: int = 0,
) -> list[SampleResult]:
    """k responses per sample (one prompt, ``n=k`` completions); batches hold up to ``batch_size`` sequences.
    ``noise_seed``: key each response's sampling noise by (seed, sample index + ``first_index``, response), so
    the results do not depend on batching or on how samples are split over processes (None: torch's
    generator)."""
    policy = sampler.policy
    results: list[SampleResult] = []
    per_batch = max(1, batch_size // k)
    for start in range(0, len(samples), per_batch):
        chunk = samples[start : start + per_batch]
        prompts = [s.formatted_prompt() for s in chunk]
        images = [policy.load_images(s) if masking is None else image_pair(s, masking, seed, 0, policy.min_pixels, policy.max_pixels)[1]
                  for s in chunk]
        keys = None
        if noise_seed is not None:
            keys = rollout_keys(noise_seed, torch.arange(first_index + start, first_index + start + len(chunk)), k, HELDOUT)
        completions = sampler.generate(policy.encode(prompts, images), params, n=k, keys=keys)
        texts = policy.decode(completions)
        scores = score_responses(texts, [s.answer for s in chunk for _ in range(k)],
                                 [s.answer_type for s in chunk for _ in range(k)],
                                 [s.meta for s in chunk for _ in range(k)], reward=reward)
        batch_results = [SampleResult(s, texts[i * k : (i + 1) * k], scores[i * k : (i + 1) * k], masking is not None)
                         for i, s in enumerate(chunk)]
        results += batch_results
        if on_results:
            on_results(batch_results)
    return results


@dataclass
class Summary:
    n: int
    k: int
    avg_at_k: float  # mean over samples of the per-sample mean accuracy (PAPO's avg@k)
    format_rate: float
    per_task: dict[str, float] = field(default_factory=dict)
    accuracies: list[float] = field(default_factory=list)  # each sample's mean accuracy, in sample order

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "k": self.k, "avg_at_k": self.avg_at_k, "format_rate": self.format_rate, "per_task": self.per_task,
                "accuracies": self.accuracies}


def summarize(results: Sequence[SampleResult], k: int) -> Summary:
    return summarize_scores([r.sample.task for r in results], [r.accuracy for r in results],
                            [r.format_rate for r in results], k)


def summarize_scores(tasks: Sequence[str | None], accuracies: Sequence[float], format_rates: Sequence[float], k: int) -> Summary:
    """avg@k over samples from each sample's task, mean accuracy and mean format rate over its k responses."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for task, acc in zip(tasks, accuracies):
        by_task[task or "-"].append(acc)
    n = len(accuracies)
    return Summary(n=n, k=k, avg_at_k=sum(accuracies) / max(1, n), format_rate=sum(format_rates) / max(1, n),
                   per_task={t: sum(v) / len(v) for t, v in sorted(by_task.items())}, accuracies=[float(a) for a in accuracies])


def paired_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float] | None:
    """avg@k after minus before on the same samples, with the standard error of that paired difference (the
    standard deviation of per-sample differences over sqrt(n)): the noise a before/after claim must beat. None
    when either summary lacks per-sample accuracies (written before they were kept) or they do not pair up."""
    a, b = before.get("accuracies"), after.get("accuracies")
    if not a or not b or len(a) != len(b):
        return None
    diffs = [y - x for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return {"before": before["avg_at_k"], "after": after["avg_at_k"], "change": mean, "se": se, "n": n}


def summary_table(title: str, columns: dict[str, dict[str, Any]], change: bool = False) -> Any:
    """A rich table of ``Summary.to_dict()`` results side by side: avg@k per task, overall, and the format rate;
    ``change``: a last column with the last summary minus the first (before / after training)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("task", *columns, *(["change"] if change else [])):
        table.add_column(col, justify="right")
    summaries = list(columns.values())

    def row(label: str, values: list[float]) -> None:
        diff = [f"{values[-1] - values[0]:+.3f}"] if change else []
        table.add_row(label, *(f"{v:.3f}" for v in values), *diff)

    for task in summaries[-1].get("per_task", {}):
        row(task, [s.get("per_task", {}).get(task, float("nan")) for s in summaries])
    row("all", [s["avg_at_k"] for s in summaries])
    row("format", [s["format_rate"] for s in summaries])
    return table
