"""Activation checkpointing of the transformer blocks (decoder layers and vision blocks): how much of each
block's forward the backward recomputes.

* ``none``: keep every activation (fastest, most memory);
* ``full``: keep only each block's input and recompute its whole forward in the backward (least memory, about
  a third more compute);
* ``selective``: keep the outputs of matrix multiplies and attention, recompute the element-wise rest (norms,
  rope, activations, casts), through torch's selective activation checkpointing. It trades the recomputed
  matmuls for the memory of their outputs, and adds a Python dispatch per operator: whether that beats
  ``full`` depends on the model and GPU (docs/training-at-scale.md has the measurements).

``uncheckpointed`` leaves the last decoder layers out of either mode: they keep their activations, so memory
left over by the rest buys back their recomputation (Megatron's partial recompute).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from papo.errors import ConfigError

MODES = ("none", "full", "selective")

_SAVED_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def checkpoint_mode(value: bool | str) -> str:
    """The config's value (true / false, or a mode name) as one of ``MODES``."""
    if value is True:
        return "full"
    if value is False:
        return "none"
    if value in MODES:
        return str(value)
    raise ValueError(f"gradient checkpointing must be true, false or one of {', '.join(MODES)}, got {value!r}")


def _is_saved(op: Any) -> bool:
    """Matrix multiplies and attention kernels (SDPA's, and the variable-length kernel of packed passes): the
    operations whose recomputation costs FLOPs rather than memory traffic."""
    name = str(op)
    return op in _SAVED_MATMULS or "attention" in name or "attn" in name


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if _is_saved(op) else CheckpointPolicy.PREFER_RECOMPUTE


def set_checkpointing(model: torch.nn.Module, mode: bool | str, uncheckpointed: int = 0) -> None:
    """Apply ``mode`` to a transformers model's checkpointable blocks (``gradient_checkpointing_enable``),
    except the last ``uncheckpointed`` decoder layers."""
    mode = checkpoint_mode(mode)
    layers = model.get_decoder().layers if uncheckpointed else []
    if not 0 <= uncheckpointed <= len(layers) or (uncheckpointed and mode == "none"):
        raise ConfigError(f"model.uncheckpointed_layers={uncheckpointed}: it needs gradient checkpointing on and at most "
                          f"the model's {len(layers)} decoder layers")
    if mode == "none":
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    for layer in list(layers)[len(layers) - uncheckpointed :] if uncheckpointed else []:
        layer.gradient_checkpointing = False
