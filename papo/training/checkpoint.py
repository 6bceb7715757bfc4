"""Atomic, pickle-free training checkpoints: an HF model directory plus the trainer state.

A checkpoint is written to ``step-N.tmp``, flushed to disk, and renamed to ``step-N`` only when complete, so a
crash or a full disk mid-write never leaves a half checkpoint where a resume would look, and older checkpoints
are pruned only after the new one is in place. Optimizer/RNG state is loaded with
``torch.load(weights_only=True)``: no arbitrary pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from papo.errors import CheckpointError
from papo.training.faults import failpoint

_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1][1] if dirs else None


def save_checkpoint(root: Path, step: int, policy: Any, state: dict[str, Any], keep_last: int) -> Path:
    final, tmp = _prepare(root, step)
    try:
        policy.save(tmp)
        failpoint("checkpoint.model")
        _commit(root, tmp, final, step, state)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, OSError):
            raise
        previous = latest_checkpoint(root)
        raise CheckpointError(
            f"could not write checkpoint step-{step} in {root}: {err.strerror or err}. "
            + (f"The previous checkpoint {previous.name} is intact; free space and continue with --resume."
               if previous else "No earlier checkpoint exists.")) from err
    failpoint("checkpoint.rename")
    _prune(root, keep_last)
    return final


def save_sharded_checkpoint(root: Path, step: int, model: Any, optim: Any, state: dict[str, Any], rank: int,
                            barrier: Any, keep_last: int) -> Path:
    """Every rank calls this: model and optimizer shards through torch.distributed.checkpoint (``dcp/``, which
    loads at any world size), each rank's RNG state (``rng-<rank>.pt``), and the trainer state from the main
    rank; then the main rank renames ``step-N.tmp`` into place, as ``save_checkpoint`` does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    if rank == 0:
        _prepare(root, step)
        tmp.mkdir()
    barrier()
    model_state, optim_state = get_state_dict(model, optim)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
    torch.save(state.pop("rng"), tmp / f"rng-{rank}.pt")
    failpoint("checkpoint.model")
    barrier()
    if rank == 0:
        _commit(root, tmp, final, step, state)
        failpoint("checkpoint.rename")
        _prune(root, keep_last)
    barrier()
    return final


def _prepare(root: Path, step: int) -> tuple[Path, Path]:
    """(step-N, step-N.tmp) under ``root``, with any .tmp a process killed mid-write left removed."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return root / f"step-{step}", root / f"step-{step}.tmp"


def _commit(root: Path, tmp: Path, final: Path, step: int, state: dict[str, Any]) -> None:
    """The trainer state into ``tmp``, everything fsynced, then ``tmp`` renamed to ``final``."""
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "data_pos": state.get("data_pos")}))
    _fsync_tree(tmp)
    failpoint("checkpoint.state")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)


def _prune(root: Path, keep_last: int) -> None:
    for _, old in checkpoint_dirs(root)[:-keep_last]:  # only once the new checkpoint is in place
        shutil.rmtree(old, ignore_errors=True)


def load_sharded_checkpoint(path: Path, model: Any, optim: Any, rank: int) -> dict[str, Any]:
    """Model and optimizer from ``dcp/`` (resharded to this world size), the trainer state, and this rank's RNG
    state (rank 0's when the checkpoint was written by fewer processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optim)
    both = {"model": model_state, "optim": optim_state}
    dcp.load(both, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optim, model_state_dict=both["model"], optim_state_dict=both["optim"])
    state = load_trainer_state(path)
    rng = path / f"rng-{rank}.pt"
    state["rng"] = torch.load(rng if rng.exists() else path / "rng-0.pt", weights_only=True, map_location="cpu")
    return state


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / "dcp").is_dir()


def load_sharded_policy(ckpt: Path) -> Any:
    """The policy of a sharded checkpoint, whole, in one process: the run's model (``config.yaml`` two levels
    up names it) with the checkpoint's weights (``papo model export`` writes it as a Hugging Face directory)."""
    import torch.distributed.checkpoint as dcp
    import yaml
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from papo.models.loading import ModelOptions
    from papo.models.policy import Policy

    config = ckpt.parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: a sharded checkpoint is read with its run's config.yaml")
    model = yaml.safe_load(config.read_text())["model"]
    opts = ModelOptions(param_dtype=model.get("param_dtype", "float32"), lora_rank=model.get("lora_rank", 0))
    policy = Policy.from_pretrained(model["name"], opts)  # under LoRA with its adapters: ``save`` merges them
    state = get_model_state_dict(policy.model)
    dcp.load({"model": state}, checkpoint_id=str(ckpt / "dcp"))
    set_model_state_dict(policy.model, state)
    return policy


def _fsync_tree(folder: Path) -> None:
    # rename is atomic, but without fsync a power cut can leave the renamed files empty
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
