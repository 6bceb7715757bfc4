"""Every generator a step draws from is saved with the checkpoint and restored exactly."""

import io
import random

import numpy as np
import torch

from papo.training.rng import rng_state, set_rng_state


def _draws():
    return (torch.rand(3).tolist(), random.random(), float(np.random.rand()))


def test_rng_state_round_trips_through_a_weights_only_checkpoint():
    torch.manual_seed(5)
    random.seed(6)
    np.random.seed(7)
    buf = io.BytesIO()
    torch.save({"rng": rng_state()}, buf)
    expected = _draws()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True)["rng"])  # no pickle: plain tensors, lists and numbers
    assert _draws() == expected


def test_older_checkpoints_hold_only_the_cpu_state():
    torch.manual_seed(1)
    state = {"cpu": torch.get_rng_state()}
    expected = torch.rand(2)
    torch.manual_seed(2)
    set_rng_state(state)
    assert torch.equal(torch.rand(2), expected)
