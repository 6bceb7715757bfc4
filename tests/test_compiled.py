"""Compiled decoder layers for scoring and update passes (model.compile_layers): the same log-probs, entropies
and gradients as eager layers, generation left eager, and refused under torchrun."""

import pytest
import torch
from model_fixtures import mixed_batch, tiny_policy

import papo.models.compiled as compiled
from papo.config.schema import load_config
from papo.errors import ConfigError
from papo.rollout import Sampler
from papo.rollout.sampling import SamplingParams
from papo.training.sharding import check_world_size


def _pass(policy, batch, comp):
    policy.model.zero_grad(set_to_none=True)
    logp, ent = policy.logprobs(batch, comp.ids, comp.mask, with_entropy=True)
    (logp.sum() + 0.1 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


def test_compiled_layers_score_and_differentiate_like_eager_ones(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")  # dynamo's tracing and autograd, no code generation
    torch.manual_seed(0)
    policy = tiny_policy()
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    comp = Sampler(policy, engine="hf").generate(batch, SamplingParams(12, greedy=True))
    eager = _pass(policy, batch, comp)
    policy.compile_layers = True
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = _pass(policy, batch, comp)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers really ran compiled
    layers = policy.model.get_decoder().layers
    assert id(policy.root) in policy._compiled and set(policy._compiled[id(policy.root)]) == set(layers)
    assert all(layer._compiled_call_impl is None for layer in layers)  # routed only for the pass: generate stays eager
    m = comp.mask.bool()
    assert (got[0][m] - eager[0][m]).abs().max() < 1e-5 and (got[1][m] - eager[1][m]).abs().max() < 1e-4
    assert got[2].keys() == eager[2].keys() and len(got[2]) > 0
    for name, g in eager[2].items():
        assert torch.allclose(got[2][name], g, rtol=1e-4, atol=1e-6), name


def test_compiled_layers_are_refused_under_several_processes():
    cfg = load_config("grpo", overrides=["model.compile_layers=true"])
    with pytest.raises(ConfigError, match="model.compile_layers"):
        check_world_size(cfg, 2)
