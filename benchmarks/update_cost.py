"""Where the update's time goes: one micro-batch's forward + backward (and the no-grad scoring forward) at
several response lengths, through the Trainer's own policy and settings (``train_step.py``'s PAPER settings,
fp32 master weights with bf16 compute, gradient checkpointing).

    python benchmarks/update_cost.py --out /tmp/update-cost.json --lengths 256,512,1024,2048
    python benchmarks/update_cost.py --smoke --out /tmp/update-cost.json    # the embedded model on the CPU

If the time of a micro-batch grows in proportion to its padded tokens, sorting sequences into micro-batches of
similar length saves what padding costs; a large fixed cost per micro-batch (the vision tower, casting weights,
launches) is instead paid once per micro-batch whatever its length. With ``--profile`` the longest length's
update is also profiled and its top CUDA kernels listed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import PEAK_BF16_FLOPS, paper_trainer, parameter_counts, sampleable_ids  # noqa: E402

from papo.data.masking import image_pair  # noqa: E402


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="3b")
    ap.add_argument("--lengths", default="256,512,1024,2048")
    ap.add_argument("--micro", type=int, default=4, help="sequences per micro-batch (the authors' 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "papo-bench-models"))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    trainer, device, model_dir = paper_trainer(args.size, args.models_dir, args.smoke, "update-cost",
                                               ["rollout.max_new_tokens=64"])
    policy = trainer.policy
    _, sample = trainer.stream.take(1)[0]
    images, _ = image_pair(sample, trainer.masking, 0, 0, policy.min_pixels, policy.max_pixels)
    batch = policy.encode([sample.formatted_prompt()] * args.micro, [images] * args.micro)
    n_text, n_vision, _ = parameter_counts(policy.model)
    patches = int(batch.inputs["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in batch.inputs else 0
    vocab = sampleable_ids(policy)
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        g = torch.Generator().manual_seed(length)
        ids = vocab[torch.randint(len(vocab), (args.micro, length), generator=g)]
        mask = torch.ones_like(ids)

        def update() -> None:
            policy.model.train()  # as the trainer's update: gradient checkpointing recomputes only in train mode
            logp, _ = policy.logprobs(batch, ids, mask, 1.0)
            (-logp.sum() / mask.sum()).backward()
            policy.model.zero_grad(set_to_none=True)

        def score() -> None:
            policy.model.eval()
            with torch.no_grad():
                policy.logprobs(batch, ids, mask, 1.0)

        tokens = args.micro * (batch.prompt_len + length)
        flops = 6 * n_text * tokens + 6 * n_vision * patches  # the update's model FLOPs, as train_step counts them
        update_s, score_s = timed(update, device, args.repeats), timed(score, device, args.repeats)
        row = {"response_tokens": length, "sequence_tokens": batch.prompt_len + length, "micro_batch": args.micro,
               "update_s": round(update_s, 4), "score_s": round(score_s, 4),
               "update_tokens_per_s": round(tokens / update_s, 1), "score_tokens_per_s": round(tokens / score_s, 1)}
        if device == "cuda":
            row["update_mfu"] = round(flops / update_s / PEAK_BF16_FLOPS, 4)
            row["score_mfu"] = round(flops / 3 / score_s / PEAK_BF16_FLOPS, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": model_dir if args.smoke else f"qwen2.5-vl-{args.size}", "image_patches_per_micro_batch": patches,
              "prompt_tokens": batch.prompt_len, "torch": torch.__version__, "rows": rows}
    if args.profile and device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            update()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
        print(table)
        result["profile_top"] = table
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
