"""Padding-free against padded forwards, side by side: the update's forward + backward on a micro-batch of 4 and
the no-grad scoring forward on micro-batches of 4 and 16, with responses of unequal lengths, through the
Trainer's policy (``train_step.py``'s PAPER settings, fp32 master weights with bf16 compute, gradient
checkpointing). Also the largest log-prob difference between the two layouts.

    python benchmarks/padding_free.py --out /tmp/padding-free.json           # Qwen2.5-VL-3B, CUDA
    python benchmarks/padding_free.py --smoke --out /tmp/padding-free.json   # the embedded model, CPU

Response lengths are drawn once (seeded): uniform in [64, 2048) with a third at the 2,048-token cap, roughly
what random weights sample at the authors' settings (mean ~1,200 tokens).
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
from train_step import paper_trainer, sampleable_ids  # noqa: E402
from update_cost import timed  # noqa: E402

from papo.data.masking import image_pair  # noqa: E402
from papo.models.attention import PACKED_TEXT_ATTENTION  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="3b")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "papo-bench-models"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile one padding-free scoring call on new shapes")
    args = ap.parse_args()
    cap = 64 if args.smoke else 2048
    trainer, device, model_dir = paper_trainer(args.size, args.models_dir, args.smoke, "padding-free",
                                               [f"rollout.max_new_tokens={cap}"])
    policy = trainer.policy
    samples = [s for _, s in trainer.stream.take(16)]
    images = [image_pair(s, trainer.masking, 0, 0, policy.min_pixels, policy.max_pixels)[0] for s in samples]
    batch16 = policy.encode([s.formatted_prompt() for s in samples], images)
    batch4 = policy.encode([s.formatted_prompt() for s in samples[:4]], images[:4])
    vocab = sampleable_ids(policy)

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min(64, cap - 1), cap, (16,), generator=g)
        lengths[torch.randperm(16, generator=g)[: 16 // 3]] = cap
        width = int(lengths.max())
        ids = vocab[torch.randint(len(vocab), (16, width), generator=g)]
        return lengths, ids, (torch.arange(width)[None] < lengths[:, None]).long()

    lengths, ids, mask = draw(0)

    def update() -> None:
        policy.model.train()
        logp, _ = policy.logprobs(batch4, ids[:4, : int(lengths[:4].max())], mask[:4, : int(lengths[:4].max())], 1.0)
        (-logp.sum() / mask[:4].sum()).backward()
        policy.model.zero_grad(set_to_none=True)

    def score(batch, n):
        def run() -> torch.Tensor:
            policy.model.eval()
            with torch.no_grad():
                return policy.logprobs(batch, ids[:n], mask[:n], 1.0)[0]
        return run

    text = policy.model.config.text_config
    rows, logps = {}, {}
    for layout, implementation in (("padded", "sdpa"), ("padding_free", PACKED_TEXT_ATTENTION)):
        policy.model.set_attn_implementation({"text_config": implementation})
        assert text._attn_implementation == implementation
        rows[layout] = {"update_micro4_s": round(timed(update, device, args.repeats), 4),
                        "score_micro4_s": round(timed(score(batch4, 4), device, args.repeats), 4),
                        "score_micro16_s": round(timed(score(batch16, 16), device, args.repeats), 4)}
        logps[layout] = score(batch16, 16)()
        print(layout, json.dumps(rows[layout]), flush=True)
    # the first call on new shapes against the second: a step's micro-batches are all new shapes
    cold: dict[str, list] = {}
    for layout, implementation in (("padded", "sdpa"), ("padding_free", PACKED_TEXT_ATTENTION)):
        policy.model.set_attn_implementation({"text_config": implementation})
        for seed in (1, 2, 3):
            _, c_ids, c_mask = draw(seed + (10 if layout == "padding_free" else 0))

            def once() -> float:
                policy.model.eval()
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.no_grad():
                    policy.logprobs(batch16, c_ids, c_mask, 1.0)
                if device == "cuda":
                    torch.cuda.synchronize()
                return round(time.perf_counter() - t, 4)

            first, second = once(), once()
            cold.setdefault(layout, []).append({"first_s": first, "second_s": second})
        print(layout, "score_micro16 first / second call on new shapes", cold[layout], flush=True)
    result_profile = ""
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        _, c_ids, c_mask = draw(99)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof, torch.no_grad():
            policy.logprobs(batch16, c_ids, c_mask, 1.0)
        result_profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50)
        print(result_profile, flush=True)
    valid = mask.bool()
    diff = (logps["padded"] - logps["padding_free"]).abs()[valid]
    tokens = {"response_tokens": lengths.tolist(), "prompt_tokens_16": int(batch16.inputs["attention_mask"].sum()),
              "padded_tokens_16": int(batch16.inputs["input_ids"].numel() + ids.numel()),
              "valid_tokens_16": int(batch16.inputs["attention_mask"].sum() + mask.sum())}
    result = {"model": model_dir if args.smoke else f"qwen2.5-vl-{args.size}", "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", **tokens, "rows": rows,
              "speedup": {k: round(rows["padded"][k] / rows["padding_free"][k], 3) for k in rows["padded"]},
              "logp_abs_diff_max": float(diff.max()), "logp_abs_diff_mean": float(diff.mean()),
              "score_micro16_new_shapes": cold, **({"profile_new_shape": result_profile} if result_profile else {})}
    print(json.dumps({k: v for k, v in result.items() if k != "response_tokens"}), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
