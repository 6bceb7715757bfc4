"""Packed vision attention equals transformers' one-SDPA-call-per-segment path, values and gradients."""

import pytest
import torch
from model_fixtures import llava_policy, mixed_batch, qwen3_vl_policy, sharpen_vision, tiny_policy
from transformers import AttentionInterface

from papo.models import attention
from papo.models.attention import PACKED_VISION_ATTENTION, packed_vision_attention, use_packed_vision_attention
from papo.models.inputs import append_completions


def _logits_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_equals_per_segment_sdpa_for_mixed_image_sizes(build, monkeypatch):
    policy = tiny_policy() if build == "qwen2_5_vl" else qwen3_vl_policy()
    assert policy.model.config.vision_config._attn_implementation == PACKED_VISION_ATTENTION  # Policy switched it
    sharpen_vision(policy, 5.0)
    _, prompts, images = mixed_batch(policy)  # 224-px and 168-px images: segments of several lengths
    inputs = policy.encode(prompts, images).inputs
    seen = []

    def spy(*args, **kwargs):
        bounds = kwargs["cu_seq_lens_q"]
        seen.append(len(set((bounds[1:] - bounds[:-1]).tolist())))
        return packed_vision_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, PACKED_VISION_ATTENTION, spy)
    policy.model.train()
    packed, packed_grads = _logits_and_grads(policy.model, inputs)
    assert seen and max(seen) > 1  # the several-lengths branch ran, not only the reshape
    policy.model.set_attn_implementation({"vision_config": "sdpa"})
    stock, stock_grads = _logits_and_grads(policy.model, inputs)
    assert (packed - stock).abs().max() < 1e-5
    assert packed_grads.keys() == stock_grads.keys()
    for name, g in stock_grads.items():
        assert (packed_grads[name] - g).abs().max() < 1e-5 * max(1.0, g.abs().max().item()), name


def test_uniform_segments_take_the_reshape_and_match_a_loop():
    torch.manual_seed(0)
    heads, dim, lengths = 2, 8, [16, 16, 16]
    q, k, v = (torch.randn(1, heads, sum(lengths), dim, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 16, 32, 48])
    module = torch.nn.Module().eval()
    out, _ = packed_vision_attention(module, q, k, v, scaling=dim ** -0.5, cu_seq_lens_q=cu)  # (1, T, H, D)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected = torch.softmax(q[0, :, a:b] @ k[0, :, a:b].transpose(-1, -2) * dim ** -0.5, -1) @ v[0, :, a:b]
        assert (out[0, a:b].transpose(0, 1) - expected).abs().max() < 1e-5


def test_packed_attention_refuses_what_it_is_not_for():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="vision towers"):
        packed_vision_attention(torch.nn.Module(), q, q, q, is_causal=True, cu_seq_lens_q=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="vision towers"):
        packed_vision_attention(torch.nn.Module(), q, q, q)


def test_only_packed_segment_towers_are_switched(tmp_path):
    assert llava_policy().model.config.vision_config._attn_implementation != PACKED_VISION_ATTENTION
    policy = tiny_policy()
    policy.model.set_attn_implementation({"vision_config": "eager"})
    assert not use_packed_vision_attention(policy.model)  # a user's explicit eager choice is kept
    policy.model.set_attn_implementation({"vision_config": "sdpa"})
    assert use_packed_vision_attention(policy.model)
    assert policy.model.config.text_config._attn_implementation == attention.PACKED_TEXT_ATTENTION
    policy.save(tmp_path)  # the registered names are runtime choices, never written into the checkpoint
    saved = (tmp_path / "config.json").read_text()
    assert attention.PACKED_VISION_ATTENTION not in saved and attention.PACKED_TEXT_ATTENTION not in saved


@pytest.mark.parametrize("signature, expected", [
    ("q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)", {"window_size": (-1, 0)}),
    ("q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, *, scale=None", {"is_causal": True}),
    ("q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False",
     {"window_size": (-1, 0), "enable_gqa": True}),
])
def test_varlen_options_follow_the_installed_torch(signature, expected, monkeypatch, request):
    """torch's varlen_attn changed its causal flag between versions (the GPU machine's torch is older than CI's)."""
    namespace: dict = {}
    exec(f"def varlen_attn({signature}): pass", namespace)
    monkeypatch.setattr(attention, "varlen_attn", namespace["varlen_attn"])
    attention._varlen_options.cache_clear()  # the options are cached per process: read the fake signature
    request.addfinalizer(attention._varlen_options.cache_clear)
    assert attention._varlen_options(16, 2) == expected
    assert "enable_gqa" not in attention._varlen_options(16, 16)


def test_scoring_with_packed_attention_matches_the_sampler():
    # generation encodes the images once in the prefill; scoring re-encodes them: both use the packed path
    policy = tiny_policy()
    policy.model.eval()
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logp, _ = policy.logprobs(batch, ids, mask)
        policy.model.set_attn_implementation({"vision_config": "sdpa"})
        inputs = append_completions(batch, ids, mask)
        logits = policy.model(**inputs).logits[:, -ids.shape[1] - 1:-1].float()
    logits[..., policy.suppress] = float("-inf")
    expected = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    assert (logp - expected).abs().max() < 1e-5
