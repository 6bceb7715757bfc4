"""The ``papo train`` run: outputs, logging, checkpoints, resume, validation and the before/after table."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from papo.config.schema import ConfigError, TrainConfig, load_config
from papo.data.loaders import load_samples
from papo.data.synthetic import SPEC_PREFIX
from papo.errors import TrainingStopped, UserError
from papo.jsonl import json_safe, read_records, write_records
from papo.models.loading import resolve_device
from papo.rollout.graded import generate_and_score, paired_change, summarize_scores, summary_table
from papo.rollout.sampling import SamplingParams
from papo.training.checkpoint import latest_checkpoint
from papo.training.distributed import DistContext, init_from_env
from papo.training.faults import failpoint
from papo.training.report import write_report
from papo.training.stop_signal import Interrupted, StopOnSignal
from papo.training.trainer import Trainer


def _heldout(trainer: Trainer, spec: str, k: int) -> dict[str, Any]:
    """avg@k on a held-out set. Each rank grades its share of the samples, with sampling noise keyed by sample
    index, so the result is the same at any number of processes."""
    samples = load_samples(spec, split=None if spec.startswith(SPEC_PREFIX) else "test").samples
    params = SamplingParams(trainer.cfg.rollout.max_new_tokens, trainer.cfg.rollout.temperature)
    share, first, real = trainer.ctx.padded_share(samples)
    results = generate_and_score(trainer.sampler, share, params, k=k, noise_seed=trainer.cfg.trainer.seed,
                                 first_index=first)[:real]
    graded = [x for part in trainer.ctx.gather([(r.sample.task, r.accuracy, r.format_rate) for r in results]) for x in part]
    tasks, accuracies, format_rates = zip(*graded) if graded else ((), (), ())
    return summarize_scores(tasks, accuracies, format_rates, k).to_dict()


class Loggers:
    def __init__(self, out: Path, report_to: list[str], config: dict[str, Any]) -> None:
        self.tb = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise UserError("trainer.report_to includes wandb but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project="papo", config=config, dir=str(out))

    def log(self, row: dict[str, Any]) -> None:
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _log_samples(trainer: Trainer, out: Path, step: int) -> None:
    """A few rollouts of this step with their full and masked images."""
    exp = trainer.last_experience
    folder = out / "samples"
    folder.mkdir(exist_ok=True)
    exp.images[0][0].save(folder / f"step-{step}-image.png")
    exp.masked_images[0][0].save(folder / f"step-{step}-masked.png")
    with (folder / "rollouts.jsonl").open("a") as f:
        for i in range(min(trainer.cfg.rollout.n, exp.size)):
            f.write(json.dumps({"step": step, "id": exp.samples[i].id, "prompt": exp.samples[i].prompt,
                                "answer": exp.samples[i].answer, "response": exp.texts[i],
                                "reward": exp.scores[i]["overall"], "image": f"step-{step}-image.png"}) + "\n")


def _out_of_time(started: float, next_step_s: float, limit_s: float, ctx: DistContext) -> bool:
    """Whether a next step of ``next_step_s`` would end past ``limit_s`` seconds after ``started`` (0: no
    limit). Every rank decides together: their clocks differ, and a sharded checkpoint needs all at one step."""
    return bool(limit_s) and ctx.any(time.monotonic() - started + next_step_s > limit_s)


def run_train(cfg: TrainConfig, out: str, resume: bool = False, console: Console | None = None, train_data: Any = None,
              reward: Any = None, ctx: DistContext | None = None) -> dict[str, Any]:
    """``train_data`` / ``reward``: Python objects in place of ``cfg.data.train`` / ``cfg.algorithm.reward``.
    ``ctx``: the distributed context; every rank runs this loop, the main rank alone writes."""
    started = time.monotonic()  # trainer.max_time_s counts from here, model loading included
    console = console or Console()
    out_dir = Path(out)
    torch.manual_seed(cfg.trainer.seed)
    device = resolve_device(cfg.trainer.device)
    if ctx is None:  # under torchrun: join the process group (one process: a context of one)
        ctx, device = init_from_env(device)
    trainer = Trainer(cfg, out_dir, device, train_data=train_data, reward=reward, ctx=ctx)
    main = trainer.ctx.is_main  # only the main rank prints and writes files
    if not main:
        console = Console(quiet=True)
    rows: list[dict[str, Any]] = []
    before = None
    if resume:
        if ckpt := resume_point(out_dir):
            trainer.restore(ckpt)
            console.print(f"resumed from {ckpt} at step {trainer.step_no}")
        else:  # stopped before its first checkpoint: start over in the same directory
            console.print(f"{out_dir} has no checkpoint yet; starting it from step 0")
        rows = read_metrics(out_dir / "metrics.jsonl", up_to=trainer.step_no)
        if main:  # drop steps logged after the checkpoint (and a line cut short by a crash): each step logged once
            write_records(out_dir / "metrics.jsonl", rows)
        before = _read_json(out_dir / "heldout_before.json")
        if cfg.trainer.max_time_s:  # kept in config.yaml from the run's start unless set again
            console.print(f"trainer.max_time_s={cfg.trainer.max_time_s:g} holds for this invocation too "
                          "(--set trainer.max_time_s=0 lifts it)")
        if trainer.step_no >= cfg.trainer.max_steps and (out_dir / "final").is_dir():
            console.print(f"{out_dir} already trained {trainer.step_no} steps (trainer.max_steps={cfg.trainer.max_steps}); "
                          f"pass --max-steps N with N > {trainer.step_no} to extend it")
            return {"before": before, "after": _read_json(out_dir / "heldout_after.json"), "steps": trainer.step_no, "warnings": []}
    else:
        if out_dir.exists() and (out_dir / "metrics.jsonl").exists():
            raise UserError(f"{out_dir} already holds a run; pass --resume {out_dir} or choose another --out")
        if main:
            write_config(cfg, out_dir)
    trainer.ctx.barrier()  # every rank has checked the directory before the main rank writes to it
    t = cfg.trainer
    if before is None and t.eval_before_after:
        console.print(f"held-out check before training ({cfg.data.test}, k={t.eval_k})")
        before = _heldout(trainer, cfg.data.test, t.eval_k)
        if main:
            (out_dir / "heldout_before.json").write_text(json.dumps(before, indent=1))
    loggers = Loggers(out_dir, [r for r in t.report_to if r != "none" and main], cfg.to_dict())
    warnings: list[str] = []
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
               TextColumn("reward {task.fields[reward]:.3f} acc {task.fields[acc]:.3f} kl_prcp {task.fields[kl]:.4f} {task.fields[sec]:.1f}s/step"),
               TimeElapsedColumn()]
    last_good = None
    # what the next step is expected to take: the longest of the last 3 (saves and logging included; DAPO's steps
    # vary with their filter rounds), from the logged steps until this process has timed its own
    recent_s = [r["step_s"] for r in rows[-3:] if isinstance(r.get("step_s"), (int, float))]
    saved_at = trainer.step_no  # the step of the newest checkpoint (0: none, and nothing trained to save)
    plain_every = max(1, t.max_steps // 20)
    metrics_path = out_dir / "metrics.jsonl" if main else Path(os.devnull)
    with metrics_path.open("a") as log, Progress(*columns, console=console) as progress, StopOnSignal() as stop:
        bar = progress.add_task("train", total=t.max_steps, completed=trainer.step_no, reward=0.0, acc=0.0, kl=0.0, sec=0.0)
        while trainer.step_no < t.max_steps:
            if signum := stop.requested(trainer.ctx):  # asked between steps: the last step is whole, and saved now
                if trainer.step_no > saved_at:
                    trainer.save()
                loggers.close()
                saved = f"saved checkpoints/step-{trainer.step_no}" if trainer.step_no else "nothing trained yet"
                raise Interrupted(f"{signal.Signals(signum).name} received; stopped after step {trainer.step_no} of "
                                  f"{t.max_steps} ({saved}); continue with papo train --resume {out_dir}", signum)
            if _out_of_time(started, max(recent_s, default=0.0), t.max_time_s, trainer.ctx):
                warnings.append(f"trainer.max_time_s={t.max_time_s:g} ended training after step {trainer.step_no} of "
                                f"{t.max_steps}; continue with papo train --resume {out_dir}")
                console.print(f"[yellow]{warnings[-1]}")
                if trainer.step_no > saved_at:  # the resume point
                    trainer.save()
                break
            step_started = time.monotonic()
            row = trainer.step()
            step = row["step"]
            if t.val_every and step % t.val_every == 0:
                row["val_accuracy"] = _heldout(trainer, cfg.data.val, t.val_k)["avg_at_k"]
            if row.get("skipped"):
                console.print(f"[yellow]step {step}: update skipped: {row['skipped']}")
            elif not is_finite_row(row):
                console.print(f"[yellow]step {step}: non-finite metrics {row}")
            failpoint("metrics")
            log.write(json.dumps(json_safe(row)) + "\n")
            log.flush()
            loggers.log(row)
            rows.append(row)
            if main and t.log_samples_every and step % t.log_samples_every == 0:
                _log_samples(trainer, out_dir, step)
            progress.update(bar, completed=step, reward=row["reward"], acc=row["accuracy"], kl=row.get("kl_prcp", 0.0), sec=row["step_s"])
            if not console.is_terminal and (step == 1 or step % plain_every == 0 or step == t.max_steps):
                # logs, nohup and notebooks get no live bar: a plain line instead, a few times per run
                console.print(f"step {step}/{t.max_steps}: reward {row['reward']:.3f} accuracy {row['accuracy']:.3f} "
                              f"kl_prcp {row.get('kl_prcp', 0.0):.4f} {row['step_s']:.1f} s/step", soft_wrap=True)
            if row["hacking_warning"]:
                warnings.append(f"step {step}: {row['hacking_warning']}")
                console.print(f"[red]step {step}: {row['hacking_warning']}")
                if t.stop_on_hacking:
                    if last_good:
                        trainer.restore(last_good)
                        warnings.append(f"stopped; weights rolled back to {last_good.name}")
                    break
            elif t.save_every and (step % t.save_every == 0 or step == t.max_steps):
                last_good = trainer.save()
                saved_at = step
            recent_s = [*recent_s, time.monotonic() - step_started][-3:]
            if trainer.bad_steps >= t.max_bad_steps:
                loggers.close()
                raise TrainingStopped(
                    f"stopped at step {step}: {trainer.bad_steps} consecutive steps were skipped for non-finite values "
                    f"(last: {row['skipped']}). No such update reached the weights. Check the reward function and "
                    f"the data, or lower optim.lr (now {cfg.optim.lr}); resume with --resume {out_dir}.")
    loggers.close()
    after = None
    if t.eval_before_after:
        after = _heldout(trainer, cfg.data.test, t.eval_k)
    trainer.save_final(out_dir / "final")
    if not main:
        return {"before": before, "after": after, "steps": trainer.step_no, "warnings": warnings}
    if after is not None:
        (out_dir / "heldout_after.json").write_text(json.dumps(after, indent=1))
    report = write_report(out_dir, rows, before, after, cfg.to_dict(), warnings)
    if before and after:
        console.print(summary_table(f"held-out avg@{after['k']} before / after ({after['n']} test questions)",
                                    {"before": before, "after": after}, change=True))
        if change := paired_change(before, after):
            (out_dir / "heldout_change.json").write_text(json.dumps(change, indent=1))
            console.print(f"held-out change {change['change']:+.3f} ± {change['se']:.3f} (standard error of the paired "
                          f"difference over {change['n']} questions: {abs(change['change']) / change['se']:.1f} SE)"
                          if change["se"] > 0 else f"held-out change {change['change']:+.3f} (no spread to estimate an error from)")
    console.print(f"wrote {report}, metrics.jsonl, checkpoints/ and final/ to {out_dir}")
    return {"before": before, "after": after, "steps": trainer.step_no, "warnings": warnings}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def train_from_args(preset: str, model: str | None, data: str | None, overrides: list[str], max_steps: int | None,
                    out: str | None, resume: str | None, device: str | None) -> dict[str, Any]:
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"{run_dir}/config.yaml not found: --resume takes a papo train output directory")
        fixed = {"--model": model, "--data": data, "--out": out}
        if given := [flag for flag, value in fixed.items() if value]:
            raise ConfigError(f"{', '.join(given)} cannot change on --resume: {run_dir} continues with the model, data "
                              "and directory it started with (start a new run with --out to change them)")
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        extra = list(overrides)
        if max_steps:  # extends a finished run, or stops a running one earlier
            extra.append(f"trainer.max_steps={max_steps}")
        if device:
            extra.append(f"trainer.device={device}")
        cfg = load_config(saved.get("preset", preset), file=str(run_dir / "config.yaml"), overrides=extra)
        write_config(cfg, run_dir)  # what the continued run uses, e.g. its new max_steps
        return run_train(cfg, str(run_dir), resume=True)
    extra = list(overrides)
    if model:
        extra.append(f"model.name={model}")
    if data:
        extra.append(f"data.train={data}")
    if max_steps:
        extra.append(f"trainer.max_steps={max_steps}")
    if device:
        extra.append(f"trainer.device={device}")
    cfg = load_config(preset, overrides=extra)
    out = out or f"runs/{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_train(cfg, out)


def write_config(cfg: TrainConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def read_metrics(path: Path, up_to: int | None = None) -> list[dict]:
    """The step rows of a metrics.jsonl (up to step ``up_to``), whatever a crash left of its last line."""
    return [r for r in read_records(path) if isinstance(r.get("step"), int) and (up_to is None or r["step"] <= up_to)]


def resume_point(out: Path) -> Path | None:
    return latest_checkpoint(out / "checkpoints")


def is_finite_row(row: dict) -> bool:
    return all(not isinstance(v, float) or math.isfinite(v) for v in row.values())
