"""Reduce a per-token loss matrix to a scalar.

The official PAPO code uses "token-mean" over each micro-batch (verl's ``average_loss(mode="token")``).
The other modes are the usual alternatives from the GRPO literature (verl ``loss_agg_mode``, Dr.GRPO).

Padding never contributes: values under ``mask == 0`` are replaced by zero with ``torch.where`` rather
than multiplied by the mask, so a NaN or inf in a padded position cannot leak into the result.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
TOKEN_MEAN_SCOPES = ("micro_batch", "mini_batch")

# verl's masked_mean denominator guard; keeps empty micro-batches at 0 instead of NaN.
_EPS = 1e-8


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Token-mean of ``values`` (B, T) over positions where ``mask`` (B, T) is set; 0 if none are."""
    return _masked(values, mask).sum() / (mask.sum().to(values.dtype) + _EPS)


def aggregate(values: Tensor, mask: Tensor, mode: str = "token-mean", norm_length: int | None = None) -> Tensor:
    """Reduce ``values`` to a scalar.

    values: (B, T) per-token values (any float dtype)
    mask:   (B, T) 1 for response tokens, 0 for padding
    mode:
      token-mean              sum over all valid tokens / number of valid tokens (official PAPO/EasyR1)
      seq-mean-token-mean     mean over sequences of each sequence's token-mean (the paper's equation)
      seq-mean-token-sum      mean over sequences of each sequence's token-sum
      seq-mean-token-sum-norm token-sums divided by the constant ``norm_length``, then mean (Dr.GRPO)
    Sequences without any valid token are left out of the sequence means.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same shape")
    if mode == "token-mean":
        return masked_mean(values, mask)
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {', '.join(AGG_MODES)}")

    tokens = mask.sum(-1).to(values.dtype)  # (B,)
    seq_sum = _masked(values, mask).sum(-1)  # (B,)
    if mode == "seq-mean-token-mean":
        per_seq = seq_sum / tokens.clamp(min=1)
    elif mode == "seq-mean-token-sum":
        per_seq = seq_sum
    else:
        if not norm_length or norm_length <= 0:
            raise ValueError("seq-mean-token-sum-norm needs a positive norm_length (e.g. the max response length)")
        per_seq = seq_sum / norm_length
    has_tokens = tokens > 0
    return _masked(per_seq, has_tokens).sum() / (has_tokens.sum().to(values.dtype) + _EPS)


def micro_batch_weight(scope: str, micro_batches: int, tokens: float, total_tokens: float, world_size: int = 1) -> float:
    """The factor on one micro-batch's token-mean loss before backward, so that the mini-batch gradient (which
    data-parallel ranks then average) is the intended mean.

    "micro_batch" (the authors'): the mean of the micro-batch means, 1 / micro_batches; a token's weight then
    depends on how many valid tokens share its micro-batch. "mini_batch": every valid token of the mini-batch,
    on every rank, weighs 1 / total_tokens, so results do not depend on micro-batch size or world size:
    tokens / total_tokens, times world_size to undo the ranks' average.
    """
    if scope == "micro_batch":
        return 1.0 / micro_batches
    if scope == "mini_batch":
        return world_size * tokens / max(total_tokens, 1.0)
    raise ValueError(f"token-mean scope must be one of {', '.join(TOKEN_MEAN_SCOPES)}, got {scope!r}")
