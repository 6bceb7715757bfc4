"""PPO clipped surrogate with clip-higher and dual clip, as in EasyR1/verl ``compute_policy_loss``.

Ratios are formed in log space: ratio = exp(clamp(log pi - log pi_old, -20, 20)) and the clipped ratio is
exp(clamp(log-ratio, log(1 - eps_low), log(1 + eps_high))), which is numerically identical to clamping the
ratio but never overflows. The dual clip (Ye et al. 2020) bounds the loss of negative-advantage tokens at
-A * c so a huge ratio on a bad token cannot dominate the batch.

Two sets of clip fractions: papo's split by side (``clipfrac_high`` / ``_low`` / ``_dual``) and the authors'
(``pg_clipfrac_higher`` / ``_lower``), kept because their plots and collapse signs are drawn from those. The
authors' "higher" counts every token whose clipped branch is taken, whichever side, so it equals
clipfrac_high + clipfrac_low; their "lower" is the dual clip, equal to clipfrac_dual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from papo.algo.aggregation import aggregate, masked_mean

LOG_RATIO_CLAMP = 20.0


@dataclass
class PolicyLossOutput:
    loss: Tensor  # () aggregated clipped surrogate
    clipfrac_high: Tensor  # () share of tokens with A > 0 and ratio > 1 + eps_high (upper clip active)
    clipfrac_low: Tensor  # () share of tokens with A < 0 and ratio < 1 - eps_low (lower clip active)
    clipfrac_dual: Tensor  # () share of tokens with A < 0 whose loss was capped by the dual clip
    pg_clipfrac_higher: Tensor  # () authors' metric: share of tokens whose clipped branch is taken (either side)
    pg_clipfrac_lower: Tensor  # () authors' metric: share of tokens with A < 0 capped by the dual clip
    ppo_kl: Tensor  # () token-mean of (log pi_old - log pi), the approximate KL(old || new)


def ppo_clip_loss(
    log_probs: Tensor,  # (B, T) log pi_theta of sampled tokens, with grad
    old_log_probs: Tensor,  # (B, T) log pi_old of the same tokens, no grad
    advantages: Tensor,  # (B,) per response or (B, T) per token
    mask: Tensor,  # (B, T) 1 for response tokens
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    norm_length: int | None = None,
) -> PolicyLossOutput:
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.to(log_probs.dtype).expand_as(log_probs)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (official value 3.0), got {dual_clip}")

    log_ratio = (log_probs - old_log_probs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    clipped_ratio = log_ratio.clamp(math.log(1.0 - clip_low), math.log(1.0 + clip_high)).exp()

    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * clipped_ratio
    clip_active = loss_unclipped < loss_clipped  # the pessimistic (max) branch is the clipped one
    loss = torch.maximum(loss_unclipped, loss_clipped)

    negative = advantages < 0
    if dual_clip is not None:
        loss_dual = -advantages * dual_clip
        dual_active = negative & (loss > loss_dual)
        loss = torch.where(negative, torch.minimum(loss, loss_dual), loss)
    else:
        dual_active = torch.zeros_like(negative)

    as_float = lambda b: b.to(log_probs.dtype)  # noqa: E731
    return PolicyLossOutput(
        loss=aggregate(loss, mask, agg, norm_length),
        clipfrac_high=masked_mean(as_float(clip_active & (advantages > 0)), mask).detach(),
        clipfrac_low=masked_mean(as_float(clip_active & negative), mask).detach(),
        clipfrac_dual=masked_mean(as_float(dual_active), mask).detach(),
        pg_clipfrac_higher=masked_mean(as_float(clip_active), mask).detach(),
        pg_clipfrac_lower=masked_mean(as_float(dual_active), mask).detach(),
        ppo_kl=masked_mean(-log_ratio, mask).detach(),
    )
