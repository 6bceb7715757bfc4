"""PAPO's Implicit Perception Loss (KL_prcp) and Double Entropy Loss.

KL_prcp is a per-token k3 estimate of KL(pi_theta(.|q, I) || pi_theta(.|q, I_mask)) on the sampled tokens.
It is *maximised*: the loss term is -gamma * agg(w * kl_prcp). With the masked branch detached (official
default) its gradient w.r.t. log pi_theta(o_t) is -gamma * (1 - r_t) / N with r_t = pi_mask / pi_theta, so a
token the full image makes more likely than the masked image (r_t < 1) is pushed up.

Origins of the options (see docs/algorithm.md):
  estimator            official configs use low_var_kl (k3); the dataclass default there is k1, a trap.
  clip                 official ``use_kl_prcp_clipping`` (cap 0.2), off in every shipped config.
  token_top_p          official ``use_kl_prcp_token_level_mask`` (top 20% of tokens per sequence), off.
  apply mode "all"     official (weight 1 for every rollout, the only mode the authors implemented).
  "correct_only" and "weighted" follow the authors' config comment and unused ``incorrect_weighting`` (0.1);
                       their exact intended semantics are not published, these are papo's reading.
  schedule "linear"    official ``kl_prcp_schedule: annealing`` (AnnealingKLController).
Double entropy: the official estimator is the token-mean NLL of the sampled tokens (a one-sample entropy
estimate) under the full and the masked image, added with positive weights (an entropy *penalty*).
"""

from __future__ import annotations

import torch
from torch import Tensor

from papo.algo.aggregation import aggregate, masked_mean
from papo.algo.kl import kl_estimate

APPLY_MODES = ("all", "correct_only", "weighted")
GAMMA_SCHEDULES = ("fixed", "linear")


def kl_prcp_tokens(
    log_probs: Tensor,  # (B, T) log pi_theta(o_t | q, I)
    masked_log_probs: Tensor,  # (B, T) log pi(o_t | q, I_mask)
    estimator: str = "low_var_kl",
) -> Tensor:  # (B, T) float32 per-token KL_prcp
    return kl_estimate(log_probs, masked_log_probs, estimator)


def token_top_p_mask(
    values: Tensor,  # (B, T) per-token KL_prcp
    mask: Tensor,  # (B, T) valid response tokens
    top_p: float,
) -> Tensor:  # (B, T) bool: tokens at or above their sequence's (1 - top_p) quantile
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"token top-p must be in (0, 1], got {top_p}")
    valid = mask.bool()
    masked = torch.where(valid, values.detach().float(), torch.full((), float("nan"), device=values.device))
    threshold = torch.nanquantile(masked, 1.0 - top_p, dim=-1, keepdim=True)  # (B, 1); nan for empty rows
    return valid & (values.detach() >= threshold)


def kl_prcp_weights(
    correct: Tensor,  # (B,) bool or {0,1}: whether each response was graded correct
    mode: str = "all",
    incorrect_weight: float = 0.1,
) -> Tensor:  # (B,) float32 per-response weight w_i
    if mode not in APPLY_MODES:
        raise ValueError(f"unknown KL_prcp apply mode {mode!r}; choose one of {', '.join(APPLY_MODES)}")
    correct = correct.bool()
    if mode == "all":
        return torch.ones(correct.shape, dtype=torch.float32, device=correct.device)
    if mode == "correct_only":
        return correct.float()
    return torch.where(correct, 1.0, incorrect_weight).float()


def kl_prcp_coef_at(
    step: int,
    total_steps: int,
    coef: float,
    schedule: str = "fixed",
    start: float | None = None,
    end: float = 0.0,
    anneal_ratio: float = 0.5,
) -> float:
    """gamma at training ``step`` (0-based). "linear" goes from ``start`` (default ``coef``) to ``end`` over the
    first ``anneal_ratio * total_steps`` steps and then stays at ``end``, like the official annealing schedule."""
    if schedule not in GAMMA_SCHEDULES:
        raise ValueError(f"unknown KL_prcp schedule {schedule!r}; choose one of {', '.join(GAMMA_SCHEDULES)}")
    if schedule == "fixed":
        return coef
    start = coef if start is None else start
    horizon = max(1.0, anneal_ratio * total_steps)
    return start + (end - start) * min(1.0, step / horizon)


def perception_loss(
    log_probs: Tensor,  # (B, T) with grad
    masked_log_probs: Tensor,  # (B, T) detached (official) or with grad
    mask: Tensor,  # (B, T)
    coef: float,  # gamma
    weights: Tensor | None = None,  # (B,) per-response w_i; None = all ones
    estimator: str = "low_var_kl",
    clip: float | None = None,
    token_top_p: float | None = None,
    agg: str = "token-mean",
    norm_length: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns (loss term = -gamma * agg(w * kl_prcp), kl_prcp value agg(w * kl_prcp) >= 0 for logging)."""
    kl = kl_prcp_tokens(log_probs, masked_log_probs, estimator)  # (B, T)
    if weights is not None:
        kl = kl * weights.to(kl.dtype)[:, None]
    if clip is not None:
        kl = kl.clamp(0.0, clip)
    if token_top_p is not None:
        kl = torch.where(token_top_p_mask(kl, mask, token_top_p), kl, torch.zeros((), device=kl.device))
    value = aggregate(kl, mask, agg, norm_length)  # denominators stay all valid tokens, as officially
    return -coef * value, value


def sampled_entropy(
    log_probs: Tensor,  # (B, T) log-probs of the sampled tokens
    mask: Tensor,  # (B, T)
) -> Tensor:  # () token-mean NLL of the sampled tokens, the official one-sample entropy estimate
    return masked_mean(-log_probs.float(), mask)


def double_entropy_loss(
    entropy: Tensor,  # () entropy estimate under the full image (with grad)
    masked_entropy: Tensor,  # () entropy estimate under the masked image (grad only in with-grad mode)
    coef: float,  # eta_1
    masked_coef: float,  # eta_2
    scale: float = 1.0,  # d = gamma_now / gamma_config under the linear schedule
) -> Tensor:  # () + eta_1 * d * H + eta_2 * d * H_mask: minimising it keeps both entropies low
    return scale * (coef * entropy + masked_coef * masked_entropy)


def entropy_band_loss(
    entropy: Tensor,  # () mean entropy under the full image
    masked_entropy: Tensor | None,  # () mean entropy under the masked image, or None
    low: float,  # h_min
    high: float,  # h_max
    coef: float,
) -> Tensor:  # () coef * (hinge below low + hinge above high), summed over both policies
    """Band-limited double entropy (a variant from a third-party write-up, not the authors' code): instead of
    always pushing both entropies down, penalise them only outside [low, high] (that write-up: 0.1, 2.0, 0.01)."""
    terms = [entropy] + ([masked_entropy] if masked_entropy is not None else [])
    return coef * sum(torch.relu(low - h) + torch.relu(h - high) for h in terms)


def relative_kl_prcp_coef(
    fraction: float,  # the perception term's size as a fraction of the policy loss (0.5 in that write-up)
    pg_loss: Tensor,  # () policy-gradient loss of this micro-batch
    kl_prcp: Tensor,  # () aggregated KL_prcp of this micro-batch
    eps: float = 1e-8,
) -> Tensor:  # () detached gamma with gamma * KL_prcp == fraction * |pg_loss|
    """A variant from a third-party write-up: weight the perception loss relative to the policy loss rather than
    by a fixed gamma. The coefficient is detached, so gradients keep the form -gamma * grad KL_prcp."""
    return (fraction * pg_loss.detach().abs() / (kl_prcp.detach().abs() + eps)).detach()


def perception_reward(
    old_log_probs: Tensor,  # (B, T) full image, the rollout policy
    masked_log_probs: Tensor,  # (B, T) masked image, same tokens
    mask: Tensor,  # (B, T)
    coef: float,
    estimator: str = "low_var_kl",
) -> Tensor:  # (B,) coef * sum_t KL_prcp_t: what adding KL_prcp to each token's reward adds to a response's score
    """Perception-augmented reward: the authors' unused ``apply_kl_contrastive`` adds gamma * KL(old, masked) to
    the token-level reward; with outcome advantages a response's score is the sum of its token rewards."""
    kl = kl_prcp_tokens(old_log_probs, masked_log_probs, estimator) * mask.to(old_log_probs.dtype)
    return coef * kl.sum(-1)
