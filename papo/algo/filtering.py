"""DAPO online (dynamic-sampling) filter: drop prompt groups whose rollouts all agree.

Official behaviour (PAPO ``_make_batch_data``): keep a group if filter_low < mean(key over its rollouts) <
filter_high, with key = accuracy and (0.01, 0.99), i.e. drop all-correct and all-wrong groups, which carry zero
GRPO advantage. When a round keeps nothing, the official code silently keeps *everything*; papo makes that an
explicit option (off by default) and logs it when it fires.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from papo.algo.advantages import group_index

log = logging.getLogger(__name__)


@dataclass
class FilterResult:
    keep: Tensor  # (N,) bool: responses whose group passed
    kept_groups: int
    total_groups: int
    fallback_fired: bool  # nothing passed and keep_all_if_empty kept everything


def dapo_group_filter(
    values: Tensor,  # (N,) per-response filter key, e.g. accuracy in {0, 1}
    group_ids: Tensor | Sequence[Hashable],  # (N,) prompt uid of each response
    low: float = 0.01,
    high: float = 0.99,
    keep_all_if_empty: bool = False,
) -> FilterResult:
    if not low < high:
        raise ValueError(f"filter_low ({low}) must be below filter_high ({high})")
    index, n_groups = group_index(group_ids)
    index = index.to(values.device)
    v = values.detach().float()
    count = torch.zeros(n_groups, device=v.device).index_add_(0, index, torch.ones_like(v))
    mean = torch.zeros(n_groups, device=v.device).index_add_(0, index, v) / count  # (G,)
    group_keep = (mean > low) & (mean < high)
    kept = int(group_keep.sum().item())
    if kept == 0 and keep_all_if_empty and n_groups > 0:
        log.warning("DAPO filter kept 0 of %d groups; keep_all_if_empty=True keeps all of them", n_groups)
        return FilterResult(torch.ones_like(v, dtype=torch.bool), n_groups, n_groups, True)
    return FilterResult(group_keep[index], kept, n_groups, False)


@dataclass
class GroupOutcomes:
    groups: int
    all_correct: int  # groups whose responses all scored 1: zero GRPO advantage, dropped by DAPO's filter
    all_wrong: int  # groups whose responses all scored 0: the same


def group_outcomes(
    values: Tensor,  # (N,) per-response 0/1 key, e.g. accuracy
    group_ids: Tensor | Sequence[Hashable],  # (N,) prompt uid of each response
) -> GroupOutcomes:
    index, n_groups = group_index(group_ids)
    v = values.detach().float()
    index = index.to(v.device)
    lowest = torch.zeros(n_groups, device=v.device).scatter_reduce(0, index, v, "amin", include_self=False)  # (G,)
    highest = torch.zeros(n_groups, device=v.device).scatter_reduce(0, index, v, "amax", include_self=False)  # (G,)
    return GroupOutcomes(n_groups, int((lowest >= 1).sum()), int((highest <= 0).sum()))
