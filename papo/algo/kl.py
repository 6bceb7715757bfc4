"""Per-token KL estimators and entropies.

``kl_estimate(log_p, log_q, kind)`` estimates KL(p || q) on tokens sampled from p, following EasyR1/verl
``compute_kl``; everything runs in float32:

  k1  (``kl``)          log p - log q
  abs                   |log p - log q|
  k2  (``mse``)         0.5 * (log p - log q)^2
  k3  (``low_var_kl``)  x = clamp(log q - log p, -20, 20); clamp(exp(x) - x - 1, -10, 10)   (Schulman 2020)

Only k3 carries clamps in the official code; they bound both its value and its gradient (a saturated token
has zero gradient). The reference KL uses q = pi_ref and PAPO's KL_prcp uses q = pi_mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ALIASES = {"k1": "kl", "kl": "kl", "abs": "abs", "k2": "mse", "mse": "mse", "k3": "low_var_kl", "low_var_kl": "low_var_kl"}
KL_ESTIMATORS = tuple(_ALIASES)
K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


def canonical_kl_estimator(kind: str) -> str:
    if kind == "full":
        raise ValueError("the 'full' KL needs full-vocabulary distributions; use k1, abs, k2 (mse) or k3 (low_var_kl)")
    if kind not in _ALIASES:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    return _ALIASES[kind]


def kl_estimate(
    log_p: Tensor,  # (B, T) log-probs of the sampled tokens under the sampling policy p
    log_q: Tensor,  # (B, T) log-probs of the same tokens under the other policy q
    kind: str = "low_var_kl",
) -> Tensor:  # (B, T) float32 per-token estimate of KL(p || q)
    kind = canonical_kl_estimator(kind)
    log_p, log_q = log_p.float(), log_q.float()
    if kind == "kl":
        return log_p - log_q
    if kind == "abs":
        return (log_p - log_q).abs()
    if kind == "mse":
        return 0.5 * (log_p - log_q).square()
    x = (log_q - log_p).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (x.exp() - x - 1.0).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Exact entropy of softmax(logits) over the last axis: (..., V) -> (...), in float32.

    Rows that are entirely -inf are not valid distributions; suppressed entries (-inf) contribute zero.
    """
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = (logits - log_z).exp()
    # suppressed ids (-inf) carry no mass: zero their logit before the product, not after it, or the product's
    # gradient (-inf x 0) is nan and poisons every weight
    finite_logits = torch.where(probs > 0, logits, torch.zeros((), device=logits.device))
    return log_z.squeeze(-1) - (probs * finite_logits).sum(-1)
