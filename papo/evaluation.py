"""Generate k responses per sample and grade them: the loop shared by ``papo sft``'s held-out check, the
trainer's validation and ``papo eval``."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from papo.data.sample import Sample
from papo.masking import MaskingConfig
from papo.models.generation import SamplingParams
from papo.models.policy import Policy
from papo.rewards import score_responses


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
    policy: Policy,
    samples: Sequence[Sample],
    params: SamplingParams,
    k: int = 1,
    batch_size: int = 32,
    reward: str = "papo_math",
    masking: MaskingConfig | None = None,  # grade with masked images instead (perception-gap metrics)
    seed: int = 0,
    on_results: Callable[[list[SampleResult]], None] | None = None,  # called after each batch (progress, appending)
) -> list[SampleResult]:
    """k responses per sample (one prompt, ``n=k`` completions); batches hold up to ``batch_size`` sequences."""
    results: list[SampleResult] = []
    per_batch = max(1, batch_size // k)
    for start in range(0, len(samples), per_batch):
        chunk = samples[start : start + per_batch]
        prompts = [s.formatted_prompt() for s in chunk]
        images = [policy.load_images(s) if masking is None else policy.load_image_pair(s, masking, seed)[1] for s in chunk]
        completions = policy.generate(policy.encode(prompts, images), params, n=k)
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

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "k": self.k, "avg_at_k": self.avg_at_k, "format_rate": self.format_rate, "per_task": self.per_task}


def summarize(results: Sequence[SampleResult], k: int) -> Summary:
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in results:
        by_task[r.sample.task or "-"].append(r.accuracy)
    n = len(results)
    return Summary(
        n=n, k=k,
        avg_at_k=sum(r.accuracy for r in results) / max(1, n),
        format_rate=sum(r.format_rate for r in results) / max(1, n),
        per_task={t: sum(v) / len(v) for t, v in sorted(by_task.items())},
    )
