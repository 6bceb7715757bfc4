"""Token visual dependency, and how VPPO and PGPO use it to choose and weigh policy-gradient tokens.

A token's visual dependency is how much the image it was sampled with mattered for it: the k3 estimate of
KL(pi_old(.|q, I) || pi_old(.|q, I')) on the sampled token, with I' the image with patches blackened. It comes
from the old policy, without gradient, from the same two no-grad forwards PAPO already runs (old and masked).

VPPO (Huang et al., ICLR 2026, arXiv 2510.09285; the authors' code, VPPO-RL at a23c54b, ``dp_actor.py``):

* token gradient filtering (TGF): in each response, the ceil(rho * T_i) tokens of highest dependency keep
  their advantage and the others get none. The loss's token mean still counts every response token.
* trajectory advantage shaping (TAS): a response's mean dependency S_i is scaled to
  n_i = clamp((S_i - lo) / (hi - lo), 0, 1), where lo and hi are the lowest and highest S_i of the mini-batch.
  Then alpha_i = beta_min + (1 - beta_min) * n_i / mean(n), with the mean over the micro-batch, so alpha
  averages 1 over it. alpha is 1 when hi - lo <= 1e-6, or when the micro-batch has fewer than two responses.
  The response's advantage is multiplied by alpha_i.

Where papo differs from the authors' code (docs/algorithm.md): lo and hi span the whole mini-batch on every
rank, where the authors take each GPU's share, so papo's scales do not depend on the GPU count.

PGPO (arXiv 2604.01840; no official code is public: the formulas follow the re-implementation in the
perception-aware RLVR collection and its reading of the paper's Eqs. 6-7) reshapes each response's token
advantages without changing their sum:

* s_t = log(1 + S_t), scaled per response to I_t = (s_t - min s) / (max s - min s);
* w~_t = I_t / tau below the threshold tau, 1 + beta (I_t - tau) / (1 - tau) at or above it;
* w_t = w~_t * T_i / sum w~ (mass-conserving: the weights average 1 over the response; all 1 if they sum to 0);
* A_{i,t} = w_t A_i.

PGPO's paper scores dependency against a text-only pass (attention to the image tokens masked); papo uses its
masked-image pass, the one forward every method here shares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from papo.algo.kl import kl_estimate

FLAT_RANGE = 1e-6  # hi - lo at or below this: every response is scaled by 1


def token_dependency(
    old_log_probs: Tensor,  # (B, T) log pi_old(o_t | q, I)
    masked_log_probs: Tensor,  # (B, T) log pi_old(o_t | q, I'), the masked image
) -> Tensor:  # (B, T) float32, no grad
    return kl_estimate(old_log_probs.detach(), masked_log_probs.detach(), "low_var_kl").clamp(min=0.0)


def mean_dependency(dependency: Tensor, mask: Tensor) -> Tensor:  # (B, T), (B, T) -> (B,)
    """Each response's mean over its tokens (0 for an empty response)."""
    m = mask.float()
    return (dependency.float() * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def top_dependent_tokens(
    dependency: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) valid response tokens
    ratio: float,  # rho: share of each response's tokens that keep their advantage
) -> Tensor:  # (B, T) bool: exactly ceil(ratio * T_i) tokens per response (ties broken by position)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"the share of tokens kept must be in (0, 1], got {ratio}")
    valid = mask.bool()
    keep = torch.ceil(valid.sum(-1) * ratio).long()  # (B,)
    scores = torch.where(valid, dependency.float(), torch.full((), float("-inf"), device=dependency.device))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranked = torch.arange(scores.shape[-1], device=scores.device)[None] < keep[:, None]  # (B, T) in sorted order
    return torch.zeros_like(valid).scatter(-1, order, ranked) & valid


def trajectory_scales(
    mean_dep: Tensor,  # (B,) S_i of the micro-batch's responses
    valid: Tensor,  # (B,) bool: responses with at least one token
    lo: float,  # lowest and highest S_i of the mini-batch
    hi: float,
    beta_min: float,
) -> Tensor:  # (B,) alpha_i
    if not 0.0 <= beta_min <= 1.0:
        raise ValueError(f"the lowest advantage scale must be in [0, 1], got {beta_min}")
    ones = torch.ones_like(mean_dep, dtype=torch.float32)
    if hi - lo <= FLAT_RANGE or int(valid.sum()) < 2:
        return ones
    n = ((mean_dep.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
    mu = n[valid.bool()].mean()
    return torch.where(valid.bool(), beta_min + (1.0 - beta_min) * n / (mu + 1e-8), ones)


def vppo_advantages(
    advantages: Tensor,  # (B,) one per response (GRPO's group-normalised reward)
    dependency: Tensor,  # (B, T) token_dependency
    mask: Tensor,  # (B, T)
    lo: float,
    hi: float,
    token_ratio: float = 0.4,
    beta_min: float = 0.9,
) -> Tensor:  # (B, T) per-token advantages: alpha_i * A_i on the kept tokens, 0 elsewhere
    """TAS and TGF for one micro-batch (the loss's token-mean group); lo and hi come from ``dependency_range``
    over its mini-batch."""
    valid = mask.bool().any(-1)
    alpha = trajectory_scales(mean_dependency(dependency, mask), valid, lo, hi, beta_min)
    keep = top_dependent_tokens(dependency, mask, token_ratio)
    return (alpha * advantages.float())[:, None] * keep.float()


def dependency_range(mean_dep: Tensor, valid: Tensor) -> tuple[float, float]:
    """(lo, hi): the lowest and highest mean dependency of the responses with tokens; (inf, -inf) when none,
    so that a minimum and maximum over several processes' ranges ignore an empty one."""
    values = mean_dep[valid.bool()]
    if values.numel() == 0:
        return float("inf"), float("-inf")
    return float(values.min()), float(values.max())


def pgpo_weights(
    dependency: Tensor,  # (B, T)
    mask: Tensor,  # (B, T)
    threshold: float = 0.4,  # tau
    boost: float = 2.0,  # beta
) -> Tensor:  # (B, T) token weights averaging 1 over each response's tokens, 0 on padding
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"the PGPO threshold must be in (0, 1), got {threshold}")
    if boost < 0:
        raise ValueError(f"the PGPO boost must be >= 0, got {boost}")
    valid = mask.bool()
    m = valid.float()
    s = torch.log1p(dependency.float().clamp(min=0.0))
    inf = torch.full((), float("inf"), device=s.device)
    lo = torch.where(valid, s, inf).amin(-1, keepdim=True)
    hi = torch.where(valid, s, -inf).amax(-1, keepdim=True)
    scaled = ((s - lo) / (hi - lo).clamp(min=1e-8)).clamp(0.0, 1.0)
    raw = torch.where(scaled < threshold, scaled / threshold, 1.0 + boost * (scaled - threshold) / (1.0 - threshold)) * m
    total = raw.sum(-1, keepdim=True)
    weights = raw * m.sum(-1, keepdim=True) / total.clamp(min=1e-8)
    return torch.where(total > 1e-8, weights, m)


def pgpo_advantages(
    advantages: Tensor,  # (B,)
    dependency: Tensor,  # (B, T)
    mask: Tensor,  # (B, T)
    threshold: float = 0.4,
    boost: float = 2.0,
) -> Tensor:  # (B, T)
    return advantages.float()[:, None] * pgpo_weights(dependency, mask, threshold, boost)
