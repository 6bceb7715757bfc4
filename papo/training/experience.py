"""What one training step carries between its phases: the sampled ``Experience``, its no-grad ``LogProbs``,
and ``MicroBatches`` of it encoded once for the scoring and update passes."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from papo.data.sample import Sample
from papo.models.inputs import PromptBatch, concat_prompt_batches, split_prompt_batch
from papo.models.policy import Policy

ENCODING_CACHE_MAX_SEQUENCES = 512


@dataclass
class Experience:
    """One step's sequences (prompt groups of G, in order) and what the loss needs of them."""

    samples: list[Sample]  # per sequence
    uids: list[str]  # prompt-draw id per sequence: the advantage groups
    images: list[list[Any]]
    masked_images: list[list[Any]]
    ids: torch.Tensor  # (N, R) completions
    mask: torch.Tensor  # (N, R)
    texts: list[str]
    scores: list[dict[str, Any]]
    prompt_tokens: torch.Tensor  # (N,) prompt tokens of each sequence, image tokens included, padding not
    noised_images: list[list[Any]] | None = None  # a lightly noised view, for a loss that scores one (DVRP)

    @property
    def size(self) -> int:
        return len(self.samples)

    @property
    def tokens(self) -> int:
        """Prompt and response tokens of every sequence: what verl and EasyR1 count for throughput."""
        return int(self.prompt_tokens.sum() + self.mask.sum())


@dataclass
class LogProbs:
    """Step 5's no-grad log-probs of the sampled tokens, (N, R) each; None where nothing reads them."""

    old: torch.Tensor | None  # full image, the weights that sampled (None on-policy: the update's own, detached)
    masked: torch.Tensor | None  # masked image, same tokens and positions (None: no KL_prcp term or metric)
    ref: torch.Tensor | None = None  # the reference model, when the loss has a KL_ref term
    noised: torch.Tensor | None = None  # the noised image (DVRP's robustness term)

    def named(self) -> dict[str, torch.Tensor]:
        named = (("old", self.old), ("masked", self.masked), ("ref", self.ref), ("noised", self.noised))
        return {k: v for k, v in named if v is not None}


@dataclass
class MicroBatch:
    """Sequences ``rows`` of a step, encoded for one forward pass."""

    rows: list[int]
    full: PromptBatch  # the prompts with their full images
    masked: PromptBatch  # the same prompts with the masked images
    ids: torch.Tensor  # (b, R') completions, cut to the longest in this micro-batch
    mask: torch.Tensor  # (b, R')
    noised: PromptBatch | None = None  # the same prompts with the noised images, when the step has them


class MicroBatches:
    """A step's sequences in mini-batches (one optimizer update each, ``per_update`` sequences) of micro-batches
    (``size`` sequences, in order): the authors' micro-batch, over which the loss takes its token mean. Not
    sorted by length: under that per-micro-batch mean a token's weight depends on its micro-batch, and sorting
    did not shorten the update at micro-batch 4 (docs/training-at-scale.md).

    Forward passes may hold more sequences than a micro-batch: ``update_size`` for the update's forward and
    backward (``loss_groups`` then splits a pass back into its micro-batches, so the gradient is unchanged) and
    ``scoring_size`` for the no-grad scoring passes (the authors' experience micro-batch of 16 against 4 for
    the update). Both are multiples of ``size``; sequences are encoded by the processor in units that both kinds
    of pass merge whole: steps up to ENCODING_CACHE_MAX_SEQUENCES keep their encodings instead of running the
    image processor for every pass (larger steps would hold every image tensor of the step in memory). The
    processor runs once per prompt and view of its images, not once per rollout, and a kept step encodes each
    view of all its prompts in one call at its first pass (a call per prompt was most of a small model's step,
    docs/training-at-scale.md). A kept view's pixels live on the policy's device: every pass copies them there
    otherwise, and a large copy from pageable host memory waits for the GPU's queue to drain. ``seconds``: time
    spent encoding."""

    def __init__(self, exp: Experience, policy: Policy, size: int, per_update: int, scoring_size: int = 0,
                 update_size: int = 0) -> None:
        scoring_size, update_size = scoring_size or size, update_size or size
        for name, value in (("scoring", scoring_size), ("update", update_size)):
            if value % size:
                raise ValueError(f"{name} micro-batch size {value} is not a multiple of the micro-batch size {size}")
        unit = math.gcd(scoring_size, update_size)  # sequences encoded together
        self.exp, self.policy, self.size = exp, policy, size
        self.prompts = [s.formatted_prompt() for s in exp.samples]  # per sequence
        self.scoring_merge, self.update_merge = scoring_size // unit, update_size // unit
        self.keep = exp.size <= ENCODING_CACHE_MAX_SEQUENCES
        self.cache: dict[tuple[int, ...], MicroBatch] = {}
        self.views: dict[tuple[str, int], PromptBatch] = {}  # (prompt, id of its image list) -> its encoding
        self.seconds = 0.0
        self.plan: list[list[list[int]]] = []  # mini-batch -> encoding unit -> rows
        for start in range(0, exp.size, per_update):
            rows = list(range(start, min(start + per_update, exp.size)))
            self.plan.append([rows[i : i + unit] for i in range(0, len(rows), unit)])

    def rows(self, index: int) -> list[int]:
        """The sequences of mini-batch ``index``."""
        return [row for unit in self.plan[index] for row in unit]

    def micro_batch_count(self, index: int) -> int:
        return -(-len(self.rows(index)) // self.size)

    def update_passes(self, index: int) -> Iterator[MicroBatch]:
        """Mini-batch ``index``'s forward/backward passes of up to ``update_size`` sequences, built as they are
        used (a merged pass is a copy of its units' tensors)."""
        units = self.plan[index]
        for i in range(0, len(units), self.update_merge):
            yield self._joined(units[i : i + self.update_merge])

    def loss_groups(self, mb: MicroBatch) -> list[slice]:
        """The micro-batches of a pass (row slices): passes start at a micro-batch boundary of their mini-batch."""
        return [slice(i, min(i + self.size, len(mb.rows))) for i in range(0, len(mb.rows), self.size)]

    def scoring(self) -> Iterator[MicroBatch]:
        """Every sequence once, in order, up to ``scoring_size`` at a time. A pass may span later mini-batches
        but never the first one's end: the first mini-batch's old log-probs come from its update, so its
        passes are the ones the old-log-prob pass skips."""
        first, rest = self.plan[:1], self.plan[1:]
        for part in ([unit for units in first for unit in units], [unit for units in rest for unit in units]):
            for start in range(0, len(part), self.scoring_merge):
                yield self._joined(part[start : start + self.scoring_merge])

    def _joined(self, units: list[list[int]]) -> MicroBatch:
        group = [self._get(rows) for rows in units]
        return group[0] if len(group) == 1 else merge_micro_batches(group, self.policy.pad_id)

    def _get(self, rows: list[int]) -> MicroBatch:
        mb = self.cache.get(tuple(rows)) or self._encode(rows)
        if self.keep:
            self.cache[tuple(rows)] = mb
        return mb

    def _encode(self, idx: list[int]) -> MicroBatch:
        t0 = time.time()
        if self.keep and not self.views:  # a kept step's first pass encodes every prompt, one call per view
            for view in (self.exp.images, self.exp.masked_images, self.exp.noised_images):
                if view is not None:
                    self._encode_missing(self.views, self.prompts, view)
        sub = select(self.exp, idx)
        width = max(1, int(sub.mask.sum(-1).max()))
        prompts = [self.prompts[i] for i in idx]
        noised = None if sub.noised_images is None else self._encode_views(prompts, sub.noised_images)
        mb = MicroBatch(idx, self._encode_views(prompts, sub.images), self._encode_views(prompts, sub.masked_images),
                        sub.ids[:, :width], sub.mask[:, :width], noised)
        self.seconds += time.time() - t0
        return mb

    def _encode_views(self, prompts: list[str], images: list[list[Any]]) -> PromptBatch:
        """Prompts with one view of their images."""
        cache = self.views if self.keep else {}
        self._encode_missing(cache, prompts, images)
        parts = [cache[(prompt, id(ims))] for prompt, ims in zip(prompts, images)]
        return parts[0] if len(parts) == 1 else concat_prompt_batches(parts, self.policy.pad_id)

    def _encode_missing(self, cache: dict[tuple[str, int], PromptBatch], prompts: list[str],
                        images: list[list[Any]]) -> None:
        """Encodes each distinct (prompt, image list) not in ``cache``, all in one processor call: a prompt's G
        rollouts share its image, and its masked image unless masks are drawn per response, and one call for
        many prompts costs much less than a call each (benchmarks/encode_step.py). The same list object is the
        same view (the experience holds them all, so no two alive share an id)."""
        todo: dict[tuple[str, int], tuple[str, list[Any]]] = {}
        for prompt, ims in zip(prompts, images):
            if (prompt, id(ims)) not in cache:
                todo.setdefault((prompt, id(ims)), (prompt, ims))
        if not todo:
            return
        batch = self.policy.encode([p for p, _ in todo.values()], [ims for _, ims in todo.values()])
        if self.keep:
            batch = batch.pixels_to(self.policy.device)  # one copy for all of them
        cache.update(zip(todo, split_prompt_batch(batch, [len(ims) for _, ims in todo.values()])))


def merge_micro_batches(group: list[MicroBatch], pad_id: int) -> MicroBatch:
    """One micro-batch of ``group``'s rows: prompts left-padded again, completions right-padded."""
    width = max(mb.ids.shape[1] for mb in group)
    ids = torch.cat([torch.nn.functional.pad(mb.ids, (0, width - mb.ids.shape[1]), value=pad_id) for mb in group])
    mask = torch.cat([torch.nn.functional.pad(mb.mask, (0, width - mb.mask.shape[1])) for mb in group])
    noised = None if group[0].noised is None else concat_prompt_batches([mb.noised for mb in group], pad_id)
    return MicroBatch([r for mb in group for r in mb.rows], concat_prompt_batches([mb.full for mb in group], pad_id),
                      concat_prompt_batches([mb.masked for mb in group], pad_id), ids, mask, noised)


def select(exp: Experience, idx: list[int]) -> Experience:
    t = torch.as_tensor(idx, dtype=torch.long)
    return Experience([exp.samples[i] for i in idx], [exp.uids[i] for i in idx], [exp.images[i] for i in idx],
                      [exp.masked_images[i] for i in idx], exp.ids[t], exp.mask[t], [exp.texts[i] for i in idx],
                      [exp.scores[i] for i in idx], exp.prompt_tokens[t],
                      None if exp.noised_images is None else [exp.noised_images[i] for i in idx])


def pad_cat(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


def concat(parts: list[Experience]) -> Experience:
    width = max(p.ids.shape[1] for p in parts)
    return Experience(
        [s for p in parts for s in p.samples], [u for p in parts for u in p.uids], [x for p in parts for x in p.images],
        [x for p in parts for x in p.masked_images], pad_cat([p.ids for p in parts], width),
        pad_cat([p.mask for p in parts], width), [t for p in parts for t in p.texts], [s for p in parts for s in p.scores],
        torch.cat([p.prompt_tokens for p in parts]),
        None if parts[0].noised_images is None else [x for p in parts for x in p.noised_images],
    )


