"""The optimizer and learning-rate schedule of ``papo train``.

AdamW with torch's defaults (betas 0.9 / 0.999, eps 1e-8, decoupled weight decay), as the authors run it. With
16-bit parameters it is torch-optimi's AdamW with Kahan summation: each update is added to the weight through a
16-bit compensation buffer that keeps the low-order bits a plain bfloat16 add would drop, so an lr of 1e-6
still moves the weights (the authors' ``adamw_bf16``, AnyPrecisionAdamW, does the same with bfloat16 moments).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from papo.models.precision import Precision

BETAS = (0.9, 0.999)
EPS = 1e-8


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, precision: Precision,
                    kahan_summation: bool | None = None) -> torch.optim.Optimizer:
    """``kahan_summation``: None = on exactly when the parameters are 16-bit."""
    kahan = precision.low_precision_params if kahan_summation is None else kahan_summation
    params = list(params)
    if not kahan:
        return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    try:
        import optimi
    except ImportError:
        raise ImportError("Kahan-compensated AdamW needs torch-optimi: pip install torch-optimi") from None
    return optimi.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay, kahan_sum=True)


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the configured lr over ``warmup_steps`` updates, then constant. The first update already
    uses lr / warmup_steps (the authors' schedule, min(1, s / w), gives lr 0 to the first step: docs/algorithm.md)."""
    warm = max(1, warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
