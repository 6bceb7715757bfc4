"""Outcome advantages computed within groups of rollouts that share a prompt.

GRPO (the official PAPO code, EasyR1's ``compute_grpo_outcome_advantage``; ``adv_estimator: dapo`` is the
same computation): A = (r - mean_group) / (std_group + eps) with the *unbiased* (n - 1) standard deviation.
Dr.GRPO (Liu et al. 2025) drops the division by the std; RLOO (Ahmadian et al. 2024) uses a leave-one-out
baseline. The advantage is one scalar per response and is broadcast over its tokens by the policy loss.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

ADV_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def group_index(group_ids: Tensor | Sequence[Hashable]) -> tuple[Tensor, int]:
    """Map arbitrary prompt uids (N,) to dense group indices 0..G-1; returns (index (N,), G)."""
    if isinstance(group_ids, Tensor):
        _, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0
    seen: dict[Hashable, int] = {}
    index = [seen.setdefault(uid, len(seen)) for uid in group_ids]
    return torch.tensor(index, dtype=torch.long), len(seen)


def group_advantages(
    rewards: Tensor,  # (N,) scalar score of each response
    group_ids: Tensor | Sequence[Hashable],  # (N,) prompt uid of each response
    estimator: str = "grpo",
    eps: float = 1e-6,
) -> Tensor:  # (N,) float32
    """Group-relative advantages; see the module docstring for the estimators."""
    if estimator not in ADV_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {', '.join(ADV_ESTIMATORS)}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one score per response), got shape {tuple(rewards.shape)}")
    # float64 and a compensated mean: a group of identical rewards must give exactly 0, as torch.mean/std do
    # in the official per-group loop; a plain float32 sum / n leaves ~1e-8 residues that eps turns into ~0.05.
    r = rewards.detach().double()
    index, n_groups = group_index(group_ids)
    index = index.to(r.device)
    if index.numel() != r.numel():
        raise ValueError(f"{r.numel()} rewards but {index.numel()} group ids")

    def group_sum(x: Tensor) -> Tensor:  # (N,) -> (G,)
        return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, index, x)

    count = group_sum(torch.ones_like(r))  # (G,)
    if estimator in ("grpo", "rloo") and bool((count < 2).any()):
        raise ValueError(f"{estimator} needs at least 2 rollouts per prompt (rollout.n > 1); found a group of 1")
    mean = group_sum(r) / count
    mean = mean + group_sum(r - mean[index]) / count
    centred = r - mean[index]  # (N,)

    if estimator == "dr_grpo":
        adv = centred
    elif estimator == "rloo":
        n = count[index]  # r_i - mean_{j != i} r_j == n / (n - 1) * (r_i - mean)
        adv = centred * n / (n - 1)
    else:
        std = (group_sum(centred.square()) / (count - 1)).sqrt()  # unbiased, like torch.std
        adv = centred / (std[index] + eps)
    return adv.float()
