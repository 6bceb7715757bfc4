"""papo.rollout on CPU in fp32: the same tokens as transformers generate, the same log-probs as scoring."""

import pytest
import torch
from model_fixtures import llava_policy, mixed_batch, qwen3_vl_policy, tiny_policy

from papo.data.synthetic import make_sample
from papo.errors import ConfigError
from papo.models.policy import Policy
from papo.rollout import RolloutEngine, Sampler, supports
from papo.rollout import engine as rollout_engine
from papo.rollout.decode_step import DecodeStep
from papo.rollout.hf import hf_generate
from papo.rollout.sampling import SamplingParams


@pytest.fixture(scope="module")
def policy():
    return Policy.from_pretrained(None)  # the embedded default: real EOS behaviour, not a random model


def _batch(policy, n=5, text_only=False):
    samples = [make_sample(t, "test", 0, i, size=224) for i, t in enumerate(["count", "clock", "maze", "bar_chart", "closest"][:n])]
    images = [[] if text_only and i % 2 else s.load_images(None, None) for i, s in enumerate(samples)]
    prompts = [("" if im else "No image here. ") + s.formatted_prompt().replace("<image>", "" if not im else "<image>")
               for s, im in zip(samples, images)]
    return policy.encode(prompts, images)


def _engine(policy):
    return RolloutEngine(policy.model, policy.suppress_ids, policy.eos_ids, policy.pad_id)


@pytest.mark.parametrize("text_only", [False, True])
def test_greedy_tokens_equal_transformers_generate(policy, text_only):
    batch = _batch(policy, text_only=text_only)  # left padding, and rows without images when text_only
    params = SamplingParams(48, greedy=True)
    expected = hf_generate(policy.model, batch, params, policy.suppress_ids, policy.eos_ids, policy.pad_id)
    got, _ = _engine(policy).generate(batch, params)
    assert torch.equal(got.ids, expected.ids) and torch.equal(got.mask, expected.mask)
    assert torch.equal(got.finished, expected.finished) and got.finished.any()


def test_length_limits_cut_like_transformers(policy):
    batch = _batch(policy)
    params = SamplingParams(6, greedy=True)  # shorter than every answer: no row reaches EOS
    expected = hf_generate(policy.model, batch, params, policy.suppress_ids, policy.eos_ids, policy.pad_id)
    got, _ = _engine(policy).generate(batch, params)
    assert torch.equal(got.ids, expected.ids) and not got.finished.any() and (got.lengths == 6).all()
    full, _ = _engine(policy).generate(batch, SamplingParams(48, greedy=True))
    limits = torch.tensor([1, 3, 48, 2, 5])  # per-row limits: each row is the unlimited row cut short
    cut, _ = _engine(policy).generate(batch, SamplingParams(48, greedy=True), max_new_tokens=limits)
    for row, limit in enumerate(limits.tolist()):
        n = min(limit, int(full.lengths[row]))
        assert int(cut.lengths[row]) == n and torch.equal(cut.ids[row, :n], full.ids[row, :n])


def test_sampled_log_probs_equal_the_scoring_forward(policy):
    torch.manual_seed(0)
    batch = _batch(policy)
    params = SamplingParams(32, temperature=1.3, top_p=0.9, top_k=20)
    comp, logp = _engine(policy).generate(batch, params, n=3)
    assert comp.ids.shape[0] == 15
    expanded = policy.encode(*_repeat(policy, batch, 3))
    with torch.no_grad():
        scored, _ = policy.logprobs(expanded, comp.ids, comp.mask, temperature=1.3)
    m = comp.mask.bool()
    assert (logp[m] - scored[m]).abs().max() < 1e-5
    assert len({tuple(t) for t in comp.token_lists()[:3]}) > 1  # copies of a prompt sample independently


def _repeat(policy, batch, n):
    """The prompts and images behind ``batch``, each repeated n times (rebuilt from the test's own samples)."""
    samples = [make_sample(t, "test", 0, i, size=224) for i, t in enumerate(["count", "clock", "maze", "bar_chart", "closest"])]
    return ([s.formatted_prompt() for s in samples for _ in range(n)], [s.load_images(None, None) for s in samples for _ in range(n)])


def test_samples_of_one_prompt_share_one_prefill(policy, monkeypatch):
    batch = _batch(policy, n=2)
    rows = []
    original = DecodeStep.prefill

    def spy(self, embeds, *args):
        rows.append(embeds.shape[0])
        return original(self, embeds, *args)

    monkeypatch.setattr(DecodeStep, "prefill", spy)
    comp, _ = _engine(policy).generate(batch, SamplingParams(16, greedy=True), n=4)
    assert rows == [2] and comp.ids.shape[0] == 8  # one prefill of the 2 prompts; decoding never calls forward
    assert all(torch.equal(comp.ids[i], comp.ids[i - i % 4]) for i in range(8))  # greedy copies agree


def test_compaction_keeps_every_rows_tokens(policy, monkeypatch):
    batch = _batch(policy)
    params = SamplingParams(40, greedy=True)
    full, _ = _engine(policy).generate(batch, params)
    monkeypatch.setattr(rollout_engine, "CHECK_EVERY", 1)
    compacted = []
    original = RolloutEngine._compact
    monkeypatch.setattr(RolloutEngine, "_compact", lambda self, a, b: (compacted.append((a, b)), original(self, a, b)))
    limits = torch.tensor([2, 2, 2, 40, 2])  # four rows stop at once: 5 running -> 1 (bucket 1)
    got, _ = _engine(policy).generate(batch, params, max_new_tokens=limits)
    assert compacted and compacted[0] == (5, 1)
    assert torch.equal(got.ids[3, : int(full.lengths[3])], full.ids[3, : int(full.lengths[3])])
    assert (got.lengths[[0, 1, 2, 4]] == 2).all()


def test_policy_uses_the_engine_where_it_can():
    tiny = tiny_policy()
    assert supports(tiny.model)
    assert not supports(llava_policy().model) and not supports(qwen3_vl_policy().model)
    forced = Sampler(tiny, engine="papo")  # same tokens as the transformers path
    assert forced.uses_engine and Sampler(tiny).uses_engine and not Sampler(tiny, engine="hf").uses_engine
    assert not Sampler(llava_policy()).uses_engine  # auto: transformers for what the engine cannot decode
    _, prompts, images = mixed_batch(tiny)
    batch = tiny.encode(prompts, images)
    params = SamplingParams(8, greedy=True)
    via_engine = forced.generate(batch, params, n=2)
    assert torch.equal(via_engine.ids, Sampler(tiny, engine="hf").generate(batch, params, n=2).ids)
    with pytest.raises(ConfigError, match="cannot decode"):
        Sampler(llava_policy(), engine="papo")
    with pytest.raises(ConfigError, match="must be one of"):
        Sampler(tiny, engine="vllm")


def test_prompts_without_images_decode_like_transformers(policy):
    prompts = ["What is 2 + 2? " * (i + 1) for i in range(3)]  # left padding, no image anywhere in the batch
    batch = policy.encode(prompts, [[], [], []])
    params = SamplingParams(24, greedy=True)
    expected = hf_generate(policy.model, batch, params, policy.suppress_ids, policy.eos_ids, policy.pad_id)
    got, _ = _engine(policy).generate(batch, params)
    assert torch.equal(got.ids, expected.ids)


def test_released_engines_reallocate_and_give_the_same_tokens(policy):
    batch = _batch(policy, n=2)
    engine = _engine(policy)
    params = SamplingParams(12, greedy=True)
    first, _ = engine.generate(batch, params)
    engine.release()
    assert engine._buf is None
    again, _ = engine.generate(batch, params)
    assert torch.equal(first.ids, again.ids)


def test_new_sampling_settings_drop_the_graphs_with_their_memory_pool(policy):
    # CUDA's caching allocator asserts when a capture reuses a pool whose graphs are all gone (seen on an H200:
    # an evaluation's greedy pass after its sampled one fell back to eager); here the bookkeeping, on the CPU
    batch = _batch(policy, n=2)
    engine = _engine(policy)
    sampled, greedy = SamplingParams(6, temperature=1.0), SamplingParams(6, greedy=True)
    engine.generate(batch, sampled)
    engine._graphs, engine._pool = {(2, 0): "a captured graph"}, "its pool"
    engine.generate(batch, sampled)  # the same settings keep both
    assert engine._graphs and engine._pool == "its pool"
    engine.generate(batch, greedy)
    assert engine._graphs == {} and engine._pool is None


def test_compiled_engine_gives_the_eager_tokens(policy):
    """torch.compile'd vision blocks, prefill layer and decode step (the CUDA default) on the CPU, fp32 (~35 s)."""
    batch = _batch(policy)
    params = SamplingParams(24, greedy=True)
    eager, _ = _engine(policy).generate(batch, params)
    engine = RolloutEngine(policy.model, policy.suppress_ids, policy.eos_ids, policy.pad_id, compile=True)
    compiled, _ = engine.generate(batch, params, n=2)  # two buckets: 10 rows, then fewer as rows finish
    assert torch.equal(compiled.ids[::2], eager.ids) and torch.equal(compiled.ids[1::2], eager.ids)


@pytest.mark.parametrize("vocab", [50, 4096, 151936])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_top_p_keeps_exactly_transformers_nucleus(vocab, top_p):
    """The bisection cutoff keeps the same tokens as transformers' TopPLogitsWarper, at Qwen's vocabulary too."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from papo.rollout.nucleus import top_p_cutoff

    gen = torch.Generator().manual_seed(vocab)
    sharpness = torch.tensor([0.05, 0.5, 1.0, 3.0, 8.0, 20.0])[:, None]  # flat to peaked rows
    logits = torch.randn(6, vocab, generator=gen) * sharpness
    logits[0, :3] = float("-inf")  # suppressed ids
    expected = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
    probs = logits.softmax(-1)
    assert torch.equal(probs > top_p_cutoff(probs, top_p)[:, None], expected)


@pytest.mark.parametrize("vocab,top_p", [(50, 0.3), (50, 0.9), (4096, 0.5), (4096, 0.99), (151936, 0.99)])
def test_the_race_searches_few_rows_and_draws_the_same_tokens(vocab, top_p):
    """race_winner (the engine's sampler) equals the argmax of race_scores (every row searched) on every row,
    rows whose race over all tokens is won outside the nucleus included; and the search skips the rows inside."""
    from papo.rollout.decode_step import race_scores, race_winner
    from papo.rollout.keyed_noise import exponential_noise, rollout_keys
    from papo.rollout.nucleus import NOT_SEARCHED, in_nucleus, top_p_cutoff

    rows = 64 if vocab < 100_000 else 8
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(rows, vocab, generator=gen) * torch.linspace(0.05, 6.0, rows)[:, None]  # flat to peaked
    logits[0, :3] = float("-inf")  # suppressed ids
    keys, column = rollout_keys(0, torch.arange(rows), 1), torch.full((rows,), 7)
    params = SamplingParams(1, top_p=top_p, temperature=0.8)
    reference = race_scores(logits, params, keys, column).argmax(-1)
    assert torch.equal(race_winner(logits, params, keys, column), reference)
    probs = (logits / 0.8).softmax(-1)
    overall = (probs / exponential_noise(keys, column, vocab)).argmax(-1)
    inside = in_nucleus(probs, overall, top_p)
    assert torch.equal(inside, probs.gather(-1, overall[:, None])[:, 0] > top_p_cutoff(probs, top_p))
    if vocab == 50 and top_p == 0.3:
        assert 0 < int(inside.sum()) < rows  # both kinds of row were met
    cutoff = top_p_cutoff(probs, top_p, ~inside)
    assert (cutoff[inside] == NOT_SEARCHED).all() and torch.equal(cutoff[~inside], top_p_cutoff(probs, top_p)[~inside])


def test_the_sampling_head_compiles_as_one_graph():
    """The top-p search is a custom operator: the compiled head keeps it in its graph, so the keyed noise and the
    race after it are generated code too (a graph break there left them as eager int64 kernels)."""
    from papo.rollout.decode_step import sample

    logits, suppress = torch.randn(4, 300), torch.arange(300) >= 290
    args = (logits, suppress, SamplingParams(10, top_p=0.99), torch.arange(4), torch.full((4,), 3))
    explained = torch._dynamo.explain(sample)(*args)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    targets = {str(node.target) for node in explained.graphs[0].graph.nodes}
    assert "papo.top_p_cutoff.default" in targets, targets  # the search itself, as one opaque operator


def test_compile_failure_falls_back_to_eager_with_one_warning(policy, monkeypatch):
    """A compiler error (e.g. Inductor at a 151,936-token vocabulary) must not end a run: one warning, then eager."""
    import papo.rollout.decode_step

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("InductorError: list indices must be integers or slices, not NoneType")
        return run

    monkeypatch.setattr(papo.rollout.decode_step.torch, "compile", broken_compile)
    monkeypatch.setattr(rollout_engine.torch, "compile", broken_compile)
    batch = _batch(policy, n=2)
    params = SamplingParams(12, greedy=True)
    engine = RolloutEngine(policy.model, policy.suppress_ids, policy.eos_ids, policy.pad_id, compile=True)
    with pytest.warns(RuntimeWarning, match="compiling the engine failed.*InductorError") as caught:
        got, _ = engine.generate(batch, params)
        again, _ = engine.generate(batch, params)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1 and not engine.compile
    expected, _ = _engine(policy).generate(batch, params)
    assert torch.equal(got.ids, expected.ids) and torch.equal(again.ids, expected.ids)


def test_engine_in_another_dtype_keeps_its_own_weights_and_follows_updates():
    """fp32 master weights, bf16 rollouts: the engine holds a bf16 copy refreshed by load_weights (no aliasing)."""
    tiny = tiny_policy()
    tiny.model.lm_head.weight = tiny.model.model.language_model.embed_tokens.weight  # tied, as in Qwen2.5-VL-3B
    engine = RolloutEngine(tiny.model, tiny.suppress_ids, tiny.eos_ids, tiny.pad_id, dtype=torch.bfloat16)
    live = dict(tiny.model.named_parameters())
    own = dict(engine.model.named_parameters())
    assert engine.owns_weights and own.keys() == live.keys()
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in own.values())
    assert engine.model.lm_head.weight is engine.model.model.language_model.embed_tokens.weight  # ties survive
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():
        live[name].add_(1.0)
    assert not torch.equal(own[name].float(), live[name].to(torch.bfloat16).float())
    engine.load_weights(tiny.model.named_parameters())
    assert torch.equal(own[name], live[name].to(torch.bfloat16))
    same = RolloutEngine(tiny.model, tiny.suppress_ids, tiny.eos_ids, tiny.pad_id, dtype=torch.float32)
    assert not same.owns_weights and same.model is tiny.model


def test_engine_own_weights_decode_through_their_stacked_views_after_updates():
    """The engine's own q/k/v and gate/up parameters are views into the stacked GEMM weights: loading an update
    into them changes what the decode step reads, with no copy to refresh."""
    tiny = tiny_policy()
    _, prompts, images = mixed_batch(tiny)
    batch, params = tiny.encode(prompts, images), SamplingParams(8, greedy=True)
    owned = RolloutEngine(tiny.model, tiny.suppress_ids, tiny.eos_ids, tiny.pad_id, own_weights=True)
    live = RolloutEngine(tiny.model, tiny.suppress_ids, tiny.eos_ids, tiny.pad_id)
    first, _ = owned.generate(batch, params)
    assert torch.equal(first.ids, live.generate(batch, params)[0].ids)
    with torch.no_grad():
        for layer in tiny.model.model.language_model.layers:
            layer.mlp.up_proj.weight.mul_(-3.0)
            layer.self_attn.v_proj.weight.mul_(2.0)
    owned.load_weights(tiny.model.named_parameters())
    got, expected = owned.generate(batch, params)[0], live.generate(batch, params)[0]
    assert torch.equal(got.ids, expected.ids) and not torch.equal(got.ids, first.ids)


def test_policy_with_bf16_compute_samples_from_its_current_weights():
    tiny = tiny_policy()
    tiny.precision = type(tiny.precision)(torch.float32, torch.bfloat16)
    sampler = Sampler(tiny, engine="papo")
    _, prompts, images = mixed_batch(tiny)
    batch = tiny.encode(prompts, images)
    params = SamplingParams(8, greedy=True)
    first = sampler.generate(batch, params)
    assert sampler.engine.owns_weights
    with torch.no_grad():
        tiny.model.lm_head.weight.mul_(-1.0)  # a different model: greedy tokens must change
    assert not torch.equal(sampler.generate(batch, params).ids, first.ids)


def test_right_padded_prompts_are_refused_without_giving_up_compilation(policy):
    from papo.models.inputs import PromptBatch

    batch = _batch(policy, n=2, text_only=True)  # rows of different lengths: the shorter is left-padded
    inputs = dict(batch.inputs)
    inputs["attention_mask"] = inputs["attention_mask"].flip(-1)  # its padding now on the right
    engine = RolloutEngine(policy.model, policy.suppress_ids, policy.eos_ids, policy.pad_id, compile=True)
    with pytest.raises(ValueError, match="left-padded"):
        engine.generate(PromptBatch(inputs, batch.image_keys), SamplingParams(4, greedy=True))
    assert engine.compile  # a bad batch is not a compiler failure
