"""Keyed sampling noise: a rollout's tokens are a function of its key, whatever the engine, batch or process."""

import pytest
import torch

from papo.data.synthetic import make_sample
from papo.models.policy import Policy
from papo.rollout import RolloutEngine, Sampler
from papo.rollout.decode_step import sample
from papo.rollout.graded import generate_and_score
from papo.rollout.hf import hf_generate
from papo.rollout.keyed_noise import HELDOUT, exponential_noise, mix, rollout_keys, uniform
from papo.rollout.sampling import SamplingParams


def test_mix_is_the_reference_splitmix64_finaliser():
    def reference(x: int) -> int:  # splitmix64 in Python's unbounded ints, masked to 64 bits
        m = (1 << 64) - 1
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)
    for x in (0, 1, 12345, (1 << 63) + 7, (1 << 64) - 1):
        signed = x - (1 << 64) if x >= 1 << 63 else x
        got = int(mix(torch.tensor(signed, dtype=torch.long)))
        assert got & ((1 << 64) - 1) == reference(x)


def test_noise_is_exponential_and_keyed():
    keys = rollout_keys(0, torch.arange(64), 4)  # 256 rows
    e = exponential_noise(keys, torch.zeros(256, dtype=torch.long), 4096)
    assert e.mean().item() == pytest.approx(1.0, abs=0.01)  # Exp(1): mean 1, variance 1, over 1M draws
    assert e.var().item() == pytest.approx(1.0, abs=0.02)
    assert (e[:, 0] != e[:, 1]).all() and len(set(keys.tolist())) == 256
    # the same (key, column) gives the same noise in any row, next to any other rows
    again = exponential_noise(keys[[7, 3]], torch.zeros(2, dtype=torch.long), 4096)
    assert torch.equal(again, e[[7, 3]])
    assert not torch.equal(exponential_noise(keys[:2], torch.ones(2, dtype=torch.long), 4096), e[:2])


def test_uniform_stays_strictly_inside_the_unit_interval():
    extremes = torch.tensor([0, -1, (1 << 63) - 1, -(1 << 63)], dtype=torch.long)  # all-zero and all-one bit patterns
    u = uniform(extremes)
    assert (u > 0).all() and (u < 1).all()
    assert (-torch.log(u) > 0).all()  # every Exp draw positive: the race never divides by zero


def test_rollout_keys_depend_on_seed_draw_and_sample_only():
    both = rollout_keys(5, torch.tensor([10, 11]), 3)
    assert torch.equal(both[3:], rollout_keys(5, torch.tensor([11]), 3))  # draw 11's keys, batch or not
    assert not torch.equal(both, rollout_keys(6, torch.tensor([10, 11]), 3))


def test_the_race_samples_the_truncated_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -9.0]])
    suppress = torch.zeros(6, dtype=torch.bool)
    suppress[4] = True
    params = SamplingParams(1, temperature=0.7, top_p=0.9)
    draws = 20000
    keys = rollout_keys(1, torch.arange(draws), 1)
    tokens, logps = sample(logits.expand(draws, 6), suppress, params, keys, torch.zeros(draws, dtype=torch.long))
    probs = (logits / 0.7).masked_fill(suppress, float("-inf")).softmax(-1)[0]
    nucleus = probs.sort(descending=True)
    keep = nucleus.values.cumsum(0) - nucleus.values < 0.9  # the smallest prefix with mass >= top_p
    expected = torch.zeros(6)
    expected[nucleus.indices[keep]] = probs[nucleus.indices[keep]] / probs[nucleus.indices[keep]].sum()
    freq = torch.bincount(tokens, minlength=6).float() / draws
    assert (freq[expected == 0] == 0).all()  # never outside the nucleus, never a suppressed token
    se = (expected * (1 - expected) / draws).sqrt()
    assert ((freq - expected).abs() <= 4 * se + 1e-9).all(), (freq, expected)
    assert torch.allclose(logps, torch.log(probs[tokens]), atol=1e-6)  # log-probs at temperature, untruncated


@pytest.fixture(scope="module")
def policy():
    return Policy.from_pretrained(None)


def _prompts(policy, n, only=None):
    samples = [make_sample(t, "test", 0, i, size=224) for i, t in enumerate(["count", "clock", "maze", "closest"][:n])]
    samples = samples if only is None else samples[only:only + 1]
    return policy.encode([s.formatted_prompt() for s in samples], [s.load_images(None, None) for s in samples])


def test_engines_and_batches_give_the_same_keyed_tokens(policy):
    params = SamplingParams(24, temperature=1.0, top_p=0.9)
    batch = _prompts(policy, 3)
    keys = rollout_keys(0, torch.tensor([4, 5, 6]), 2)
    engine = RolloutEngine(policy.model, policy.suppress_ids, policy.eos_ids, policy.pad_id)
    fast, _ = engine.generate(batch, params, n=2, keys=keys)
    portable = hf_generate(policy.model, batch, params, policy.suppress_ids, policy.eos_ids, policy.pad_id, 2, keys=keys)
    width = int(fast.lengths.max())
    assert torch.equal(fast.ids[:, :width], portable.ids[:, :width])
    assert fast.lengths.float().mean() > 3  # sampled, not ended at once
    assert len({tuple(r) for r in fast.token_lists()}) > 3  # two samples of a prompt differ
    # the last prompt alone, with its own keys: the same tokens as inside the batch of three
    alone = Sampler(policy, engine="hf").generate(_prompts(policy, 3, only=2), params, n=2, keys=keys[4:])
    assert alone.token_lists() == fast.token_lists()[4:]


def test_keyed_heldout_grading_does_not_depend_on_how_samples_are_split(policy):
    """What each rank of a held-out check computes: samples 0-4 at once, or 0-2 and 3-4 with their first index,
    at another batch size: the same responses. Held-out keys are another stream than training's."""
    samples = [make_sample(t, "test", 0, i, size=224) for i, t in enumerate(["count", "clock", "maze", "closest", "count"])]
    params, sampler = SamplingParams(24, temperature=1.0), Sampler(policy, engine="hf")
    whole = generate_and_score(sampler, samples, params, k=2, noise_seed=3)
    parts = (generate_and_score(sampler, samples[:3], params, k=2, batch_size=2, noise_seed=3)
             + generate_and_score(sampler, samples[3:], params, k=2, noise_seed=3, first_index=3))
    assert [r.responses for r in parts] == [r.responses for r in whole]
    assert len({text for r in whole for text in r.responses}) > 5  # sampled, not one fixed answer
    shifted = generate_and_score(sampler, samples[3:], params, k=2, noise_seed=3)  # keyed as samples 0 and 1
    assert [r.responses for r in shifted] != [r.responses for r in whole[3:]]
    assert not torch.equal(rollout_keys(3, torch.arange(4), 2), rollout_keys(3, torch.arange(4), 2, HELDOUT))
    assert not torch.equal(rollout_keys(3, torch.arange(4), 2, 2), rollout_keys(3, torch.arange(4), 2, HELDOUT))
