"""Counter-based sampling noise: the tokens of a rollout depend on its key, never on where it was sampled.

A rollout's key is a pure function of (seed, prompt draw, sample index); the noise for its token at column t
over vocabulary entry v is a hash of (key, t, v) (splitmix64's finaliser in counter mode). Sampling is an
exponential race: the token is argmax_v p_v / E_v with E_v = -log U_v, which draws v with probability p_v
(Gumbel-max in another form). So the same seed gives the same rollouts at any batch size, row order, number
of processes, and in either engine; and with no generator state, the noise can be computed inside a captured
CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


GOLDEN = _signed(0x9E3779B97F4A7C15)  # splitmix64's increment
_SEED_SALT = _signed(0xD1B54A32D192ED03)  # keeps seed 0 away from the fixed point mix(0) = 0
_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic): a bijection that scrambles every bit."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


TRAINING, HELDOUT = 0, 1  # noise streams: training rollouts, and held-out checks (never the same noise)


def rollout_keys(seed: int, draws: Tensor, n: int, stream: int = TRAINING) -> Tensor:
    """(B,) prompt draw indices -> (B * n,) int64 keys, prompt-major: sample j of draw d has key(seed, stream, d, j)."""
    # one splitmix64 step per level (seed, stream, draw, sample): index * increment added to a scrambled state
    run = mix(torch.tensor(seed, dtype=torch.long) + _SEED_SALT)
    if stream != TRAINING:  # stream 0 keeps the keys runs were trained with before streams existed
        run = mix(run + _signed(stream * GOLDEN % (1 << 64)))
    per_draw = mix(run + (draws.long() + 1) * GOLDEN)  # (B,)
    j = torch.arange(1, n + 1, dtype=torch.long)
    return mix(per_draw.repeat_interleave(n) + j.repeat(len(draws)) * GOLDEN)


def random_keys(rows: int) -> Tensor:
    """Keys from torch's default generator, for callers that do not key their rollouts."""
    return torch.randint(-(1 << 63), (1 << 63) - 1, (rows,), dtype=torch.long)


def exponential_noise(keys: Tensor, column: Tensor, vocab: int) -> Tensor:
    """(b,) keys, (b,) or (1,) token columns -> (b, vocab) float32 Exp(1) draws, one per (key, column, token)."""
    v = torch.arange(vocab, device=keys.device, dtype=torch.long)
    counter = column.long()[:, None] * vocab + v[None]  # (b, V)
    return -torch.log(uniform(mix(keys[:, None] + counter * GOLDEN)))


def uniform(bits: Tensor) -> Tensor:
    """int64 random bits -> float32 in (0, 1), never 0 or 1: the top 23 bits k give (k + 0.5) / 2^23, exact in
    float32 (with 24 bits, (2^24 - 1) + 0.5 rounds to 2^24 and u to 1: an Exp draw of 0 would turn the race's
    p / E into inf, or NaN for a token outside the nucleus)."""
    return (_shr(bits, 41).float() + 0.5) * (1.0 / (1 << 23))
