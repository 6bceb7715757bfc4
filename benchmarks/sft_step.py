"""Where does an SFT step's time go? Data (drawing + image processor, one CPU core) vs the model step.

    python benchmarks/sft_step.py --model 20m --batch-size 64 --steps 20 [--device cuda] [--profile] [--data SPEC]

Prints milliseconds per batch for the data path and for forward+backward+AdamW on one fixed batch, with the
vision tower's attention packed (papo's default) and per segment (transformers' SDPA path), measured side by
side in one run; with --profile, the top operators of the packed step by self CPU time.
"""

from __future__ import annotations

import argparse
import time

import torch

from papo.data.synthetic import dataset_from_spec
from papo.models.attention import PACKED_VISION_ATTENTION
from papo.models.inputs import encode_prompts, to_device, tokenize_completions
from papo.models.policy import Policy
from papo.models.precision import Precision
from papo.models.tiny import build_tiny


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="20m")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--data", default="synthetic:all", help="synthetic spec of the batches, e.g. with ?explain=1")
    args = ap.parse_args()
    model, processor = build_tiny(args.model)
    policy = Policy(model.to(args.device), processor)
    samples = dataset_from_spec(args.data, split="train", n=args.batch_size * 3, seed=0, size=224)

    def batch(i: int):
        rows = [samples[(i * args.batch_size + j) % len(samples)] for j in range(args.batch_size)]
        prompts = encode_prompts(processor, [s.formatted_prompt() for s in rows], [s.load_images(None, None) for s in rows])
        ids, mask = tokenize_completions(processor.tokenizer, [s.meta["solution"] for s in rows], policy.eos_ids[0], policy.pad_id)
        return prompts, ids, mask

    t = time.perf_counter()
    for i in range(3):
        prompts, ids, mask = batch(i)
    data_s = (time.perf_counter() - t) / 3

    cuda = args.device.startswith("cuda")
    optim = torch.optim.AdamW(policy.model.parameters(), lr=1e-4, fused=cuda)  # as papo sft runs it
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> None:
        logp, _ = policy.logprobs(prompts, ids, mask)
        weight = to_device(mask, logp.device).to(logp.dtype)  # as papo sft does
        loss = -(logp * weight).sum() / weight.sum()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()

    def timed() -> float:
        for _ in range(3):
            step()
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        return (time.perf_counter() - t) / args.steps

    policy.model.train()
    packed_s = timed()
    policy.model.set_attn_implementation({"vision_config": "sdpa"})
    stock_s = timed()
    policy.model.set_attn_implementation({"vision_config": PACKED_VISION_ATTENTION})
    if cuda:  # papo sft's default on CUDA: fp32 weights, bf16 autocast
        policy.precision = Precision(torch.float32, torch.bfloat16)
        mixed_s = timed()
    n_params = sum(p.numel() for p in policy.model.parameters()) / 1e6
    tokens = prompts.prompt_len + ids.shape[1]
    print(f"{args.model} ({n_params:.1f}M) batch {args.batch_size} x ~{tokens} tokens on {args.device}: "
          f"data {data_s * 1e3:.0f} ms/batch on one core; model step {packed_s * 1e3:.0f} ms with packed vision "
          f"attention, {stock_s * 1e3:.0f} ms per segment ({stock_s / packed_s:.2f}x)")
    if cuda:
        print(f"model step with bf16 autocast over fp32 weights, papo sft's default: {mixed_s * 1e3:.0f} ms "
              f"({packed_s / mixed_s:.2f}x faster than fp32)")
    if args.profile:
        with torch.profiler.profile() as prof:
            for _ in range(3):
                step()
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
