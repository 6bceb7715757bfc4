"""papo's sampler against transformers' at the authors' settings (T=1, top_p 0.99, top_k off), on a GPU.

    python benchmarks/sampling_check.py --out benchmarks/results/sampling-check-h200.json

1. The sampling head alone, compiled as the rollout engine compiles it, at a 151,936-token vocabulary: rows of
   Zipf-like logits, many draws per row from papo's ``sample`` and from transformers' TopPLogitsWarper +
   multinomial. Reports the share of draws outside transformers' nucleus (must be 0) and the total-variation
   distance of each sampler's token frequencies to the exact nucleus distribution, beside the distance between
   two halves of the same sampler's draws (what sampling noise alone gives).
   Also papo's top-p search (the Triton kernels) against the torch bisection at 2 and 160 rows: the share of
   rows whose kept tokens differ (must be 0) and each one's milliseconds per call. And the engine's race
   (``race_winner``: the search only on rows whose race over all tokens is won outside the nucleus) against
   the argmax of ``race_scores`` (every row searched), both compiled: tokens that differ (must be 0 but for a
   mass that rounds to the budget) and milliseconds per call at 2 and 160 rows.
2. Whole rollouts, n=5: the Qwen2.5-VL-3B architecture (random weights, bf16) through ``Policy.generate`` with
   papo.rollout (compiled, CUDA graphs) and with transformers generate: mean response length, share ended by
   EOS, and the mean log-prob of the sampled tokens under the scoring forward, each with its standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import qwen25_vl_config  # noqa: E402
from decode_gemms import graph_ms  # noqa: E402

from papo.rollout import Sampler  # noqa: E402
from papo.rollout.decode_step import sample  # noqa: E402
from papo.rollout.hf import hf_generate  # noqa: E402
from papo.rollout.keyed_noise import random_keys  # noqa: E402
from papo.rollout.sampling import SamplingParams  # noqa: E402

VOCAB = 151936


def head_check(rows: int = 8, draws: int = 8192, top_p: float = 0.99, chunk: int = 512) -> dict:
    from transformers.generation.logits_process import TopPLogitsWarper

    gen = torch.Generator(device="cuda").manual_seed(0)
    ranks = torch.arange(1, VOCAB + 1, device="cuda", dtype=torch.float32)
    slopes = torch.linspace(0.8, 1.6, rows, device="cuda")[:, None]  # flatter to sharper rows
    logits = -slopes * ranks.log()[None] + 0.1 * torch.randn(rows, VOCAB, generator=gen, device="cuda")
    logits = torch.stack([row[torch.randperm(VOCAB, generator=gen, device="cuda")] for row in logits])
    suppress = torch.zeros(VOCAB, dtype=torch.bool, device="cuda")
    params = SamplingParams(1, temperature=1.0, top_p=top_p)
    compiled = torch.compile(sample, dynamic=False)
    warper = TopPLogitsWarper(top_p)

    def papo_draws(x):  # a fresh noise key per draw, as every rollout row has
        keys = random_keys(x.shape[0]).to(x.device)
        return compiled(x, suppress, params, keys, torch.zeros_like(keys))[0]

    def hf_draws(x):
        return torch.multinomial(warper(None, x.clone()).softmax(-1), 1)[:, 0]

    out = {"vocab": VOCAB, "rows": rows, "draws_per_row": draws, "top_p": top_p, "per_row": []}
    totals = {"papo": [], "transformers": []}
    for r in range(rows):
        nucleus = torch.isfinite(warper(None, logits[r : r + 1].clone()))[0]
        exact = torch.where(nucleus, logits[r].softmax(-1), 0.0)
        exact /= exact.sum()
        row = {"nucleus_tokens": int(nucleus.sum())}
        for name, fn in (("papo", papo_draws), ("transformers", hf_draws)):
            tokens = torch.cat([fn(logits[r : r + 1].expand(min(chunk, draws - s), -1)) for s in range(0, draws, chunk)])
            freq = torch.bincount(tokens, minlength=VOCAB).float() / draws
            half = draws // 2
            f1 = torch.bincount(tokens[:half], minlength=VOCAB).float() / half
            f2 = torch.bincount(tokens[half:], minlength=VOCAB).float() / (draws - half)
            row[name] = {"outside_nucleus": int((~nucleus[tokens]).sum()), "tv_to_exact": round(0.5 * float((freq - exact).abs().sum()), 4),
                         "tv_between_halves": round(0.5 * float((f1 - f2).abs().sum()), 4)}
            totals[name].append(row[name])
        out["per_row"].append(row)
    for name, rows_ in totals.items():
        out[name] = {"outside_nucleus": sum(x["outside_nucleus"] for x in rows_),
                     "mean_tv_to_exact": round(sum(x["tv_to_exact"] for x in rows_) / len(rows_), 4),
                     "mean_tv_between_halves": round(sum(x["tv_between_halves"] for x in rows_) / len(rows_), 4)}
    out["search"] = search_check(top_p)
    out["race"] = race_check(top_p)
    return out


def search_check(top_p: float) -> list[dict]:
    from papo.rollout.nucleus import _kernel_cutoff, bisection_cutoff

    def ms_per_call(fn, repeats: int = 20) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats

    rows_out = []
    for rows in (2, 160):
        gen = torch.Generator(device="cuda").manual_seed(rows)
        sharpness = torch.linspace(0.05, 20.0, rows, device="cuda")[:, None]  # flat to peaked rows
        probs = (torch.randn(rows, VOCAB, generator=gen, device="cuda") * sharpness).softmax(-1)
        kernel, bisection = _kernel_cutoff(probs, top_p), bisection_cutoff(probs, top_p)
        differ = ((probs > kernel[:, None]) != (probs > bisection[:, None])).any(-1)
        rows_out.append({"rows": rows, "rows_differing": int(differ.sum()),
                         "kernel_ms": round(ms_per_call(lambda: _kernel_cutoff(probs, top_p)), 3),
                         "bisection_ms": round(ms_per_call(lambda: bisection_cutoff(probs, top_p)), 3)})
    return rows_out


def race_check(top_p: float, columns: int = 64) -> list[dict]:
    """race_winner against race_scores' argmax, compiled, on Zipf-like rows at Qwen's vocabulary."""
    from papo.rollout.decode_step import race_scores, race_winner

    params = SamplingParams(1, temperature=1.0, top_p=top_p)
    searched_all = torch.compile(lambda x, k, c: race_scores(x, params, k, c).argmax(-1), dynamic=False)
    searched_few = torch.compile(lambda x, k, c: race_winner(x, params, k, c), dynamic=False)
    out = []
    for rows in (2, 160):
        gen = torch.Generator(device="cuda").manual_seed(rows)
        ranks = torch.arange(1, VOCAB + 1, device="cuda", dtype=torch.float32)
        slopes = torch.linspace(0.8, 1.6, rows, device="cuda")[:, None]
        logits = -slopes * ranks.log()[None] + 0.1 * torch.randn(rows, VOCAB, generator=gen, device="cuda")
        logits = logits[:, torch.randperm(VOCAB, generator=gen, device="cuda")]
        keys = random_keys(rows).cuda()
        differ = 0
        for c in range(columns):
            column = torch.full((rows,), c, device="cuda")
            differ += int((searched_all(logits, keys, column) != searched_few(logits, keys, column)).sum())
        column = torch.zeros(rows, dtype=torch.long, device="cuda")
        # timed as the engine runs them, in a CUDA graph (compiled already, above)
        times = {name: round(graph_ms(lambda: fn(logits, keys, column), reps=20)[0], 3)
                 for name, fn in (("every_row_searched_ms", searched_all), ("few_rows_searched_ms", searched_few))}
        out.append({"rows": rows, "draws": rows * columns, "tokens_differing": differ, **times})
    return out


def rollout_check(prompts: int = 16, n: int = 5, new_tokens: int = 256, top_p: float = 0.99) -> dict:
    from transformers import AutoModelForImageTextToText

    from papo.data.synthetic import make_sample
    from papo.models.policy import Policy
    from papo.models.tiny import build_processor

    processor = build_processor()
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(qwen25_vl_config("3b", processor.tokenizer), dtype=torch.bfloat16)
    policy = Policy(model, processor, min_pixels=200704, max_pixels=1003520)
    samples = [make_sample("count", "train", 0, i, size=224) for i in range(prompts)]
    batch = policy.encode([s.formatted_prompt() for s in samples], [policy.load_images(s) for s in samples])
    params = SamplingParams(new_tokens, temperature=1.0, top_p=top_p)
    out = {"model": "qwen2.5-vl-3b (random weights, bf16)", "prompts": prompts, "n": n, "max_new_tokens": new_tokens}
    for engine in ("papo", "hf"):  # papo's engine and keyed sampler; transformers generate with its own sampler
        torch.manual_seed(1)
        t = time.time()
        if engine == "papo":
            comp = Sampler(policy, "papo").generate(batch, params, n=n)
        else:
            comp = hf_generate(policy.model, batch, params, policy.suppress_ids, policy.eos_ids, policy.pad_id, n)
        seconds = time.time() - t
        rows = torch.arange(batch.size).repeat_interleave(n)
        logps = []
        for s in range(0, len(rows), 8):  # score in slices: the full-vocabulary logits of one slice at a time
            idx = rows[s : s + 8]
            part = policy.encode([samples[int(i)].formatted_prompt() for i in idx], [policy.load_images(samples[int(i)]) for i in idx])
            with torch.no_grad():
                lp, _ = policy.logprobs(part, comp.ids[s : s + 8], comp.mask[s : s + 8])
            logps.append(lp[comp.mask[s : s + 8].bool().to(lp.device)].float().cpu())
        lp = torch.cat(logps)
        lengths = comp.lengths.float()
        out[engine] = {"seconds": round(seconds, 2), "mean_length": round(float(lengths.mean()), 2),
                       "length_se": round(float(lengths.std() / len(lengths) ** 0.5), 2),
                       "ended_by_eos": round(float(comp.finished.float().mean()), 3),
                       "mean_token_logp": round(float(lp.mean()), 4), "token_logp_se": round(float(lp.std() / len(lp) ** 0.5), 4),
                       "tokens": int(lp.numel())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--head-only", action="store_true", help="the sampling head and search checks, no rollouts")
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result["head"] = head_check()
    print(json.dumps({k: result["head"][k] for k in ("papo", "transformers", "search", "race")}), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.head_only:
        return
    result["rollout"] = rollout_check()
    print(json.dumps({k: result["rollout"][k] for k in ("papo", "hf")}), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
