"""The Python API: ``papo.train(...)`` does what ``papo train`` does, from a notebook or a script.

    import papo
    result = papo.train("papo_g", {"rollout.n": 4, "trainer.max_steps": 20}, dataset=rows, reward=my_reward,
                        out="runs/notebook")

Everything the command line can set is a config key (``papo/config.py``); the objects the command line cannot
name come as arguments: a training set in memory and a reward function.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from papo.config.schema import ConfigError, TrainConfig, apply, load_config
from papo.training.loop import run_train


def train(preset: str = "papo_g", overrides: Mapping[str, Any] | Sequence[str] = (), *, config: TrainConfig | None = None,
          model: str | None = None, dataset: Any = None, reward: str | Callable[..., dict] | None = None,
          out: str | Path | None = None, max_steps: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Train as ``papo train`` does; returns ``{"before", "after", "steps", "warnings", "out"}``.

    ``preset``: one of ``papo.config.schema.PRESETS`` (grpo, papo_g, ..., vppo, pgpo, noisy_rollout, dvrp), or
    ``config``: a ``TrainConfig`` (e.g. a loaded ``config.yaml``) used instead. ``overrides``:
    ``{"rollout.n": 4}`` or ``["rollout.n=4"]``.
    ``dataset``: a data spec (file, directory, hub id, ``synthetic:...``), a ``datasets.Dataset``, or a list of
    row dicts with the columns papo's loaders read (prompt / answer / images; ``papo.data.load_samples``).
    ``reward``: a registered name, ``"file.py:function"``, or a callable
    ``fn(response, answer, answer_type="math", meta=None, **kw) -> {"overall": float, ...}``.
    """
    items = list(overrides.items()) if isinstance(overrides, Mapping) else [_split(item) for item in overrides]
    if model is not None:
        items.append(("model.name", model))
    if isinstance(dataset, (str, Path)):
        items.append(("data.train", str(dataset)))
    elif dataset is not None:
        items.append(("data.train", f"<{type(dataset).__name__} in memory>"))  # what config.yaml records
    if isinstance(reward, str):
        items.append(("algorithm.reward", reward))
    elif reward is not None:
        items.append(("algorithm.reward", f"python:{getattr(reward, '__qualname__', type(reward).__name__)}"))
    if max_steps is not None:
        items.append(("trainer.max_steps", max_steps))
    if device is not None:
        items.append(("trainer.device", device))
    if config is None:
        cfg = load_config(preset, overrides=[f"{k}={_as_text(v)}" for k, v in items])
    else:
        cfg = copy.deepcopy(config)
        for key, value in items:
            apply(cfg, key, value)
        cfg.validate()
    out = str(out or f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    in_memory = None if dataset is None or isinstance(dataset, (str, Path)) else dataset
    result = run_train(cfg, out, train_data=in_memory, reward=None if reward is None or isinstance(reward, str) else reward)
    return {**result, "out": out}


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"overrides take KEY=VALUE, got {item!r}")
    return key.strip(), value.strip()


def _as_text(value: Any) -> str:
    """A Python value as the text ``--set`` would carry (lists and None as YAML reads them)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_as_text(v) for v in value) + "]"
    return str(value)
