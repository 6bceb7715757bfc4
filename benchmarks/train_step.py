"""Real ``papo train`` steps at the authors' settings on the Qwen2.5-VL-3B / -7B architectures, on one GPU or,
under torchrun, on several (FSDP2, one rollout engine per rank, the same global batch).

    python benchmarks/train_step.py --out benchmarks/results/train-step-h200.json --runs 3b:default,7b:lean
    torchrun --nproc-per-node 2 benchmarks/train_step.py --out /tmp/two.json --runs 3b:default
    torchrun --nproc-per-node 1 benchmarks/train_step.py --out /tmp/one.json --runs 3b:default  # sharded, one GPU
    python benchmarks/train_step.py --smoke --out /tmp/train-step.json     # the embedded model on the CPU

Each run writes a random-weight model directory (benchmarks/architectures.py: papo's tokenizer, so random
weights stop after about 400 tokens on average with a tail to the cap, close to real runs' shape), loads it
through papo's Trainer with the PAPO-G preset and the paper-scale settings below (fewer prompts per step), and
runs ``--steps`` training steps. The first ``--warmup-steps`` compile the engine for new batch shapes and are left
out of the averages.

Settings: n=5, T=1, top_p 0.99, top_k off, 2,048-token cap, PAPO's pixel bounds (200,704 to 1,003,520 pixels:
the synthetic 224-px images become 448x448, 256 image tokens), micro-batch 4 (16 for the no-grad scoring passes, as the
authors; update passes of 16 sequences that keep the authors' per-4 token mean), gradient checkpointing, lr 1e-6,
two optimizer updates per step. Precision: ``default`` = fp32 master weights with bf16 compute (papo's CUDA
default), ``lean`` = bf16 weights with Kahan-compensated AdamW (the authors' scheme).

Reported, as verl and EasyR1 count them:
  * tokens/s/GPU: prompt + response tokens of every sequence (image tokens included, padding not) over the
    step's wall time and the number of GPUs;
  * update MFU: model FLOPs of the update phase (one forward and backward per sequence; recomputation by
    gradient checkpointing not counted) over its time and the H200's dense bf16 peak (989.5 TFLOP/s). FLOPs =
    6 N_text per text token + 6 N_vision per image patch + attention (12 x layers x width x sequence^2 for the
    language model, the same per attention window of the vision tower); N_text leaves out the input embedding
    table (a lookup), and counts the LM head;
  * peak memory: torch's peak allocated bytes during a step.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import qwen25_vl_config  # noqa: E402

from papo.config.schema import load_config  # noqa: E402
from papo.training.distributed import DistContext, init_from_env  # noqa: E402
from papo.training.trainer import Trainer  # noqa: E402

PEAK_BF16_FLOPS = 989.5e12  # H100/H200 SXM dense bf16
PRECISIONS = {"default": ["model.param_dtype=float32", "model.compute_dtype=auto"],
              "lean": ["model.param_dtype=bfloat16", "model.compute_dtype=bfloat16"]}
PAPER = ["rollout.n=5", "rollout.temperature=1.0", "rollout.top_p=0.99", "rollout.top_k=0", "rollout.max_new_tokens=2048",
         "data.min_pixels=200704", "data.max_pixels=1003520", "trainer.micro_batch_size=4",
         "trainer.scoring_micro_batch_size=16", "trainer.update_micro_batch_size=16",
         "model.gradient_checkpointing=true", "optim.lr=1e-6"]
QUIET = ["trainer.eval_before_after=false", "trainer.report_to=none", "trainer.save_every=0", "trainer.log_samples_every=0"]
PHASES = ("rollout_s", "old_logp_s", "masked_logp_s", "noised_logp_s", "ref_logp_s", "update_s", "encode_s")


QWEN25_VL_PIXELS = (3136, 12845056)  # the released Qwen2.5-VL image processor's own min / max pixels


def ensure_model(size: str, folder: Path, ctx) -> Path:
    """The random-weight model directory, written once by the main rank (the others wait: none may look for it
    while it is half written). Its processor is papo's tokenizer with the released Qwen2.5-VL image processor's
    pixel bounds (the tiny models' own cap of 224 x 224 would shrink PAPO's 448 x 448 images to 64 tokens)."""
    from transformers import AutoModelForImageTextToText

    from papo.models.loading import set_pixel_bounds
    from papo.models.tiny import build_processor

    if ctx.is_main and not (folder / ".complete-v2").exists():  # a run killed mid-write leaves no marker
        t = time.time()
        processor = build_processor()
        set_pixel_bounds(processor, *QWEN25_VL_PIXELS)
        torch.manual_seed(0)  # the same random weights in every run of a size
        with torch.device("cuda"):
            model = AutoModelForImageTextToText.from_config(qwen25_vl_config(size, processor.tokenizer), dtype=torch.bfloat16)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / ".complete-v2").touch()
        del model
        torch.cuda.empty_cache()
        print(f"wrote random-weight qwen2.5-vl-{size} to {folder} in {time.time() - t:.0f} s", flush=True)
    ctx.barrier()
    return folder


def paper_trainer(size: str, models_dir: str, smoke: bool, name: str, smoke_settings: list[str],
                  extra: list[str] = ()) -> tuple[Trainer, str, str]:
    """A one-process PAPO-G Trainer for the micro-benchmarks: the random-weight ``size`` model with the PAPER
    settings and the default precision on CUDA, or (``smoke``) the embedded model with ``smoke_settings`` on
    the CPU. Returns (trainer, device, model directory)."""
    device = "cpu" if smoke else "cuda"
    ctx = DistContext(device=device)
    if smoke:
        model_dir, settings = "default", smoke_settings
    else:
        model_dir, settings = str(ensure_model(size, Path(models_dir) / f"qwen2.5-vl-{size}", ctx)), PAPER
    cfg = load_config("papo_g", overrides=[*settings, f"model.name={model_dir}", *PRECISIONS["default"], *QUIET, *extra])
    return Trainer(cfg, Path(tempfile.gettempdir()) / f"papo-{name}", device, ctx=ctx), device, model_dir


def sampleable_ids(policy) -> torch.Tensor:
    """Vocabulary ids the policy may sample (its suppressed ids left out): random responses drawn from these."""
    allowed = torch.ones(policy.model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    allowed[policy.suppress.cpu()] = False
    return allowed.nonzero().squeeze(-1)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, read + write bytes per second."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    del x, y
    torch.cuda.empty_cache()
    return 2 * (2 << 30) * 10 / seconds


def byte_costs(model) -> tuple[float, float]:
    """(bytes of weights one decode step of ``model`` reads, KV-cache bytes per cached token), in its dtype."""
    text, cfg = model.model.language_model, model.config.get_text_config()
    weights = sum(p.numel() * p.element_size() for p in text.layers.parameters())
    weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * len(text.layers) * cfg.num_key_value_heads * head_dim * model.lm_head.weight.element_size()
    return weights, per_token


def decode_bound_s(prompt_tokens: torch.Tensor, lengths: torch.Tensor, weights: float, per_token: float,
                   bandwidth: float) -> float:
    """Seconds an ideal engine needs for the decode steps of these rows (the first token comes from the prefill)."""
    steps = torch.arange(1, int(lengths.max()))
    running = lengths[None] > steps[:, None]  # (steps, rows): step t feeds token t of the rows still going
    kv = (running * (prompt_tokens[None] + steps[:, None])).sum()
    return float(len(steps) * weights + float(kv) * per_token) / bandwidth


def parameter_counts(model) -> tuple[int, int, int]:
    """(language model without the input embedding, LM head included; vision tower; all)."""
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    tied = model.lm_head.weight is embed
    return total - vision - (0 if tied else embed.numel()), vision, total


def image_patches(trainer: Trainer, exp) -> list[int]:
    """Vision-tower patches of each sequence's images, as the processor grids them."""
    cache: dict[tuple, int] = {}
    out = []
    for sample, images in zip(exp.samples, exp.images):
        key = tuple(im.size for im in images)
        if key not in cache:
            batch = trainer.policy.encode([sample.formatted_prompt()], [images])
            grid = batch.inputs.get("image_grid_thw")
            cache[key] = int(grid.prod(-1).sum()) if grid is not None else 0
        out.append(cache[key])
    return out


def update_flops(trainer: Trainer, exp) -> float:
    model = trainer.policy.model
    n_text, n_vision, _ = parameter_counts(model)
    text, vision = model.config.get_text_config(), model.config.vision_config
    lengths = (exp.prompt_tokens + exp.mask.sum(-1)).double()
    flops = 6 * n_text * float(lengths.sum()) + 12 * text.num_hidden_layers * text.hidden_size * float((lengths**2).sum())
    patches = image_patches(trainer, exp)
    flops += 6 * n_vision * sum(patches)
    window = (vision.window_size // vision.patch_size) ** 2  # patches per attention window
    full = len(vision.fullatt_block_indexes)
    for p in patches:  # full-attention blocks see the whole image, the others windows of `window` patches
        flops += 12 * vision.hidden_size * (full * p**2 + (vision.depth - full) * p * min(p, window))
    return flops


def profiled(score, into: dict):
    """``score`` (the trainer's scoring phase) under torch's profiler: its wall time, the GPU's busy time within
    it (kernel time summed; the rest the GPU idled) and the top operators by GPU time, written into ``into``."""
    from torch.profiler import ProfilerActivity, profile

    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        t = time.time()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = score(*args, **kwargs)
            torch.cuda.synchronize()
        wall = time.time() - t
        events = prof.key_averages()
        kernels = sum(getattr(e, "self_device_time_total", 0) for e in events  # "Command Buffer Full" is a host stall
                      if e.device_type == torch.autograd.DeviceType.CUDA and "Command Buffer" not in e.key)
        into.update(wall_s=round(wall, 3), gpu_busy_s=round(kernels / 1e6, 3),
                    top=events.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
        return out

    return wrapper


def run(name: str, model_dir: str, precision: str, prompts: int, steps: int, device: str, extra: list[str],
        ctx, warmup: int = 1, preset: str = "papo_g", profile_scoring: dict | None = None) -> dict:
    overrides = [f"model.name={model_dir}", f"trainer.rollout_batch_size={prompts}",
                 f"trainer.mini_batch_size={max(1, prompts // 2)}", *PRECISIONS[precision], *QUIET, *extra]
    cfg = load_config(preset, overrides=([] if device == "cpu" else PAPER) + overrides)
    out = Path(tempfile.gettempdir()) / "papo-train-step" / f"{name}-{precision}"
    torch.manual_seed(0)
    t0 = time.time()
    trainer = Trainer(cfg, out, device, ctx=ctx)
    load_s = time.time() - t0
    rows = []
    bandwidth = copy_bandwidth() if device.startswith("cuda") else 0.0
    for i in range(steps):
        if profile_scoring is not None and i == steps - 1:
            trainer.score_experience = profiled(trainer.score_experience, profile_scoring)
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if device.startswith("cuda") else 0
        row = trainer.step()
        if device.startswith("cuda"):  # cudaMalloc retries: the allocator freed its cache to fit (memory pressure)
            row["alloc_retries"] = int(ctx.max(torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries)[0])
        exp = trainer.last_experience
        lengths = exp.mask.sum(-1)
        row["update_tflop"] = round(ctx.sum(update_flops(trainer, exp))[0] / 1e12, 1)  # every rank's sequences
        if "update_s" in row:  # a skipped step (non-finite inputs) has no update phase
            row["update_mfu"] = round(row["update_tflop"] * 1e12 / row["update_s"] / PEAK_BF16_FLOPS / ctx.world_size, 4)
        engine = trainer.sampler._engine if trainer.sampler.uses_engine else None
        if engine is not None and engine.last_timing:  # this rank's rollout: prefill, decode, graph captures
            timing = dict(engine.last_timing)
            if bandwidth and timing["rows"] == exp.size:  # one generate call made this step's sequences (not DAPO's rounds)
                timing["decode_bound_s"] = decode_bound_s(exp.prompt_tokens, lengths, *byte_costs(engine.model), bandwidth)
                timing["decode_of_bound"] = timing["decode_bound_s"] / timing["decode_s"]
            row["rollout_engine"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()}
        row["sequences"] = int(ctx.sum(exp.size)[0])
        row["max_response_tokens"] = int(ctx.max(int(lengths.max()))[0])
        rows.append(row)
        if ctx.is_main:
            print(json.dumps({k: row[k] for k in ("step", "step_s", "tokens", "tokens_per_s", "response_length",
                                                  "max_response_tokens", "update_mfu", *PHASES, "gpu_peak_gib",
                                                  "alloc_retries", "skipped", "rollout_engine") if k in row}),
                  flush=True)
    steady = rows[warmup:] or rows  # the first steps compile the engine for new batch shapes

    def mean(key):
        values = [r[key] for r in steady if key in r]
        return round(sum(values) / len(values), 3) if values else None

    step_s = mean("step_s")
    tokens = sum(r["tokens"] for r in steady) / len(steady)
    _, _, total = parameter_counts(trainer.policy.model)
    result = {
        "model": name, "preset": preset, "gpus": ctx.world_size, "precision": precision, "precision_detail": trainer.precision.describe()
        + (", Kahan-compensated AdamW" if type(trainer.optim).__module__.startswith("optimi") else ", AdamW"),
        "parameters": total, "prompts_per_step": prompts, "sequences_per_step": steady[-1]["sequences"],
        "tokens_per_s_per_gpu": round(tokens / step_s / ctx.world_size, 1), "step_s": step_s,
        "update_mfu": mean("update_mfu"), "phases": {k: mean(k) for k in PHASES if mean(k) is not None},
        "peak_gib": max((r.get("gpu_peak_gib", 0.0) for r in rows), default=None),
        "mean_tokens_per_step": round(tokens, 1), "mean_response_tokens": mean("response_length"),
        "load_s": round(load_s, 1), "warmup_steps_s": [r["step_s"] for r in rows[:warmup]], "steps_averaged": len(steady),
        "steps": rows,
    }
    del trainer
    gc.collect()  # a profiled run's wrapper holds the trainer in a reference cycle: free its GPU memory now
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="3b:default,7b:lean", help="size:precision pairs (precision: default | lean)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup-steps", type=int, default=1, help="steps left out of the averages (compilation)")
    ap.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "papo-bench-models"))
    ap.add_argument("--presets", default="papo_g", help="comma-separated presets, each run with every size:precision")
    ap.add_argument("--label", default="", help="stored with each run (e.g. which code it measured)")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:key=value[,key=value...]: each size and preset runs once per variant, with its overrides "
                         "(e.g. --variant eager:model.compile_layers=false --variant compiled:model.compile_layers=true)")
    ap.add_argument("--smoke", action="store_true", help="the embedded model on the CPU, tiny settings (checks the script)")
    ap.add_argument("--profile-scoring", action="store_true", help="profile the last step's scoring phase (CUDA)")
    args = ap.parse_args()
    ctx, device = init_from_env("cpu" if args.smoke else "cuda")
    results: list[dict] = []
    meta = {"torch": torch.__version__, **({"label": args.label} if args.label else {})}
    variants = [(name, overrides.split(",")) for name, _, overrides in (v.partition(":") for v in args.variant)] or [("", [])]
    if args.smoke:
        extra = ["rollout.n=2", "rollout.max_new_tokens=12", "trainer.micro_batch_size=4", *args.set]
        for preset, (variant, overrides) in ((p, v) for p in args.presets.split(",") for v in variants):
            results.append(run("embedded-default", "default", "default", 2 * ctx.world_size, 2, device,
                               [*extra, *overrides], ctx, preset=preset))
            results[-1].update({"variant": variant, "overrides": overrides} if variant else {})
    else:
        import transformers

        meta.update(device=torch.cuda.get_device_name(), transformers=transformers.__version__, settings=PAPER)
        for spec, preset, (variant, overrides) in ((spec, preset, v) for spec in args.runs.split(",")
                                                   for preset in args.presets.split(",") for v in variants):
            size, precision = spec.split(":")
            folder = Path(args.models_dir) / f"qwen2.5-vl-{size}"
            ensure_model(size, folder, ctx)
            profile: dict | None = {} if args.profile_scoring else None
            try:
                results.append(run(f"qwen2.5-vl-{size}", str(folder), precision, args.prompts, args.steps, device,
                                   [*args.set, *overrides], ctx, args.warmup_steps, preset, profile))
            except Exception as err:  # one run failing (a config a preset refuses, a crash) keeps the others' results
                traceback.print_exc()
                results.append({"model": f"qwen2.5-vl-{size}", "preset": preset, "precision": precision,
                                "error": f"{type(err).__name__}: {str(err)[:500]}"})
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                profile = None
            results[-1].update({"variant": variant, "overrides": overrides} if variant else {})
            if profile is not None:
                results[-1]["scoring_profile"] = profile
                if ctx.is_main:
                    print(f"scoring phase: {profile['wall_s']} s wall, GPU busy {profile['gpu_busy_s']} s\n{profile['top']}", flush=True)
            if ctx.is_main:
                Path(args.out).write_text(json.dumps({**meta, "runs": results}, indent=1))
    if not ctx.is_main:
        return
    Path(args.out).write_text(json.dumps({**meta, "runs": results}, indent=1))
    for r in results:
        if "error" in r:
            print(f"{r['model']} {r['preset']} {r['precision']}: failed, {r['error']}")
            continue
        print(f"{r['model']} {r['preset']}{' ' + r['variant'] if r.get('variant') else ''} {r['precision_detail']}: "
              f"{r['step_s']} s/step, {r['tokens_per_s_per_gpu']} tokens/s/GPU, "
              f"update MFU {r['update_mfu']}, peak {r['peak_gib']} GiB, phases {r['phases']}")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
