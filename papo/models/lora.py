"""LoRA weights merged into a plain state dict, from tensors rather than modules.

peft's ``merge_and_unload`` merges module by module, on a copy of the model: a sharded (FSDP2) model can be
neither copied nor merged in place, but its gathered state dict can. So papo saves a LoRA policy, sharded or
not, by merging its state dict: W' = W + scaling * (B @ A) for each adapted linear layer, under the base
model's own parameter names.
"""

from __future__ import annotations

import torch
from torch import Tensor

PEFT_PREFIX = "base_model.model."  # what peft puts in front of the base model's names
ADAPTER = "default"


def lora_scalings(model: torch.nn.Module) -> dict[str, float]:
    """The scaling (alpha / r, or alpha / sqrt(r) under rsLoRA) of every adapted layer, by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: float(module.scaling[ADAPTER]) for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and ADAPTER in module.scaling}


def merge_lora(state_dict: dict[str, Tensor], scalings: dict[str, float]) -> dict[str, Tensor]:
    """A peft model's state dict -> the base model's, adapters merged. Each merge is computed in fp32 and
    stored in the base weight's dtype."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        layer, _, rest = key.partition(".lora_")
        if rest:  # lora_A / lora_B: folded into their base weight below
            if layer not in scalings:
                raise KeyError(f"{key}: an adapter weight of a layer with no LoRA scaling")
            continue
        module, wrapped, param = key.rpartition(".base_layer.")  # an adapted layer's own weight or bias
        if wrapped:
            if param == "weight" and module in scalings:
                a = state_dict[f"{module}.lora_A.{ADAPTER}.weight"].float()  # (r, in)
                b = state_dict[f"{module}.lora_B.{ADAPTER}.weight"].float()  # (out, r)
                value = (value.float() + scalings[module] * (b @ a)).to(value.dtype)
            key = f"{module}.{param}"
        out[key.removeprefix(PEFT_PREFIX)] = value
    return out
