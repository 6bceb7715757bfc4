"""Every random-number generator a training step draws from, saved and restored for exact resume.

Sampling draws from torch's CPU generator (on the CPU) or the CUDA generator of the process's device
(CUDA-graph replays included); dropout from the same; masks and synthetic data from keyed
numpy generators that need no state. Python's and numpy's global generators are saved too, so that a reward function
or a user's data code that draws from them resumes where it stopped. Everything is plain tensors and ints, so
the state loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "cpu": torch.get_rng_state(),
        "python": [version, list(words), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device (one per rank)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (missing parts stay as they are: older checkpoints hold only "cpu")."""
    torch.set_rng_state(state["cpu"])
    if "python" in state:
        version, words, gauss = state["python"]
        random.setstate((version, tuple(words), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
