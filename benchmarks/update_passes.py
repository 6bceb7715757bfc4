"""The update's pass size and activation checkpointing, side by side: one mini-batch of 32 sequences through
the Trainer's own ``update`` (PAPO-G loss, AdamW step included) with forward/backward passes of 4, 8 or 16
sequences (``trainer.update_micro_batch_size``; the loss keeps the authors' per-4 token mean) and full,
selective or no checkpointing (``model.gradient_checkpointing``); also the no-grad scoring pass at 16 and 32
sequences. ``train_step.py``'s PAPER settings, fp32 master weights with bf16 compute, padding-free passes.
``--images shared,apart`` times the scoring pass and the update of 16 both ways: a prompt's 5 sequences sharing
its encoded views, as a step's rollouts do (the vision tower runs once per distinct image), or each sequence
encoded apart (the tower runs once per sequence). ``--prompts shared,apart`` times them with a prompt's tokens
held once per pass (``model.share_prompts``) and once per sequence, and how far each way's log-probs lie from the
padded forward's.

    python benchmarks/update_passes.py --out /tmp/update-passes.json            # Qwen2.5-VL-3B, CUDA
    python benchmarks/update_passes.py --smoke --out /tmp/update-passes.json    # the embedded model, CPU

Response lengths are drawn once (seeded) as in ``padding_free.py``: uniform in [64, 2048) with a third at the
2,048-token cap. Reported per configuration: seconds per update, update MFU (as ``train_step.py`` counts it)
and peak memory (optimizer states included); a configuration that runs out of memory is reported as such.
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
from train_step import PEAK_BF16_FLOPS, paper_trainer, sampleable_ids, update_flops  # noqa: E402
from update_cost import timed  # noqa: E402

from papo.data.masking import image_pair  # noqa: E402
from papo.models.attention import PACKED_TEXT_ATTENTION  # noqa: E402
from papo.models.checkpointing import set_checkpointing  # noqa: E402
from papo.training.experience import Experience, LogProbs, MicroBatches  # noqa: E402
from papo.training.trainer import Trainer  # noqa: E402

SEQUENCES = 32
CONFIGS = [(4, "full"), (16, "full"), (4, "selective"), (8, "selective"), (16, "selective"), (4, "none"), (8, "none")]


def experience(trainer: Trainer, cap: int, seed: int = 0, shared: bool = True) -> Experience:
    """SEQUENCES sequences of the trainer's prompts (5 per prompt) with random response tokens; ``shared``: a
    prompt's sequences hold the same image lists (as ``Trainer.rollout`` makes them), else each its own copy."""
    policy, g = trainer.policy, torch.Generator().manual_seed(seed)
    draws = trainer.stream.take(SEQUENCES // 5 + 1)
    samples = [s for _, s in draws for _ in range(5)][:SEQUENCES]
    pairs = [image_pair(s, trainer.masking, 0, i // 5, policy.min_pixels, policy.max_pixels) for i, s in enumerate(samples)]
    if shared:
        pairs = [pairs[i - i % 5] for i in range(SEQUENCES)]
    lengths = torch.randint(min(64, cap - 1), cap, (SEQUENCES,), generator=g)
    lengths[torch.randperm(SEQUENCES, generator=g)[: SEQUENCES // 3]] = cap
    vocab = sampleable_ids(policy)
    ids = vocab[torch.randint(len(vocab), (SEQUENCES, cap), generator=g)]
    mask = (torch.arange(cap)[None] < lengths[:, None]).long()
    prompt_tokens = torch.tensor([trainer.prompt_tokens(s) for s in samples])
    scores = [{"overall": float(i % 2), "accuracy": float(i % 2)} for i in range(SEQUENCES)]
    return Experience(samples, [f"{i // 5}" for i in range(SEQUENCES)], [p[0] for p in pairs], [p[1] for p in pairs],
                      ids, mask, [""] * SEQUENCES, scores, prompt_tokens)


def packed_tokens(trainer: Trainer, mb) -> int:
    """Tokens the language model runs in one packed pass over ``mb`` (its prompts shared or not, as the policy is)."""
    from papo.models.inputs import append_completions
    from papo.models.packing import pack

    policy = trainer.policy
    inputs = append_completions(mb.full, mb.ids, mb.mask)
    packed = pack(policy.model, inputs, mb.full.prompt_len if policy.share_prompts else None, mb.full.image_ids)
    return int(packed.inputs["input_ids"].shape[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="3b")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "papo-bench-models"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--compile", default="", choices=["", "mlp-norm", "layers"],
                    help="also time update and scoring compiled: the decoder's MLPs and RMSNorms (an experiment), or "
                    "its whole layers (model.compile_layers)")
    ap.add_argument("--configs", default=",".join(f"{p}:{m}" for p, m in CONFIGS), help="pass:mode pairs to time")
    ap.add_argument("--uncheckpointed", default="", help="with --compile: also time the compiled update with these "
                    "numbers of last decoder layers left out of full checkpointing (e.g. 12,24)")
    ap.add_argument("--profile", default="", help="pass:mode to profile one update of (e.g. 16:selective)")
    ap.add_argument("--images", default="", help="shared,apart: also time scoring and the update of 16 with a "
                    "prompt's sequences sharing their encoded images, and with each encoded apart")
    ap.add_argument("--prompts", default="", help="shared,apart: also time scoring and the update of 16 with a "
                    "prompt's tokens packed once per pass (model.share_prompts) and once per sequence")
    args = ap.parse_args()
    cap = 48 if args.smoke else 2048
    trainer, device, model_dir = paper_trainer(args.size, args.models_dir, args.smoke, "update-passes",
                                               [f"rollout.max_new_tokens={cap}", "trainer.micro_batch_size=4"],
                                               ["trainer.rollout_batch_size=8", "trainer.mini_batch_size=8",
                                                "model.compile_layers=false"])  # --compile turns it on for its rows
    cfg = trainer.cfg
    exp = experience(trainer, cap)
    zeros = torch.zeros(exp.ids.shape)
    logps = LogProbs(old=None, masked=zeros, ref=zeros)  # values do not change the time; on-policy old log-probs
    adv = torch.linspace(-1, 1, SEQUENCES)
    flops = update_flops(trainer, exp)
    micro = cfg.trainer.micro_batch_size
    encoded = {}

    def batches(pass_size: int, scoring_size: int = 0) -> MicroBatches:
        key = (pass_size, scoring_size)
        if key not in encoded:  # the processor runs outside the timed region, as each step encodes once
            encoded[key] = MicroBatches(exp, trainer.policy, micro, SEQUENCES, scoring_size, pass_size)
            list(encoded[key].update_passes(0))
            list(encoded[key].scoring())
        return encoded[key]

    def update_fn(pass_size: int, mode: str, uncheckpointed: int = 0):
        set_checkpointing(trainer.policy.model, mode, uncheckpointed)
        mb = batches(pass_size, pass_size)  # as a step with scoring passes of the same size: no merging
        return lambda: trainer.update(exp, mb, logps, adv, 0.02, {})

    def measure_update(row: dict, fn, warm_up: bool = False) -> dict:
        """Seconds, MFU and peak memory of ``fn`` (an update) into ``row``; out of memory is a result too.
        ``warm_up``: one untimed call first (a new graph for the compiler)."""
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            if warm_up:
                fn()
            seconds = timed(fn, device, args.repeats)
            row.update(update_s=round(seconds, 3), update_mfu=round(flops / seconds / PEAK_BF16_FLOPS, 4) if device == "cuda" else None)
        except torch.OutOfMemoryError:
            trainer.optim.zero_grad(set_to_none=True)
            row["update_s"] = "out of memory"
        if device == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(json.dumps(row), flush=True)
        return row

    rows = []
    for pass_size, mode in (spec.split(":") for spec in args.configs.split(",") if spec):
        pass_size = int(pass_size)
        rows.append(measure_update({"pass_size": pass_size, "checkpointing": mode}, update_fn(pass_size, mode)))
    set_checkpointing(trainer.policy.model, "full")
    trainer.needs["old"], trainer.old_from_update = True, False  # three whole passes: old, masked and reference
    passes = sum(trainer.needs.values())

    def score(size: int) -> dict:
        mb = batches(micro, size)
        seconds = timed(lambda: trainer.score_experience(exp, mb, {}), device, args.repeats) / passes
        row = {"scoring_size": size, "pass_s": round(seconds, 3),
               "mfu": round(flops / 3 / seconds / PEAK_BF16_FLOPS, 4) if device == "cuda" else None}
        print(json.dumps(row), flush=True)
        return row

    scoring = [score(size) for size in (16, 32)]
    compiled = {}
    if args.compile:  # an experiment: Inductor fuses the element-wise work around the matmuls
        if args.compile == "layers":  # papo's option: compiled decoder layers inside scoring and update
            trainer.policy.compile_layers = True
        else:
            text = trainer.policy.model.model.language_model
            for layer in text.layers:
                for module in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
                    module.compile(dynamic=True)
            text.norm.compile(dynamic=True)
        fn = update_fn(16, "full")
        fn()  # compiles
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(fn, device, args.repeats)
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
        what = ("transformer blocks (decoder layers, vision blocks) and the log-prob head" if args.compile == "layers"
                else "decoder MLPs and RMSNorms")
        # other response lengths: a compiled layer that specialised on the packing would recompile here
        fresh = experience(trainer, cap, seed=1)
        fresh_mb = MicroBatches(fresh, trainer.policy, micro, SEQUENCES, 16, 16)
        list(fresh_mb.update_passes(0))
        list(fresh_mb.scoring())
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.update(fresh, fresh_mb, logps, adv, 0.02, {})
        if device == "cuda":
            torch.cuda.synchronize()
        new_lengths_s = time.perf_counter() - t
        compiled = {"modules": what, "update_16_full_s": round(seconds, 3), "update_16_full_peak_gib": peak,
                    "first_update_on_new_lengths_s": round(new_lengths_s, 3),
                    "update_mfu": round(flops / seconds / PEAK_BF16_FLOPS, 4) if device == "cuda" else None,
                    "scoring": [score(16), score(32)], "uncheckpointed": []}
        for kept in (int(k) for k in args.uncheckpointed.split(",") if k):  # a layer keeping its activations: a new graph
            compiled["uncheckpointed"].append(measure_update({"uncheckpointed_layers": kept}, update_fn(16, "full", kept),
                                                             warm_up=True))
        set_checkpointing(trainer.policy.model, "full")
        print(json.dumps(compiled), flush=True)
    by_images = []
    for mode in (m for m in args.images.split(",") if m):  # the same tokens and pixels, shared or apart
        exp = experience(trainer, cap, shared=mode == "shared")
        encoded.clear()
        update = measure_update({"images": mode, "pass_size": 16, "checkpointing": "full"}, update_fn(16, "full"),
                                warm_up=True)
        by_images.append({**update, "scoring_16": score(16)})
    by_prompts, modes, configured = [], [m for m in args.prompts.split(",") if m], trainer.policy.share_prompts
    exp = experience(trainer, cap)
    encoded.clear()
    mb = next(batches(micro, 16).scoring()) if modes else None
    agreement = {}
    if modes:  # log-probs of the same weights (the timed updates below change them), against the padded forward's
        model = trainer.policy.model
        model.set_attn_implementation({"text_config": "sdpa"})
        with torch.no_grad():
            padded = trainer.policy.logprobs(mb.full, mb.ids, mb.mask)[0]
        model.set_attn_implementation({"text_config": PACKED_TEXT_ATTENTION})
        valid = mb.mask.bool().to(padded.device)
    for mode in modes:
        trainer.policy.share_prompts = mode == "shared"
        with torch.no_grad():
            differs = (trainer.policy.logprobs(mb.full, mb.ids, mb.mask)[0] - padded)[valid].abs()
        agreement[mode] = {"packed_tokens_of_a_pass_of_16": packed_tokens(trainer, mb),
                           "logprob_difference_to_padded": {"max": round(float(differs.max()), 5),
                                                            "mean": round(float(differs.mean()), 6)}}
    for mode in modes:  # the same sequences, a shared prompt packed once or each time
        trainer.policy.share_prompts = mode == "shared"
        update = measure_update({"prompts": mode, "pass_size": 16, "checkpointing": "full"}, update_fn(16, "full"),
                                warm_up=True)
        by_prompts.append({**update, "scoring_16": score(16), **agreement[mode]})
        print(json.dumps(by_prompts[-1]), flush=True)
    trainer.policy.share_prompts = configured
    result = {"model": model_dir if args.smoke else f"qwen2.5-vl-{args.size}", "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "sequences": SEQUENCES,
              "response_tokens": exp.mask.sum(-1).tolist(), "tokens": exp.tokens, "update_tflop": round(flops / 1e12, 1),
              "rows": rows, "scoring": scoring, **({"compiled": compiled} if compiled else {}),
              **({"images": by_images} if by_images else {}), **({"prompts": by_prompts} if by_prompts else {})}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        pass_size, mode = args.profile.split(":")
        fn = update_fn(int(pass_size), mode)
        fn()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        result["profile"] = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
        print(result["profile"], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
