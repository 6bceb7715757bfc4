"""Parameter dtype vs compute dtype: the one precision choice the trainer, the rollout engine and (later) the
FSDP2 mixed-precision policy all read.

* ``param_dtype``: what the master weights, their gradients and the optimizer states are stored in.
* ``compute_dtype``: what the forward and backward matmuls run in (``torch.autocast``) and what the rollout
  engine's own weight copy is stored in.

The CUDA default is float32 master weights with bfloat16 compute, as EasyR1, verl and NeMo-RL run by default:
at the authors' lr of 1e-6 an update is far below bfloat16's resolution (8 bits of mantissa: about 0.4% of a
weight), so bfloat16 weights updated by plain AdamW barely move. The memory-lean alternative keeps bfloat16
weights and lets a Kahan-compensated AdamW carry the lost low-order bits (``papo.training.optim``), which is the authors'
scheme (AnyPrecisionAdamW with bfloat16 states).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_of(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class Precision:
    param_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check(self.param_dtype, self.compute_dtype)

    @classmethod
    def resolve(cls, param_dtype: str, compute_dtype: str, device: str | torch.device) -> Precision:
        """``compute_dtype="auto"``: bfloat16 on CUDA, else the parameter dtype (CPU autocast is slow)."""
        param = dtype_of(param_dtype)
        if compute_dtype == "auto":
            compute = torch.bfloat16 if torch.device(device).type == "cuda" else param
        else:
            compute = dtype_of(compute_dtype)
        return cls(param, compute)

    @property
    def mixed(self) -> bool:
        return self.param_dtype != self.compute_dtype

    @property
    def low_precision_params(self) -> bool:
        return self.param_dtype in (torch.bfloat16, torch.float16)

    def autocast(self, device: str | torch.device) -> Any:
        """The region where forwards run in the compute dtype (no-op when parameters already are)."""
        if not self.mixed:
            return nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.compute_dtype)

    def describe(self) -> str:
        p, c = DTYPE_NAMES[self.param_dtype], DTYPE_NAMES[self.compute_dtype]
        return f"{p} weights" + (f", {c} compute" if self.mixed else "")


def check(param: torch.dtype, compute: torch.dtype) -> None:
    """Combinations papo trains correctly; anything else fails with the reason."""
    if torch.finfo(compute).bits > torch.finfo(param).bits:
        raise ValueError(f"compute_dtype {DTYPE_NAMES[compute]} is wider than param_dtype {DTYPE_NAMES[param]}: "
                         "autocast only lowers precision; raise param_dtype instead")
    if compute == torch.float16 and param != torch.float16:
        raise ValueError("compute_dtype float16 under float32 weights needs loss scaling, which papo does not do; "
                         "use bfloat16")


MATMUL_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)  # autocast casts their weights


@torch.no_grad()
def store_for_compute(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """A frozen model that runs under ``precision.autocast`` (the reference policy): the weights and biases
    autocast casts for every matmul and convolution are stored in the compute dtype instead, the very values it
    would cast them to. The model's outputs are bitwise the same, at half the memory for those weights and with
    no cast kernel per forward. Norms stay in the parameter dtype, and so does a parameter that a module autocast
    does not cast for also reads (tied input embeddings): its lookups would otherwise change the residual
    stream's dtype."""
    if not precision.mixed:
        return model
    cast_only: dict[int, bool] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            cast_only[id(param)] = cast_only.get(id(param), True) and isinstance(module, MATMUL_MODULES)
    lowered: dict[int, torch.nn.Parameter] = {}  # a tensor shared by several matmul modules stays shared
    for module in model.modules():
        if not isinstance(module, MATMUL_MODULES):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if cast_only[id(param)] and param.dtype == precision.param_dtype:
                if id(param) not in lowered:
                    lowered[id(param)] = torch.nn.Parameter(param.to(precision.compute_dtype), requires_grad=False)
                setattr(module, name, lowered[id(param)])
    return model
