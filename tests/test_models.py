import hashlib
import json
import subprocess
import sys

import pytest
import torch
from model_fixtures import mixed_batch, sharpen_vision, tiny_policy
from transformers import AttentionInterface, AutoModelForImageTextToText, AutoProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from papo.data.masking import MaskingConfig, PatchLayout, corrupt_images, image_pair, mask_rng, random_mask_pixel_values
from papo.models.attention import PACKED_TEXT_ATTENTION, use_packed_text_attention
from papo.models.inputs import (
    PromptBatch,
    append_completions,
    concat_prompt_batches,
    split_prompt_batch,
    with_images,
    with_pixel_values,
)
from papo.models.loading import (
    ModelOptions,
    load_processor,
    model_from_config,
    prepare_model,
    set_pixel_bounds,
    vision_parameters,
)
from papo.models.logprobs import response_logprobs
from papo.models.policy import Policy
from papo.models.tiny import build_config, build_tiny, build_tokenizer
from papo.rollout import Sampler
from papo.rollout.sampling import SamplingParams, trim_after_eos


def _tokenizer_hash() -> str:
    return hashlib.sha256(build_tokenizer().backend_tokenizer.to_str().encode()).hexdigest()


def test_tokenizer_is_deterministic_across_processes_and_has_qwen_specials():
    code = ("import hashlib; from papo.models.tiny import build_tokenizer; "
            "print(hashlib.sha256(build_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == _tokenizer_hash()
    tok = build_tokenizer()
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>")]
    assert ids == sorted(ids) and ids[1] == ids[0] + 1  # Qwen's order
    text = "<think>seen: red circles=3.</think> \\boxed{3} Ünïcode ✓ 你好"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert tok.tokenize("123") == ["1", "2", "3"]  # digits split one per token


def test_chat_template_renders_the_qwen_format():
    p = tiny_policy()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert p.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_sizes_and_config_traps():
    model, processor = build_tiny("tiny")
    n = sum(p.numel() for p in model.parameters())
    assert 1.0e6 < n < 2.0e6
    cfg = build_config("20m", processor.tokenizer)
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size
    with pytest.raises(ValueError, match="unknown tiny model size"):
        build_config("7b", processor.tokenizer)


def _sample_with_scores(policy, batch, temperature, max_new_tokens=12, suppress=True):
    out = policy.model.generate(
        **batch.inputs, do_sample=True, temperature=temperature, top_k=None, top_p=1.0, max_new_tokens=max_new_tokens,
        suppress_tokens=policy.suppress_ids if suppress else None, eos_token_id=policy.eos_ids,
        pad_token_id=policy.pad_id, output_scores=True, return_dict_in_generate=True,
    )
    gen = out.sequences[:, batch.prompt_len:]
    comp = trim_after_eos(gen, policy.eos_ids, policy.pad_id)
    sampler_logp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(-1, gen[..., None]).squeeze(-1)
    return comp, sampler_logp


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_logprobs_equal_sampler_logprobs_left_padded_mixed_images(temperature):
    torch.manual_seed(1)
    policy = tiny_policy()
    policy.model.eval()
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    assert (batch.inputs["attention_mask"][:, 0] == 0).any()  # really left-padded
    assert len({tuple(g) for g in batch.inputs["image_grid_thw"].tolist()}) == 2  # two image sizes
    comp, sampler_logp = _sample_with_scores(policy, batch, temperature)
    with torch.no_grad():
        logp, _ = policy.logprobs(batch, comp.ids, comp.mask, temperature=temperature)
    m = comp.mask.bool()
    assert (logp[m] - sampler_logp[m]).abs().max() < 1e-5
    assert (logp[~m] == 0).all()


def test_concatenated_prompt_batches_score_each_row_as_alone():
    """Scoring merges micro-batches: a row's log-probs must not change with the padding the merge gives it."""
    torch.manual_seed(1)
    policy = tiny_policy()
    policy.model.eval()
    _, prompts, images = mixed_batch(policy)
    parts = [policy.encode([p], [ims]) for p, ims in zip(prompts, images)]
    assert parts[0].prompt_len != parts[1].prompt_len
    merged = concat_prompt_batches(parts, policy.pad_id)
    whole = policy.encode(prompts, images)  # what the processor itself makes of both rows
    assert merged.inputs.keys() == whole.inputs.keys()
    for key in whole.inputs:
        assert torch.equal(merged.inputs[key], whole.inputs[key]), key
    comp = Sampler(policy).generate(merged, SamplingParams(6))
    with torch.no_grad():
        together, _ = policy.logprobs(merged, comp.ids, comp.mask)
        alone = [policy.logprobs(b, comp.ids[i : i + 1], comp.mask[i : i + 1])[0] for i, b in enumerate(parts)]
    assert (together - torch.cat(alone)).abs().max() < 1e-5
    text_only = policy.encode(["What is 2 + 2?"], [[]])  # no image tensors at all
    mixed = concat_prompt_batches([parts[0], text_only], policy.pad_id)
    whole = policy.encode([prompts[0], "What is 2 + 2?"], [images[0], []])
    assert mixed.inputs.keys() == whole.inputs.keys() and mixed.image_keys == whole.image_keys
    for key in whole.inputs:
        assert torch.equal(mixed.inputs[key], whole.inputs[key]), key
    with pytest.raises(ValueError, match="neither per-token nor an image tensor"):
        concat_prompt_batches([PromptBatch({**parts[0].inputs, "extra": torch.zeros(3)}, parts[0].image_keys)] * 2, 0)


def test_a_split_prompt_batch_is_each_prompt_encoded_alone():
    """A step's prompts go through the processor in one call and are cached one by one: each split row must be
    exactly the prompt's own encoding, padding and image tensors included (a text-only row among them)."""
    policy = tiny_policy()
    _, prompts, images = mixed_batch(policy)
    prompts, images = [prompts[0], "What is 2 + 2?", prompts[1]], [images[0], [], images[1]]
    whole = policy.encode(prompts, images)
    rows = split_prompt_batch(whole, [len(ims) for ims in images])
    assert [r.image_ids for r in rows] == [whole.image_ids[:1], (), whole.image_ids[1:]]
    for row, prompt, ims in zip(rows, prompts, images):
        alone = policy.encode([prompt], [ims])
        assert row.inputs.keys() == alone.inputs.keys() and row.image_keys == alone.image_keys
        for key in alone.inputs:
            assert torch.equal(row.inputs[key], alone.inputs[key]), key
    merged = concat_prompt_batches(rows, policy.pad_id)
    for key in whole.inputs:
        assert torch.equal(merged.inputs[key], whole.inputs[key]), key
    with pytest.raises(ValueError, match="2 image counts for 3 prompts"):
        split_prompt_batch(whole, [1, 1])
    with pytest.raises(ValueError, match="cannot split 'image_grid_thw' \\(2 entries\\) over 3 images"):
        split_prompt_batch(whole, [1, 1, 1])


def test_padding_free_forward_equals_the_padded_one(monkeypatch):
    """Packed sequences (papo.models.packing) give the padded forward's log-probs, entropies and gradients,
    and the language model sees only valid tokens."""
    import papo.models.attention as attention

    torch.manual_seed(1)
    policy = tiny_policy()
    sharpen_vision(policy, 5.0)
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    comp = Sampler(policy).generate(batch, SamplingParams(8))
    mask = comp.mask.clone()
    mask[1, 3:] = 0  # responses of unequal length: right padding as well as the prompts' left padding
    seen = []
    real = attention.packed_text_attention

    def spy(module, query, *args, **kwargs):
        seen.append((query.shape[2], kwargs.get("packed_seq_lens") is not None))
        return real(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, attention.PACKED_TEXT_ATTENTION, spy)
    policy.model.train()
    results = []
    for implementation in (attention.PACKED_TEXT_ATTENTION, "sdpa"):
        policy.model.set_attn_implementation({"text_config": implementation})
        policy.model.zero_grad(set_to_none=True)
        logp, ent = policy.logprobs(batch, comp.ids, mask, with_entropy=True)
        (logp.sum() + ent.sum()).backward()
        results.append((logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in policy.model.named_parameters()
                                                      if p.grad is not None}))
    valid_tokens = int(batch.inputs["attention_mask"].sum() + mask.sum())
    assert seen and all(t == valid_tokens and packed for t, packed in seen)  # only valid tokens, every layer
    (logp, ent, grads), (ref_logp, ref_ent, ref_grads) = results
    m = mask.bool()
    assert (logp - ref_logp).abs().max() < 1e-5 and (ent - ref_ent).abs().max() < 1e-5
    assert (logp[~m] == 0).all() and (ent[~m] == 0).all()
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max() < 1e-5 * max(1.0, g.abs().max().item()), name


def test_rows_that_share_a_prompt_hold_one_copy_and_score_as_apart(monkeypatch):
    """A prompt's rollouts (equal prompt tokens and image ids) are packed with one copy of the prompt; log-probs,
    entropies and gradients equal those of every row packed whole."""
    import papo.models.attention as attention

    torch.manual_seed(3)
    policy = tiny_policy()
    sharpen_vision(policy, 5.0)
    _, prompts, images = mixed_batch(policy)
    prompts.append("Which picture has more cells? <image> or <image>")  # two images of different sizes
    images.append([images[0][0], images[1][0]])
    singles = [policy.encode([p], [ims]) for p, ims in zip(prompts, images)]
    order = [0, 1, 0, 2, 1, 0, 2]  # rows of one prompt apart, as a pass that spans groups holds them
    batch = concat_prompt_batches([singles[i] for i in order], policy.pad_id)  # repeated encodings: equal image ids
    ids = torch.randint(5, 200, (len(order), 7))
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [0] * 7, [1] * 5 + [0] * 2, [1] * 7, [1] * 2 + [0] * 5, [1] * 7])
    seen = []
    real = attention.packed_text_attention

    def spy(module, query, *args, **kwargs):
        seen.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, attention.PACKED_TEXT_ATTENTION, spy)
    policy.model.train()
    results = []
    for share in (True, False):
        policy.share_prompts = share
        policy.model.zero_grad(set_to_none=True)
        logp, ent = policy.logprobs(batch, ids, mask, with_entropy=True)
        (logp.sum() + ent.sum()).backward()
        results.append((logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in policy.model.named_parameters()
                                                      if p.grad is not None}))
    prompt_tokens = [int(b.inputs["attention_mask"].sum()) for b in singles]  # row 2 has no response
    layers = len(seen) // 2
    assert set(seen[:layers]) == {sum(prompt_tokens) + int(mask.sum())}  # each prompt once
    assert set(seen[layers:]) == {sum(prompt_tokens[i] for i in order) + int(mask.sum())}
    (logp, ent, grads), (ref_logp, ref_ent, ref_grads) = results
    assert (logp - ref_logp).abs().max() < 1e-5 and (ent - ref_ent).abs().max() < 1e-5
    assert (logp[~mask.bool()] == 0).all() and logp[mask.bool()].lt(0).all()
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max() < 1e-5 * max(1.0, g.abs().max().item()), name


def test_rows_share_a_prompt_only_with_equal_tokens_and_the_same_images():
    from papo.models.packing import prompt_leads

    policy = tiny_policy()
    _, prompts, images = mixed_batch(policy)
    one = policy.encode(prompts[:1], images[:1])
    again = policy.encode(prompts[:1], images[:1])  # the same pixels, encoded again: another image id
    batch = concat_prompt_batches([one, one, again, one], policy.pad_id)
    inputs = append_completions(batch, torch.ones(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.long))
    assert prompt_leads(inputs, batch.prompt_len, batch.image_ids) == [0, 0, 2, 0]
    assert prompt_leads(inputs, batch.prompt_len, None) == [0, 1, 2, 3]  # without ids, no image is known equal
    with pytest.raises(ValueError, match="3 image ids for 4 images"):
        prompt_leads(inputs, batch.prompt_len, batch.image_ids[:3])
    other = policy.encode(["How many cells? <image>"], images[:1])  # other tokens around an image with the same id
    other = PromptBatch(other.inputs, other.image_keys, one.image_ids)
    batch = concat_prompt_batches([one, other, one], policy.pad_id)
    inputs = append_completions(batch, torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long))
    assert prompt_leads(inputs, batch.prompt_len, batch.image_ids) == [0, 1, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash kernel's alignment is a CUDA question")
def test_the_flash_kernel_aligns_shared_prompt_segments_at_their_end():
    """On CUDA shared prompts go through varlen_attn with key segments longer than their queries; its causal mask
    must end where the queries end, as the CPU path's written-out mask does."""
    from papo.models.attention import PackedSegments, packed_text_attention, varlen_aligns_causal_to_the_end

    device = torch.device("cuda")
    assert varlen_aligns_causal_to_the_end(device)
    torch.manual_seed(0)
    prompt, responses = 37, [5, 64]
    key_index = torch.cat([torch.arange(prompt), torch.arange(prompt), torch.arange(prompt, prompt + 5),
                           torch.arange(prompt), torch.arange(prompt + 5, prompt + 69)])
    q, k, v = (torch.randn(1, h, prompt + 69, 64) for h in (4, 2, 2))
    module = torch.nn.Module().eval()
    seg = PackedSegments.build([prompt, *responses], [prompt, *(prompt + n for n in responses)], key_index)
    expected, _ = packed_text_attention(module, q, k, v, None, packed_seq_lens=seg)  # the CPU path
    cuda_seg = PackedSegments.build(seg.q_lengths, seg.k_lengths, key_index.to(device))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, _ = packed_text_attention(module, *(t.to(device) for t in (q, k, v)), None, packed_seq_lens=cuda_seg)
    assert (got.float().cpu() - expected).abs().max() < 2e-2


def test_packed_positions_are_get_rope_index_of_the_padded_batch():
    """Packing computes M-RoPE positions on the host (papo.models.mrope) instead of transformers'
    get_rope_index (a GPU sync per row); the packed positions are transformers' own, valid tokens in order."""
    from papo.models.attention import PACKED_TEXT_ATTENTION
    from papo.models.inputs import append_completions
    from papo.models.packing import pack

    policy = tiny_policy()
    policy.model.set_attn_implementation({"text_config": PACKED_TEXT_ATTENTION})
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    ids = torch.randint(5, 200, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4])
    inputs = append_completions(batch, ids, mask)
    expected, _ = policy.model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"])
    keep = inputs["attention_mask"].bool()
    packed = pack(policy.model, inputs)
    assert torch.equal(packed.inputs["position_ids"][:, 0], expected[:, keep])


def test_chunked_equals_unchunked_and_exact_entropies():
    torch.manual_seed(2)
    policy = tiny_policy()
    policy.model.eval()
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    comp = Sampler(policy).generate(batch, SamplingParams(10))
    inputs = append_completions(batch, comp.ids, comp.mask)
    with torch.no_grad():
        a, ea = response_logprobs(policy.model, inputs, comp.mask, 1.0, policy.suppress, chunk_tokens=3, with_entropy=True)
        b, eb = response_logprobs(policy.model, inputs, comp.mask, 1.0, policy.suppress, chunk_tokens=4096, with_entropy=True)
        logits = policy.model(**inputs).logits[:, batch.prompt_len - 1 : -1].float()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(ea, eb, atol=1e-6, rtol=0)
    probs = logits.masked_fill(policy.suppress, float("-inf")).softmax(-1)
    ref = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    torch.testing.assert_close(ea[comp.mask.bool()], ref[comp.mask.bool()], atol=1e-5, rtol=0)


def test_chunked_backward_matches_unchunked_backward():
    policy = tiny_policy()
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    ids, mask = policy.tokenize_completions(["<think>seen: a=1.</think> \\boxed{1}", "\\boxed{2}"])
    grads = []
    for chunk in (4, 4096):
        policy.model.zero_grad()
        logp, _ = policy.logprobs(batch, ids, mask, chunk_tokens=chunk)
        logp.sum().backward()
        grads.append(policy.model.lm_head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_masked_forward_swaps_only_image_tensors():
    torch.manual_seed(3)
    policy = tiny_policy()
    sharpen_vision(policy)
    policy.model.eval()
    samples, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    masked_images = [corrupt_images(ims, MaskingConfig(ratio=0.6), 0, s.id) for s, ims in zip(samples, images)]
    masked = policy.encode(prompts, masked_images)
    comp = Sampler(policy).generate(batch, SamplingParams(8))
    inputs = append_completions(batch, comp.ids, comp.mask)
    swapped = with_images(inputs, masked)
    for key in inputs:
        if key == "pixel_values":
            assert not torch.equal(swapped[key], inputs[key])
        elif key == "image_grid_thw":
            assert torch.equal(swapped[key], inputs[key])
        else:
            assert swapped[key] is inputs[key], key
    with torch.no_grad():
        full, _ = policy.logprobs(batch, comp.ids, comp.mask)
        via_pixels, _ = policy.logprobs(batch, comp.ids, comp.mask, images=masked)
        # the patch-aligned fast path (images are multiples of 28) gives the same masked log-probs
        rngs = [mask_rng(0, s.id, 0, 0) for s in samples]
        fast_pv = random_mask_pixel_values(batch.inputs["pixel_values"], batch.inputs["image_grid_thw"], 0.6, rngs,
                                           PatchLayout.from_image_processor(policy.processor.image_processor))
        via_fast, _ = response_logprobs(policy.model, with_pixel_values(inputs, fast_pv), comp.mask, 1.0, policy.suppress)
    assert (full - via_pixels).abs().max() > 1e-3  # the image matters to this model
    torch.testing.assert_close(via_fast, via_pixels, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="keep every image's size"):
        with_images(inputs, policy.encode(prompts, [images[1], images[0]]))


def _transformers_logprobs(model, inputs, mask, suppress):
    """Response log-probs from transformers' own forward (pixels in, full logits out): the reference."""
    logits = model(**inputs).logits.float().masked_fill(suppress, float("-inf"))
    p = inputs["input_ids"].shape[1] - mask.shape[1]
    rows, cols = mask.bool().nonzero(as_tuple=True)
    logp = torch.log_softmax(logits[rows, p - 1 + cols], -1).gather(-1, inputs["input_ids"][rows, p + cols, None])[:, 0]
    return torch.zeros(mask.shape).index_put((rows, cols), logp)


def test_image_features_are_computed_once_per_distinct_image_with_transformers_values():
    """Rows that repeat one encoded view (a prompt's G rollouts) run the vision tower once for it; log-probs and
    gradients equal those of every row encoded apart, and both equal transformers' own forward."""
    torch.manual_seed(4)
    policy = tiny_policy()
    sharpen_vision(policy, 5.0)
    _, prompts, images = mixed_batch(policy)
    views = [policy.encode([p], [ims]) for p, ims in zip(prompts, images)]
    order = [0, 0, 0, 1, 1]
    shared = concat_prompt_batches([views[i] for i in order], policy.pad_id)
    apart = concat_prompt_batches([policy.encode([prompts[i]], [images[i]]) for i in order], policy.pad_id)
    assert shared.image_ids == (views[0].image_ids * 3 + views[1].image_ids * 2)
    assert len(set(apart.image_ids)) == 5
    for key in shared.inputs:
        assert torch.equal(shared.inputs[key], apart.inputs[key]), key
    comp = Sampler(policy).generate(shared, SamplingParams(6))
    patches = []
    hook = policy.model.model.visual.register_forward_pre_hook(lambda m, args: patches.append(args[0].shape[0]))
    policy.model.train()
    results = []
    for batch in (shared, apart):
        policy.model.zero_grad(set_to_none=True)
        logp, _ = policy.logprobs(batch, comp.ids, comp.mask)
        logp.sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}))
    hook.remove()
    per_image = shared.inputs["image_grid_thw"].prod(-1).tolist()
    assert patches == [per_image[0] + per_image[3], sum(per_image)]  # 2 distinct images against 5
    (logp, grads), (ref_logp, ref_grads) = results
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    assert any("visual" in name for name in grads) and grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max() < 1e-5 * max(1.0, g.abs().max().item()), name
    with torch.no_grad():
        theirs = _transformers_logprobs(policy.model, append_completions(shared, comp.ids, comp.mask), comp.mask,
                                        policy.suppress)
    torch.testing.assert_close(logp, theirs, atol=1e-5, rtol=0)
    masked = policy.encode(prompts[:1], [[im.rotate(90) for im in images[0]]])
    swapped_ids = concat_prompt_batches([masked] * 3, policy.pad_id).image_ids
    assert len(set(swapped_ids)) == 1 and swapped_ids[0] not in shared.image_ids


def test_scoring_keeps_no_model_alive():
    """The per-tower caches of precomputed vision indices hold no reference to the tower: a benchmark or a
    notebook that scores with several models in turn frees each (a kept one held its GPU memory)."""
    import gc
    import weakref

    policy = tiny_policy()
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    with torch.no_grad():
        policy.logprobs(batch, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    tower = weakref.ref(policy.model.model.visual)
    del policy
    gc.collect()
    assert tower() is None


def test_a_views_pixels_move_to_the_device_and_its_token_tensors_and_grids_stay():
    """MicroBatches keeps each view's pixels on the policy's device for every pass; host code keeps reading
    the token ids, masks and image grids where the processor left them."""
    policy = tiny_policy()
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    moved = batch.pixels_to("meta")
    assert moved.inputs["pixel_values"].device.type == "meta"
    for key, value in batch.inputs.items():
        if key != "pixel_values":
            assert moved.inputs[key] is value, key
    assert moved.image_keys == batch.image_keys


def test_policy_that_prefers_image_pad_never_samples_it_and_scoring_works():
    policy = tiny_policy()
    image_pad = policy.processor.image_token_id
    with torch.no_grad():
        policy.model.lm_head.weight[image_pad] = policy.model.lm_head.weight.abs().max() * 50  # a policy that loves <|image_pad|>
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    # without suppression the sampler emits it and re-scoring crashes: the pitfall is real
    unsuppressed, _ = _sample_with_scores(policy, batch, 1.0, max_new_tokens=4, suppress=False)
    assert (unsuppressed.ids == image_pad).any()
    with pytest.raises(Exception):
        policy.logprobs(batch, unsuppressed.ids, unsuppressed.mask)
    comp = Sampler(policy).generate(batch, SamplingParams(6))
    assert not (comp.ids == image_pad).any()
    assert not any((comp.ids == i).any() for i in policy.suppress_ids)
    logp, _ = policy.logprobs(batch, comp.ids, comp.mask)
    assert torch.isfinite(logp).all()


def test_mm_token_type_ids_are_extended_and_matter():
    policy = tiny_policy()
    policy.model.eval()
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    comp = Sampler(policy).generate(batch, SamplingParams(6))
    inputs = append_completions(batch, comp.ids, comp.mask)
    assert inputs["mm_token_type_ids"].shape == inputs["input_ids"].shape
    assert (inputs["mm_token_type_ids"][:, batch.prompt_len:] == 0).all()
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        a, _ = response_logprobs(policy.model, inputs, comp.mask, 1.0, policy.suppress)
        b, _ = response_logprobs(policy.model, without, comp.mask, 1.0, policy.suppress)
    assert (a - b).abs().max() > 1e-4  # 1-D fallback positions: silently different log-probs


# ----------------------------------------------------------- loading pitfalls and export


def test_export_round_trip_offline(tmp_path, monkeypatch):
    policy = tiny_policy()
    policy.save(tmp_path)
    for f in ("config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / f).is_file(), f
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = load_processor(str(tmp_path))
    assert hasattr(processor, "image_processor") and processor.tokenizer.chat_template
    _, prompts, images = mixed_batch(policy)
    a = policy.encode(prompts, images).inputs
    with torch.no_grad():
        assert torch.equal(model(**a).logits, policy.model.eval()(**a).logits)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"


def test_autoprocessor_alone_is_not_enough_without_torchvision(tmp_path):
    pytest.importorskip("transformers")
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("the pitfall only exists without torchvision")
    tiny_policy().save(tmp_path)
    try:
        p = AutoProcessor.from_pretrained(tmp_path)
        assert not hasattr(p, "image_processor")  # silently a tokenizer
    except (ImportError, ValueError, OSError):
        pass  # or a hard failure: either way papo's loader is needed
    assert hasattr(load_processor(str(tmp_path)), "image_processor")


def test_processor_loader_rejects_a_tokenizer_only_directory(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    with pytest.raises((ValueError, OSError)):
        load_processor(str(tmp_path))


def test_pixel_bounds_never_mutate_class_defaults():
    default = dict(Qwen2VLImageProcessorPil.size)
    policy = tiny_policy()
    set_pixel_bounds(policy.processor, 28 * 28, 112 * 112)
    assert policy.processor.image_processor.size["longest_edge"] == 112 * 112
    assert Qwen2VLImageProcessorPil.size == default
    assert Qwen2VLImageProcessorPil().size["longest_edge"] == default["longest_edge"]
    # the pitfall papo avoids: constructor min/max_pixels mutate the class-level dict
    try:
        Qwen2VLImageProcessorPil(max_pixels=56 * 56)
        mutated = Qwen2VLImageProcessorPil.size["longest_edge"] == 56 * 56
    finally:
        Qwen2VLImageProcessorPil.size = default
    assert mutated


def test_from_config_dtype_does_not_mutate_config():
    cfg = build_config("tiny", build_tokenizer())
    before = cfg.to_dict()
    model = model_from_config(cfg, dtype=torch.bfloat16)
    assert cfg.to_dict() == before
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_model_options_freeze_vision_and_checkpointing():
    policy = tiny_policy()
    model = prepare_model(policy.model, ModelOptions(freeze_vision=True, gradient_checkpointing=True))
    frozen = vision_parameters(model)
    assert frozen and all(not p.requires_grad for p in frozen)
    assert any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="unknown dtype"):
        ModelOptions(param_dtype="fp8").torch_dtype()


def test_lora_wraps_the_language_model_only():
    pytest.importorskip("peft")
    policy = tiny_policy()
    model = prepare_model(policy.model, ModelOptions(lora_rank=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    model.set_attn_implementation({"text_config": "sdpa"})
    assert use_packed_text_attention(model)  # padding-free under LoRA too: the peft wrapper is looked through
    assert model.get_base_model().config.text_config._attn_implementation == PACKED_TEXT_ATTENTION


def test_a_lora_policy_saves_merged_weights_like_peft_merge_and_unload(tmp_path):
    """papo merges the state dict (what a sharded model can give); peft merges modules of a copy: the same."""
    pytest.importorskip("peft")
    import copy

    from safetensors.torch import load_file

    policy = tiny_policy()
    policy.model = prepare_model(policy.model, ModelOptions(lora_rank=4, lora_alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero (a no-op adapter): give it values so the merge matters
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    expected = copy.deepcopy(policy.model).merge_and_unload().state_dict()
    policy.save(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    reloaded = Policy.from_pretrained(str(tmp_path / "saved")).model.state_dict()
    assert reloaded.keys() == expected.keys() and not any("lora" in k or "base_layer" in k for k in saved)
    assert max(float((reloaded[k] - expected[k]).abs().max()) for k in expected) < 1e-6
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(reloaded[q], tiny_policy().model.state_dict()[q])  # the adapter did change it
    assert hasattr(policy.model, "peft_config")  # the live model keeps its adapters


# ----------------------------------------------------------- other architectures through the same path


@pytest.mark.parametrize("build", ["llava", "qwen3_vl"])
def test_other_architectures_share_the_generic_path(build, tmp_path):
    from model_fixtures import llava_policy, qwen3_vl_policy

    torch.manual_seed(4)
    policy = llava_policy() if build == "llava" else qwen3_vl_policy()
    policy.model.eval()
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    comp, sampler_logp = _sample_with_scores(policy, batch, 1.0, max_new_tokens=8)
    with torch.no_grad():
        logp, _ = policy.logprobs(batch, comp.ids, comp.mask)
    m = comp.mask.bool()
    assert (logp[m] - sampler_logp[m]).abs().max() < 1e-5
    policy.save(tmp_path)
    reloaded = load_processor(str(tmp_path))
    assert type(reloaded).__name__ == type(policy.processor).__name__
    if build == "qwen3_vl":  # the masking cell follows the encoder's 16-px patches
        assert PatchLayout.from_image_processor(reloaded.image_processor).patch_size == 16


def test_masks_are_drawn_before_the_resize_like_the_official_code():
    from papo.data.synthetic import make_sample

    policy = tiny_policy()
    policy.min_pixels, policy.max_pixels = 28 * 28, 112 * 112  # 224-px images are scaled down by PAPO's rule
    sample = make_sample("count", "test", 0, 0, size=224)
    full, masked = image_pair(sample, MaskingConfig(ratio=0.6), 0, 0, policy.min_pixels, policy.max_pixels)
    assert full[0].size == masked[0].size == (112, 112)
    raw_masked = corrupt_images(sample.load_images(None, None), MaskingConfig(ratio=0.6), 0, sample.id)[0]
    expected = raw_masked.resize((112, 112))
    import numpy as np

    assert np.array_equal(np.asarray(masked[0]), np.asarray(expected))


def test_a_processor_that_would_shrink_papos_pixel_bounds_is_named():
    with pytest.warns(UserWarning, match="data.min_pixels=200704 exceeds the maximum"):
        Policy.from_pretrained(None, min_pixels=200704)
