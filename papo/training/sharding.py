"""FSDP2 for the policy and the reference model: one shard group per transformer block, mixed precision.

Each block transformers will not split (``model._no_split_modules``: Qwen2.5-VL's decoder layers and vision
blocks) becomes one ``fully_shard`` unit, and the root (``Policy.root``, the module every scoring and sampling call goes through) holds
the rest (embeddings, LM head, norms). With a
16-bit compute dtype over fp32 parameters, FSDP keeps the fp32 master shards, gathers bf16 copies for each
block's forward and backward, and reduces gradients in fp32 (verl's and EasyR1's policy). Parameter names do
not change, so optimizers, the rollout engine's ``load_weights`` and checkpoints see the same keys at any
world size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from papo.errors import ConfigError
from papo.models.loading import transformer_blocks
from papo.models.policy import RootCall
from papo.models.precision import Precision


def shard_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: ``transformer_blocks``, which must exist."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer blocks (_no_split_modules); cannot shard it per block")
    return blocks


def shard_model(root: RootCall, precision: Precision, device: torch.device, world_size: int) -> RootCall:
    """Shard ``root.model`` in place across the default process group (one mesh dimension of ``world_size``):
    its blocks one by one, everything else in ``root``, the module every scoring and sampling call goes
    through."""
    mesh = init_device_mesh(device.type, (world_size,))
    block_kwargs: dict[str, Any] = {}
    root_kwargs: dict[str, Any] = {}
    if precision.compute_dtype != precision.param_dtype:
        mixed = {"param_dtype": precision.compute_dtype, "reduce_dtype": torch.float32}
        # Only the root casts its inputs. A block takes what the model computed for it, as it does unsharded:
        # FSDP2 (torch 2.11) casts a block's inputs in the forward but not when activation checkpointing
        # recomputes it, so a cast would give the recomputation other inputs (fp32 vision rope tables where the
        # forward saw bf16).
        block_kwargs["mp_policy"] = MixedPrecisionPolicy(**mixed, cast_forward_inputs=False)
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(**mixed)
    for block in shard_blocks(root.model):
        fully_shard(block, mesh=mesh, **block_kwargs)
    fully_shard(root, mesh=mesh, **root_kwargs)
    return root


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rank calls this; the main rank gets the whole model's tensors on the CPU, the others an empty dict."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_world_size(cfg: Any, world_size: int) -> None:
    """Batch sizes that split evenly over the processes."""
    t = cfg.trainer
    for key, value in (("trainer.rollout_batch_size", t.rollout_batch_size), ("trainer.mini_batch_size", t.mini_batch_size),
                       ("trainer.gen_batch_size", t.gen_batch_size)):
        if value % world_size:
            raise ConfigError(f"{key}={value} must be a multiple of the number of processes ({world_size}): "
                              "prompts are split evenly across ranks")
