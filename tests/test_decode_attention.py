"""The rollout engine's Triton kernels, run by Triton's CPU interpreter in a subprocess (the interpreter is
chosen when Triton is imported): papo.rollout.decode_attention against SDPA on random caches, the whole engine's
greedy tokens against the SDPA engine's, and papo.rollout.nucleus's search against transformers' nucleus."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

KERNEL_VS_SDPA = """
import torch, torch.nn.functional as F
from papo.rollout.decode_attention import decode_attention
torch.manual_seed(0)
for b, kv, group, hd, L in [(5, 2, 8, 32, 200), (3, 4, 7, 24, 130)]:  # Qwen2.5-VL-3B's and -7B's head groups
    q = torch.randn(b, kv, group, hd)
    k, v = torch.randn(b + 2, kv, L, hd), torch.randn(b + 2, kv, L, hd)  # the cache holds more rows than the step
    start = torch.tensor([0, 3, 10, 0, 50][:b], dtype=torch.int32)
    length = torch.tensor([L, L - 60, 0, 1, 64][:b], dtype=torch.int32)  # 0: a finished row
    for splits in (1, 2, 3):
        out = decode_attention(q, k, v, start, length, 0.3, splits)
        for r in range(b):
            s, n = int(start[r]), int(length[r])
            ref = torch.zeros_like(q[r]) if n == 0 else F.scaled_dot_product_attention(
                q[r:r + 1], k[r:r + 1, :, s:s + n], v[r:r + 1, :, s:s + n], scale=0.3)[0]
            err = float((out[r] - ref).abs().max())
            assert err < 1e-5, (b, splits, r, err)
print("kernel ok")
"""

ENGINE_VS_SDPA = """
import torch
from papo.models.policy import Policy
from papo.data.synthetic import make_sample
from papo.rollout import RolloutEngine
from papo.rollout.sampling import SamplingParams
policy = Policy.from_pretrained(None)
samples = [make_sample(t, "test", 0, i, size=224) for i, t in enumerate(["count", "clock", "maze"])]
prompts = [s.formatted_prompt() for s in samples]
prompts[1] = "Short. " + prompts[1].replace("<image>", "")  # a row without an image: more left padding
images = [s.load_images(None, None) for s in samples]
images[1] = []
batch = policy.encode(prompts, images)
params = SamplingParams(20, greedy=True)
limits = torch.tensor([20, 3, 2, 2, 3, 20])  # four rows stop early: finished rows, then compaction to 2 rows
compactions = []
original = RolloutEngine._compact
RolloutEngine._compact = lambda self, a, b: (compactions.append((a, b)), original(self, a, b))
runs = {}
for kernel in (True, False):
    engine = RolloutEngine(policy.model, policy.suppress_ids, policy.eos_ids, policy.pad_id)
    engine.step.kernel = kernel
    comp, logp = engine.generate(batch, params, n=2, max_new_tokens=limits)
    runs[kernel] = (comp, logp)
assert compactions and compactions[0] == (6, 2), compactions
(a, la), (b, lb) = runs[True], runs[False]
assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask), (a.ids, b.ids)
assert float((la - lb).abs().max()) < 1e-4
print("engine ok")
"""


NUCLEUS = """
import torch
from transformers.generation.logits_process import TopPLogitsWarper
from papo.rollout.nucleus import _kernel_cutoff
for vocab, top_ps in ((50, (0.3, 0.9, 0.99)), (4096, (0.3, 0.9, 0.99)), (151936, (0.99,))):  # Qwen's vocabulary
    for top_p in top_ps:
        gen = torch.Generator().manual_seed(vocab)
        logits = torch.randn(6, vocab, generator=gen) * torch.tensor([0.05, 0.5, 1.0, 3.0, 8.0, 20.0])[:, None]
        logits[0, :3] = float("-inf")  # suppressed ids: probability 0
        expected = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        probs = logits.softmax(-1)
        if vocab < 151936:  # interpreted, a call at Qwen's vocabulary takes about a minute: the searched one covers it
            assert torch.equal(probs > _kernel_cutoff(probs, top_p)[:, None], expected), (vocab, top_p)
        searched = torch.tensor([True, False, True, False, False, True])  # only these rows are searched
        some = _kernel_cutoff(probs, top_p, searched)
        assert torch.equal(probs[searched] > some[searched, None], expected[searched]) and (some[~searched] == -1).all()
print("nucleus ok")
"""


def _interpreted(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_kernel_equals_sdpa_on_each_rows_slots():
    assert "kernel ok" in _interpreted(KERNEL_VS_SDPA)


def test_engine_with_the_kernel_gives_the_sdpa_engines_tokens():
    assert "engine ok" in _interpreted(ENGINE_VS_SDPA)


def test_nucleus_kernel_keeps_exactly_transformers_nucleus():
    assert "nucleus ok" in _interpreted(NUCLEUS)
