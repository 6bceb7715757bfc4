"""``papo sft``: supervised warm-start on the synthetic suite's reasoning traces.

RL from a random init has nothing to reinforce (a random policy never produces the answer format), so the
embedded default is first taught the format and some perception by imitation: cross-entropy on the tokens
of ``<think>seen: ...</think> \\boxed{answer}`` given the image and question. Run it short enough that
sampled accuracy stays between 0 and 1 on most families, leaving room for RL.

``masked_share`` / ``blank_share``: that share of training samples shows PAPO's masked image (``mask_ratio``
of 14x14 cells black) or a black image, with the same target text. A model that has never seen a masked image
answers one with incoherent text, so its KL between full and masked views is large for reasons unrelated to
perception; trained on such views, it answers from the question and what remains visible, as a model
pretrained on varied images would (the starting point the paper's KL_prcp figures assume).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from papo.data.loaders import load_samples
from papo.data.masking import MaskingConfig, blacken, corrupt_images, mask_rng
from papo.data.synthetic import SPEC_PREFIX, dataset_from_spec
from papo.errors import TrainingStopped, UserError
from papo.jsonl import json_safe
from papo.models.inputs import encode_prompts, to_device, tokenize_completions
from papo.models.loading import resolve_device
from papo.models.policy import Policy
from papo.models.precision import Precision, dtype_of
from papo.models.tiny import SIZES, build_tiny
from papo.rollout.graded import generate_and_score, summarize, summary_table
from papo.rollout.sampler import Sampler
from papo.rollout.sampling import SamplingParams


@dataclass
class SFTConfig:
    out: str
    model: str = "tiny"  # a tiny size (random init: tiny, small, 20m, 100m) or a model dir / hub id
    data: str = "synthetic:all"  # samples carrying meta["solution"]
    image_size: int = 224  # synthetic image side
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    eval_per_task: int = 50  # held-out (test split) samples per family
    eval_k: int = 4  # sampled responses per held-out sample at temperature 1
    max_new_tokens: int = 64
    # the held-out checks' rollout engine through torch.compile on CUDA; False: eager, no compile on first use
    # (a few small checks may not repay it, docs/models.md)
    eval_compile: bool = True
    device: str = "auto"
    log_every: int = 10
    workers: int = int(os.environ.get("PAPO_SFT_WORKERS", -1))  # data-loading processes; -1: one per spare core, up to 8
    save_steps: tuple[int, ...] = ()  # also write DIR/step-N (with a held-out check) at these steps
    masked_share: float = 0.0  # share of training samples shown PAPO's masked image (same target text)
    blank_share: float = 0.0  # share shown a black image
    mask_ratio: float = 0.6  # black-cell probability of those masked images (PAPO's 0.6)
    compute_dtype: str = "auto"  # matmuls under autocast: auto = bfloat16 on CUDA (fp32 weights), fp32 elsewhere
    max_bad_steps: int = 10  # stop after this many updates in a row skipped for a non-finite gradient
    # end at the first save_steps check where every named family's held-out sampled accuracy reaches its value;
    # that checkpoint is the final model (the learning-rate schedule stays the one planned for `steps`)
    stop_at: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_k", "max_new_tokens", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"sft {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"sft lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise UserError(f"sft warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.compute_dtype != "auto":
            try:
                dtype_of(self.compute_dtype)
            except ValueError as err:
                raise UserError(f"sft compute_dtype: {err}") from None
        if not (self.masked_share >= 0 and self.blank_share >= 0 and self.masked_share + self.blank_share <= 1):  # NaN too
            raise UserError(f"sft masked_share and blank_share must be >= 0 with a sum <= 1, got "
                            f"{self.masked_share} and {self.blank_share}")
        if not 0 < self.mask_ratio <= 1:
            raise UserError(f"sft mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.stop_at and not (self.save_steps and self.eval_per_task > 0):
            raise UserError("sft stop_at acts at the held-out checks of save_steps: give save_steps and eval_per_task > 0")


def _train_samples(cfg: SFTConfig):
    n = cfg.steps * cfg.batch_size
    if cfg.data.startswith(SPEC_PREFIX):
        return dataset_from_spec(cfg.data, split="train", n=n, seed=cfg.seed, size=cfg.image_size)
    samples = load_samples(cfg.data, split="train").samples
    missing = [s.id for s in samples if not s.meta.get("solution")]
    if missing:
        raise UserError(f"{cfg.data}: SFT needs a 'solution' per row (meta['solution']); missing in {missing[:5]}")
    return samples


def image_view(cfg: SFTConfig, position: int) -> str:
    """Which view of its image the ``position``-th training sample shows: a draw keyed by (seed, position)."""
    u = mask_rng(cfg.seed, "sft-view", position).random()
    return "masked" if u < cfg.masked_share else "blank" if u < cfg.masked_share + cfg.blank_share else "full"


def view_images(cfg: SFTConfig, sample, position: int) -> list:
    images = sample.load_images(None, None)
    view = image_view(cfg, position)
    if view == "masked":
        return corrupt_images(images, MaskingConfig(ratio=cfg.mask_ratio), cfg.seed, sample.id, draw=position)
    return [blacken(im) for im in images] if view == "blank" else images


class _Batches(torch.utils.data.Dataset):
    """Step i's encoded batch, built in DataLoader workers: the image processor is the CPU bottleneck."""

    def __init__(self, samples, processor, cfg: SFTConfig, eos_id: int, pad_id: int):
        self.samples, self.processor, self.cfg = samples, processor, cfg
        self.batch_size, self.steps, self.eos_id, self.pad_id = cfg.batch_size, cfg.steps, eos_id, pad_id

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        batch = [self.samples[p % len(self.samples)] for p in positions]
        images = [view_images(self.cfg, s, p) for s, p in zip(batch, positions)]
        prompts = encode_prompts(self.processor, [s.formatted_prompt() for s in batch], images)
        ids, mask = tokenize_completions(self.processor.tokenizer, [s.meta["solution"] for s in batch], self.eos_id, self.pad_id)
        return prompts, ids, mask


def _one_thread(_: int) -> None:
    # each loader process is one core's worth of work; torch's default of one thread per core in every
    # process oversubscribes the machine many times over
    torch.set_num_threads(1)


def _workers(requested: int) -> int:
    if requested >= 0:
        return requested
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _heldout(cfg: SFTConfig, tasks: list[str]):
    """The test split of the trained families, with the training spec's knobs (``explain=1`` traces, say; the
    ``shortcut`` knob leaves the test split alone)."""
    knobs = [(k, v) for k, v in parse_qsl(cfg.data.partition("?")[2]) if k not in ("split", "n", "seed")]
    spec = f"{SPEC_PREFIX}{'+'.join(tasks)}" + (f"?{urlencode(knobs)}" if knobs else "")
    return list(dataset_from_spec(spec, split="test", n=cfg.eval_per_task * len(tasks), seed=cfg.seed, size=cfg.image_size))


def _lr_lambda(cfg: SFTConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def heldout_report(policy: Policy, samples, cfg: SFTConfig) -> dict:
    sampler = Sampler(policy, compile=cfg.eval_compile)  # one engine (and its compiled graphs) for both passes
    sampled = summarize(generate_and_score(sampler, samples, SamplingParams(cfg.max_new_tokens, temperature=1.0), k=cfg.eval_k), cfg.eval_k)
    greedy = summarize(generate_and_score(sampler, samples, SamplingParams(cfg.max_new_tokens, greedy=True), k=1), 1)
    return {"sampled_t1": sampled.to_dict(), "greedy": greedy.to_dict()}


def run_sft(cfg: SFTConfig, console: Console | None = None) -> dict:
    console = console or Console()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    compute = Precision.resolve("float32", cfg.compute_dtype, device).compute_dtype
    if cfg.model in SIZES:
        model, processor = build_tiny(cfg.model, seed=cfg.seed)
        policy = Policy(model.to(device), processor, compute_dtype=compute)
    else:
        policy = Policy.from_pretrained(cfg.model, device=device, compute_dtype=compute)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    train = _train_samples(cfg)
    tasks = sorted({train[i].task for i in range(min(len(train), 64))} - {""}) if cfg.data.startswith(SPEC_PREFIX) else []
    n_params = sum(p.numel() for p in policy.model.parameters())
    console.print(f"SFT of {cfg.model} ({n_params / 1e6:.2f}M parameters, {policy.precision.describe()}) on {cfg.data} "
                  f"for {cfg.steps} steps x {cfg.batch_size}, {device}")
    if unknown := sorted(set(cfg.stop_at) - set(tasks)):
        raise UserError(f"sft stop_at names {', '.join(unknown)}, which the held-out checks do not cover "
                        f"(families of {cfg.data}: {', '.join(tasks) or 'none'})")

    # fused: it can skip an update on a device-side flag (found_inf below), so a non-finite gradient never
    # reaches the weights and the loop still does not wait for the GPU each step
    optim = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay,
                              fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(cfg))
    policy.model.train()
    history, t0, tokens = [], time.time(), 0
    columns = [TextColumn("sft"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn()]
    with (out / "sft_metrics.jsonl").open("w") as log, Progress(*columns, console=console) as progress:
        bar = progress.add_task("sft", total=cfg.steps, loss=float("nan"))
        batches = _Batches(train, policy.processor, cfg, policy.eos_ids[0], policy.pad_id)
        workers = _workers(cfg.workers)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers,
                                             prefetch_factor=4 if workers else None, worker_init_fn=_one_thread)
        pending = []  # (step, loss, grad norm, lr) not yet read back: the GPU is waited for once per log_every steps
        batches_iter, waited = iter(loader), 0.0
        skipped = in_a_row = 0  # updates dropped for a non-finite gradient: in all, and the current run of them
        steps_done, stop_report = cfg.steps, None
        for step in range(cfg.steps):
            t_wait = time.perf_counter()
            prompts, ids, mask = next(batches_iter)
            waited += time.perf_counter() - t_wait  # the main process idle for data: the loader is the bottleneck
            logp, _ = policy.logprobs(prompts, ids, mask)
            weight = to_device(mask, logp.device).to(logp.dtype)  # pinned: a pageable copy would wait for the GPU
            loss = -(logp * weight).sum() / weight.sum()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.model.parameters(), cfg.grad_clip)
            optim.found_inf = (~torch.isfinite(grad_norm)).float()  # fused AdamW's skip flag (GradScaler's protocol)
            optim.step()
            sched.step()
            tokens += int(mask.sum())  # a host tensor: no wait
            pending.append((step + 1, loss.detach(), grad_norm.detach(), sched.get_last_lr()[0]))
            progress.update(bar, advance=1)
            logged = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
            if logged or step + 1 in cfg.save_steps:
                values = torch.stack([torch.stack((l, g.to(l))) for _, l, g, _ in pending]).tolist()
                for (at, *_, lr), (l, g) in zip(pending, values):
                    history.append({"step": at, "loss": l, "grad_norm": g, "lr": lr})
                    in_a_row = 0 if math.isfinite(g) else in_a_row + 1
                    skipped += in_a_row > 0
                    if in_a_row >= cfg.max_bad_steps:
                        raise TrainingStopped(
                            f"sft: {in_a_row} steps in a row, up to step {at}, had a non-finite gradient and were "
                            f"skipped (lr {lr:.3g}): the run diverged; lower --lr or raise --warmup-steps. "
                            f"Checkpoints written so far in {out} are untouched.")
                pending.clear()
                elapsed = time.time() - t0
                history[-1].update(elapsed_s=round(elapsed, 2), target_tokens_per_s=round(tokens / elapsed, 1),
                                   data_wait_share=round(waited / elapsed, 3), skipped_steps=skipped)
                progress.update(bar, loss=history[-1]["loss"])
                if logged:
                    log.write(json.dumps(json_safe(history[-1])) + "\n")
                    log.flush()
            if step + 1 in cfg.save_steps and step + 1 != cfg.steps:
                report = _checkpoint(policy, cfg, out / f"step-{step + 1}", tasks, console)
                accuracy = report["sampled_t1"]["per_task"] if report else {}
                if cfg.stop_at and all(accuracy.get(t, 0.0) >= v for t, v in cfg.stop_at.items()):
                    console.print(f"step {step + 1}: held-out accuracy reached stop_at {cfg.stop_at}; stopping here")
                    steps_done, stop_report = step + 1, report
                    break

    policy.model.eval()
    policy.save(out)
    _plot_loss(history, out / "sft_loss.png")
    result = {"steps": steps_done, "final_loss": history[-1]["loss"], "train_seconds": round(time.time() - t0, 1),
              "skipped_steps": skipped}
    if stop_report:  # the final model is that checkpoint's, already checked
        result.update(stopped_early=True, heldout=stop_report)
    elif tasks and cfg.eval_per_task > 0:
        console.print(f"held-out check: {cfg.eval_per_task} test samples per family, k={cfg.eval_k} at T=1, and greedy")
        result["heldout"] = heldout_report(policy, _heldout(cfg, tasks), cfg)
    if "heldout" in result:
        console.print(summary_table("held-out accuracy (test split)", {"sampled T=1 (avg@k)": result["heldout"]["sampled_t1"],
                                                                        "greedy": result["heldout"]["greedy"]}))
    (out / "sft_result.json").write_text(json.dumps(result, indent=1))
    console.print(f"wrote the model and sft_metrics.jsonl, sft_loss.png, sft_result.json to {out}")
    return result


def _checkpoint(policy: Policy, cfg: SFTConfig, path: Path, tasks: list[str], console: Console) -> dict | None:
    """The model at this step in ``path``, with its held-out check (returned; None without one)."""
    policy.model.eval()
    policy.save(path)
    report = None
    if tasks and cfg.eval_per_task > 0:
        report = heldout_report(policy, _heldout(cfg, tasks), cfg)
        (path / "sft_result.json").write_text(json.dumps({"heldout": report}, indent=1))
        console.print(f"{path.name}: held-out sampled {report['sampled_t1']['per_task']}")
    policy.model.train()
    return report


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
    ax.set(xlabel="step", ylabel="token cross-entropy", yscale="log", title="papo sft")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
