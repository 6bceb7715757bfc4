"""Compiled decoder layers for scoring and update passes (model.compile_layers): the same log-probs, entropies
and gradients as eager layers, generation left eager, and refused under torchrun."""

import pytest
import torch
from model_fixtures import mixed_batch, record_gradients, small_cfg, tiny_policy

import papo.models.compiled as compiled
import papo.models.logprobs as logprobs
from papo.config.schema import load_config
from papo.errors import ConfigError
from papo.models.inputs import concat_prompt_batches, split_prompt_batch
from papo.rollout import Sampler
from papo.rollout.sampling import SamplingParams
from papo.training.trainer import Trainer

GROUPS_WITH_DIFFERENT_REWARDS = "trainer.seed=1"  # as in test_trainer.py: advantages not all zero


def _pass(policy, batch, comp):
    policy.model.zero_grad(set_to_none=True)
    logp, ent = policy.logprobs(batch, comp.ids, comp.mask, with_entropy=True)
    (logp.sum() + 0.1 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


def _eager_then_compiled(new_tokens):
    """A tiny policy's greedy completions scored eagerly, then inside ``compiled_passes`` with a fresh dynamo:
    (policy, completions, eager pass, compiled pass)."""
    torch.manual_seed(0)
    policy = tiny_policy()
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    comp = Sampler(policy, engine="hf").generate(batch, SamplingParams(new_tokens, greedy=True))
    eager = _pass(policy, batch, comp)
    policy.compile_layers = True
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with policy.compiled_passes():
        got = _pass(policy, batch, comp)
    return policy, comp, eager, got


def test_compiled_layers_score_and_differentiate_like_eager_ones(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")  # dynamo's tracing and autograd, no code generation
    policy, comp, eager, got = _eager_then_compiled(12)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers really ran compiled
    layers = [*policy.model.get_decoder().layers, *policy.model.model.visual.blocks]
    assert id(policy.root) in policy._compiled and set(policy._compiled[id(policy.root)]) == set(layers)
    assert all(layer._compiled_call_impl is None for layer in layers)  # routed only for the region: generate stays eager
    m = comp.mask.bool()
    assert (got[0][m] - eager[0][m]).abs().max() < 1e-5 and (got[1][m] - eager[1][m]).abs().max() < 1e-4
    assert got[2].keys() == eager[2].keys() and len(got[2]) > 0
    for name, g in eager[2].items():
        assert torch.allclose(got[2][name], g, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_the_compiled_head_scores_and_differentiates_like_the_eager_one(monkeypatch, backend):
    """Temperature, suppressed ids, exact entropy, a short last chunk and the backward through checkpointing,
    as the update runs them; with Inductor, its generated reductions against eager float32."""
    monkeypatch.setattr(compiled, "BACKEND", backend)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(7, 16, requires_grad=True)
    targets = torch.randint(0, 45, (7,))
    suppress = torch.arange(50) >= 45

    def run():
        h.grad = head.weight.grad = None
        logp, ent = logprobs.token_logprobs(head, h, targets, 0.7, suppress, chunk_tokens=4, with_entropy=True)
        (logp.sum() + 0.3 * ent.sum()).backward()
        return logp.detach(), ent.detach(), h.grad.clone(), head.weight.grad.clone()

    eager = run()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with logprobs.compiled_head():
        got = run()
    assert logprobs._compiled_chunk.get() is None and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for a, b in zip(got, eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("share_prompts", [False, True])
def test_passes_with_new_numbers_of_sequences_reuse_the_compiled_layers(monkeypatch, share_prompts):
    """DAPO's filter, shared prompts and a step's last micro-batch change how many sequences a pass packs; the
    segments reach the attention's graph break in a plain object, so no new count recompiles the layers
    (with a tuple of lists, and with a frozen dataclass on torch 2.11, dynamo guarded on the lists' lengths: each new
    count compiled the decoder layer again)."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch.manual_seed(0)
    policy = tiny_policy()
    policy.share_prompts = share_prompts
    _, prompts, images = mixed_batch(policy)
    views = split_prompt_batch(policy.encode(prompts, images), [1, 1])
    policy.compile_layers = True
    torch._dynamo.reset()
    graphs = []
    for rows in ([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1]):  # rollouts of two prompts, as a step lays them out
        batch = concat_prompt_batches([views[i] for i in rows], policy.pad_id)
        comp = Sampler(policy, engine="hf").generate(batch, SamplingParams(6))
        torch._dynamo.utils.counters.clear()
        with torch.no_grad(), policy.compiled_passes():
            policy.logprobs(batch, comp.ids, comp.mask)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1:] == [0, 0]


def test_a_block_that_fails_to_compile_runs_eagerly(monkeypatch):
    """Compiled passes are on by default on a GPU: a forward's compiler failure must cost speed, not the run."""
    calls = []

    def broken(gm, example_inputs):
        calls.append(gm)
        raise RuntimeError("InductorError: a lowering this model needs is missing")

    monkeypatch.setattr(compiled, "BACKEND", broken)
    _, comp, eager, got = _eager_then_compiled(8)
    assert calls  # the region really tried to compile
    m = comp.mask.bool()
    assert torch.equal(got[0][m], eager[0][m]) and torch.equal(got[1][m], eager[1][m])
    for name, g in eager[2].items():
        assert torch.equal(got[2][name], g), name
    torch._dynamo.reset()  # dynamo skips a failed frame's code for the rest of the process


def test_auto_compiles_on_cuda_when_every_weight_trains():
    assert load_config("grpo").model.compile_layers == "auto"
    assert compiled.use_compiled_layers("auto", "cuda:0", 0)
    assert not compiled.use_compiled_layers("auto", "cpu", 0)
    assert not compiled.use_compiled_layers("auto", "cuda", 8)
    assert compiled.use_compiled_layers(True, "cpu", 0) and not compiled.use_compiled_layers(False, "cuda", 0)
    with pytest.raises(ConfigError, match="model.compile_layers must be true, false or auto"):
        load_config("grpo", overrides=["model.compile_layers=sometimes"])


def test_a_step_with_compiled_layers_and_checkpointing_matches_eager(tmp_path, monkeypatch):
    """Full activation checkpointing recomputes each layer in the backward: the recomputation must run the same
    compiled layer as the forward, so the routed region spans backward too. Same metrics and gradient."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    runs = []
    for on in (False, True):
        torch.manual_seed(0)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cfg = small_cfg("papo_g", [GROUPS_WITH_DIFFERENT_REWARDS, "model.gradient_checkpointing=true",
                                   f"model.compile_layers={str(on).lower()}"])
        trainer = Trainer(cfg, tmp_path / str(on), "cpu")
        grads = record_gradients(trainer)
        runs.append((trainer.step(), grads))
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == on
    (base, g_base), (row, grads) = runs
    assert base["grad_norm"] > 0
    for key in ("loss", "pg_loss", "grad_norm", "kl_prcp", "entropy", "ref_kl"):
        assert row[key] == pytest.approx(base[key], rel=1e-4, abs=1e-7), key
    for g, b in zip(grads[0], g_base[0]):
        assert torch.allclose(g, b, rtol=1e-4, atol=1e-8)
