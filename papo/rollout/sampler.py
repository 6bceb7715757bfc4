"""``Sampler``: completions from a ``Policy`` through the fastest engine that can produce them.

``papo.rollout.engine`` for the models it supports (on CUDA with compiled steps and CUDA graphs, on the CPU
eager), transformers ``generate`` otherwise. Before each call the engine is refreshed from the policy's current
weights, so the tokens always come from the weights the trainer is about to update.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from papo.errors import ConfigError
from papo.models.inputs import PromptBatch
from papo.models.policy import Policy
from papo.rollout.engine import RolloutEngine, supports
from papo.rollout.hf import hf_generate
from papo.rollout.keyed_noise import random_keys
from papo.rollout.sampling import Completions, SamplingParams

ENGINES = ("auto", "papo", "hf")  # auto: papo's engine where it supports the model, else transformers


class Sampler:
    """``engine``: one of ``ENGINES``; ``compile``: let papo's engine torch.compile on CUDA (False: eager);
    ``own_weights``: the engine keeps whole weights of its own (None: when it samples in another dtype; a
    sharded policy needs True);
    ``synced``: the transformers path keeps every process decoding until all are done (sharded models).
    ``generate``'s ``weights``: where the engine's weights come from before the call (default: the policy's
    parameters; sharded ones are gathered one tensor at a time)."""

    def __init__(self, policy: Policy, engine: str = "auto", compile: bool = True, own_weights: bool | None = None,
                 synced: bool = False) -> None:
        if engine not in ENGINES:
            raise ConfigError(f"rollout engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine == "papo" and not supports(policy.model):
            raise ConfigError(f"papo's rollout engine cannot decode {type(policy.model).__name__}; use rollout.engine=hf or auto")
        self.policy, self.engine_name, self.compile = policy, engine, compile
        self.own_weights, self.synced = own_weights, synced
        self._engine: RolloutEngine | None = None

    @property
    def uses_engine(self) -> bool:
        if self.engine_name == "auto":  # on CPU too: eager there, and the same keyed tokens as transformers
            return supports(self.policy.model)
        return self.engine_name == "papo"

    @property
    def engine(self) -> RolloutEngine:
        if self._engine is None:
            p = self.policy
            self._engine = RolloutEngine(p.model, p.suppress_ids, p.eos_ids, p.pad_id, compile=None if self.compile else False,
                                         dtype=p.precision.compute_dtype, own_weights=self.own_weights)
        return self._engine

    def generate(self, batch: PromptBatch, params: SamplingParams, n: int = 1, keys: Tensor | None = None,
                 weights: Iterable[tuple[str, Tensor]] | None = None) -> Completions:
        """``n`` completions per prompt, prompt-major. ``keys`` (B * n,): sampling-noise keys per output row
        (``papo.rollout.keyed_noise.rollout_keys``: the same keys give the same tokens in either engine, at any
        batch composition); default: drawn from torch's generator."""
        p = self.policy
        keys = random_keys(batch.size * n) if keys is None else keys
        if self.uses_engine:
            self.engine.load_weights(p.model.named_parameters() if weights is None else weights)
            return self.engine.generate(batch, params, n, keys=keys)[0]
        with p.precision.autocast(p.device):
            return p.root(hf_generate, batch, params, p.suppress_ids, p.eos_ids, p.pad_id, n, keys=keys, synced=self.synced)

    def release(self) -> None:
        """Drop the engine's KV cache and graphs (kept between calls to save re-allocating in evaluation)."""
        if self._engine is not None:
            self._engine.release()

    def __repr__(self) -> str:
        return f"Sampler(engine={self.engine_name!r}, compile={self.compile}, uses_engine={self.uses_engine})"
