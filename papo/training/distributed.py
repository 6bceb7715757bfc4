"""The distributed context the training loop runs in: rank, world size, the main-rank check and reductions.

One process is world size 1 and every reduction is the identity. Under ``torchrun`` (an initialised default
process group) the same calls become collectives, so a decision that skips or stops a step is taken from
every rank's view at once and all ranks agree on it. Only the main rank writes files. A process group means
sharded training (FSDP2), also for one process: ``torchrun --nproc-per-node 1`` runs the sharded path whole
(hooks, gathers, checkpoints) on one GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # where reductions run: NCCL needs CUDA tensors, gloo takes CPU ones
    group: bool = False  # a process group joins the processes (torchrun): the model is sharded, at any size

    @classmethod
    def current(cls, device: str = "cpu") -> DistContext:
        """The default process group's rank and size if one is initialised, else a single process."""
        if dist.is_available() and dist.is_initialized():
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            return cls(dist.get_rank(), dist.get_world_size(), backend_device if device == "cpu" else device, group=True)
        return cls(device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _all_reduce(self, values: list[float], op) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, *values: float) -> list[float]:
        return self._all_reduce([float(v) for v in values], dist.ReduceOp.SUM)

    def mean(self, *values: float) -> list[float]:
        return [v / self.world_size for v in self.sum(*values)]

    def max(self, *values: float) -> list[float]:
        return self._all_reduce([float(v) for v in values], dist.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: a step one rank must skip is skipped by all."""
        return self._all_reduce([1.0 if flag else 0.0], dist.ReduceOp.MAX)[0] > 0

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (any picklable object, e.g. the causes of a skipped step), in rank order."""
        if self.world_size == 1:
            return [value]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of ``items`` (a multiple of the world size: the config checks)."""
        if self.world_size == 1:
            return list(items)
        if len(items) % self.world_size:
            raise ValueError(f"{len(items)} items do not split evenly over {self.world_size} processes")
        per = len(items) // self.world_size
        return list(items[self.rank * per:(self.rank + 1) * per])

    def padded_share(self, items: Sequence[T]) -> tuple[list[T], int, int]:
        """For work whose size need not divide by the world size (held-out checks): this rank's contiguous share,
        padded to the same length on every rank by repeating an item, so every rank makes the same number of
        collective calls. Returns (share, index of its first item in ``items``, how many of it are real)."""
        per = -(-len(items) // self.world_size)
        first = min(self.rank * per, len(items))
        share = list(items[first:first + per])
        real = len(share)
        filler = share[-1:] or list(items[-1:])
        return share + filler * (per - real), first, real

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_from_env(device: str) -> tuple[DistContext, str]:
    """Under torchrun (LOCAL_RANK in the environment, one process or several): join the process group, NCCL
    on GPUs and gloo on CPUs, and pin this process to its local GPU. Returns the context and this process's
    device."""
    launched = "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched or (dist.is_available() and dist.is_initialized()):
        return DistContext.current(device), device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistContext.current(device), device
