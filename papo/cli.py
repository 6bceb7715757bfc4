"""Command-line entry point: ``papo <command> ...``.

Each command lives in a small ``_cmd_*`` function; heavy imports happen inside it so ``papo --help`` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from papo import __version__


def _cmd_mask(args: argparse.Namespace) -> int:
    import numpy as np

    from papo.data.images import to_rgb
    from papo.data.masking import MaskingConfig, corrupt_images

    cfg = MaskingConfig(strategy=args.strategy, ratio=args.ratio, patch_size=args.patch_size, noise_std=args.noise_std)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(args.images):
        original = to_rgb(path, source=str(path))
        (masked,) = corrupt_images([original], cfg, seed=args.seed, sample_id=Path(path).name, draw=args.draw)
        target = out / f"{Path(path).stem}.masked.png"
        masked.save(target)
        black = (np.asarray(masked) == 0).all(-1).mean()
        print(f"{path} -> {target}  ({original.width}x{original.height}, black pixels {black:.1%})")
    return 0


def _task_values(text: str, flag: str) -> dict[str, float]:
    """``clock=0.35,bar_chart=0.5`` as {family: value}."""
    from papo.errors import UserError

    values = {}
    for part in filter(None, text.split(",")):
        task, eq, value = part.partition("=")
        task = task.strip()
        try:
            values[task] = float(value)
        except ValueError:
            raise UserError(f"{flag} takes FAMILY=ACCURACY pairs joined by commas, got {part!r}") from None
        if not eq or not task or not 0 <= values[task] <= 1:
            raise UserError(f"{flag} takes FAMILY=ACCURACY pairs with an accuracy in [0, 1], got {part!r}")
    return values


def _cmd_sft(args: argparse.Namespace) -> int:
    from papo.training.sft import SFTConfig, run_sft

    data = args.data or f"synthetic:{args.task}"
    cfg = SFTConfig(out=args.out, model=args.model, data=data, image_size=args.image_size, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, eval_per_task=args.eval_per_task,
                    eval_k=args.eval_k, max_new_tokens=args.max_new_tokens, device=args.device, masked_share=args.masked_share,
                    blank_share=args.blank_share, mask_ratio=args.mask_ratio, compute_dtype=args.compute_dtype,
                    warmup_steps=args.warmup_steps, max_bad_steps=args.max_bad_steps,
                    save_steps=tuple(int(x) for x in args.save_steps.split(",") if x) if args.save_steps else (),
                    stop_at=_task_values(args.stop_at, "--stop-at"), eval_compile=not args.eager_eval)
    run_sft(cfg)
    return 0


def _cmd_model_export(args: argparse.Namespace) -> int:
    from papo.models.policy import Policy
    from papo.training.checkpoint import is_sharded_checkpoint, load_sharded_policy

    if args.model and is_sharded_checkpoint(Path(args.model)):  # written by several processes: no HF files inside
        policy = load_sharded_policy(Path(args.model))
    else:
        policy = Policy.from_pretrained(args.model)
    out = policy.save(args.out)
    print(f"wrote {args.model or 'the embedded default model'} as a Hugging Face directory to {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    if args.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:  # start one process per GPU under torchrun
        return _torchrun(args.nproc_per_node, args.argv)
    from papo.training.loop import train_from_args

    train_from_args(args.preset, args.model, args.data, args.set, args.max_steps, args.out, args.resume, args.device)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from papo.evaluation.score import run_score

    run_score(args.predictions, args.out, args.k)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from papo.evaluation.run import EvalConfig, run_eval

    cfg = EvalConfig(data=[d for spec in args.data or [] for d in spec.split(",") if d], out=args.out, model=args.model,
                     k=args.k, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     max_new_tokens=args.max_new_tokens, limit=args.limit, mask_ratios=args.mask_ratio,
                     batch_size=args.batch_size, reward=args.reward, seed=args.seed, device=args.device, split=args.split,
                     columns={"prompt": args.prompt_key, "answer": args.answer_key, "images": args.image_key},
                     suite=args.suite, suite_dir=args.suite_dir, baseline=args.baseline, dependency=args.dependency,
                     dependency_threshold=args.dependency_threshold, dependency_pictures=args.dependency_pictures)
    run_eval(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="papo", description="Perception-Aware Policy Optimization for VLMs")
    parser.add_argument("--version", action="version", version=f"papo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mask", help="write PAPO-masked copies of images (to inspect the masked branch)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--strategy", default="random", help="random (official) | full | noise")
    p.add_argument("--ratio", type=float, default=0.6, help="per-cell black probability (official 0.6)")
    p.add_argument("--patch-size", type=int, default=14, help="cell size in pixels (official 14)")
    p.add_argument("--noise-std", type=float, default=0.6, help="std of the noise strategy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draw", type=int, default=0, help="draw index: a new mask for the same image and seed")
    p.set_defaults(func=_cmd_mask)

    p = sub.add_parser("train", help="RL training: GRPO, DAPO, PAPO-G, PAPO-D (default: PAPO-G on the embedded model)")
    p.add_argument("--preset", default="papo_g", help="grpo | papo_g | papo_g_7b | papo_g_no_ref | dapo | papo_d | vppo | pgpo | noisy_rollout | dvrp")
    p.add_argument("--model", default=None, help="model dir or hub id (default: the embedded default)")
    p.add_argument("--data", default=None, help="training data: file, dir, hub id or synthetic:SPEC")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key, e.g. algorithm.kl_prcp_coef=0.01")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>-<time>)")
    p.add_argument("--resume", default=None, help="continue the run in this directory from its last checkpoint")
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="processes (GPUs) on this machine, launched with torchrun; several machines: run torchrun yourself")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sft", help="supervised warm-start on the synthetic suite's reasoning traces")
    p.add_argument("--task", default="all", help="synthetic families: all, or names joined by '+'")
    p.add_argument("--data", help="instead of --task: any dataset whose rows carry a solution")
    p.add_argument("--model", default="tiny", help="tiny | small | 20m | 100m (random init) or a model dir / hub id")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--image-size", type=int, default=224, help="synthetic image side (a multiple of 28)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-per-task", type=int, default=50, help="held-out test samples per family (0: skip)")
    p.add_argument("--eval-k", type=int, default=4, help="sampled responses per held-out sample at T=1")
    p.add_argument("--max-new-tokens", type=int, default=64, help="held-out responses' cap (explain=1 traces need ~100)")
    p.add_argument("--eager-eval", action="store_true", help="held-out checks without compiling the rollout engine (CUDA)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--save-steps", default="", help="comma-separated steps at which to also write DIR/step-N")
    p.add_argument("--masked-share", type=float, default=0.0, help="share of samples shown PAPO's masked image")
    p.add_argument("--blank-share", type=float, default=0.0, help="share of samples shown a black image")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="black-cell probability of the masked images")
    p.add_argument("--compute-dtype", default="auto", help="auto (bfloat16 on CUDA over fp32 weights) | float32 | bfloat16")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear learning-rate warm-up before the cosine decay")
    p.add_argument("--max-bad-steps", type=int, default=10, help="stop after this many updates in a row skipped for a non-finite gradient")
    p.add_argument("--stop-at", default="", metavar="FAMILY=ACC,...",
                   help="end at the first --save-steps check where each named family's held-out accuracy reaches ACC")
    p.set_defaults(func=_cmd_sft)

    p = sub.add_parser("score", help="score a PAPO-Eval inference JSONL exactly as PAPO-Eval does (avg@k, pass@k)")
    p.add_argument("--predictions", required=True, help='JSONL lines {"idx", "id", "prompt", "predict", "label"}')
    p.add_argument("--k", type=int, default=None, help="samples per question (default: the smallest group)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("eval", help="generate k responses per question and score them (PAPO-Eval protocol)")
    p.add_argument("--model", default=None, help="model dir or hub id (default: the embedded default)")
    p.add_argument("--suite", default=None, help="papo-eval: the paper's nine PAPO-Eval splits, printed as Table 1")
    p.add_argument("--suite-dir", default=None, help="local copy of the suite's hub dataset (default: download it)")
    p.add_argument("--baseline", default=None, help="a papo eval output dir: adds Δ%%rel against it")
    p.add_argument("--data", action="append", default=None,
                   help="PAPO-Eval data.json, parquet/JSONL, hub id or synthetic:SPEC; comma-separated or repeated")
    p.add_argument("--split", default=None, help="split for hub ids / synthetic specs (default: train for hub, as given)")
    p.add_argument("--prompt-key", default=None, help="column holding the question (default: problem/question/prompt)")
    p.add_argument("--answer-key", default=None, help="column holding the answer (default: answer/label/ground_truth)")
    p.add_argument("--image-key", default=None, help="column holding the images (default: images/image)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50, help="PAPO-Eval inherits LLaMA-Factory's top_k=50; 0 disables")
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--limit", type=int, default=None, help="first N questions per benchmark")
    p.add_argument("--mask-ratio", type=float, action="append", default=[],
                   help="also answer with masked images (repeatable; 1.0 = blank images)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--reward", default="papo_math", help="papo_math | math_only | path/to/file.py:function")
    p.add_argument("--dependency", action="store_true",
                   help="per-token visual dependency of the responses (KL between the full and the masked image)")
    p.add_argument("--dependency-threshold", type=float, default=0.1, help="nats: a token at or above it is highly dependent")
    p.add_argument("--dependency-pictures", type=int, default=4, help="responses drawn with tokens shaded, per benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_eval)

    model = sub.add_parser("model", help="model utilities")
    model_cmds = model.add_subparsers(dest="model_command", required=True)
    p = model_cmds.add_parser("export", help="write a model as a Hugging Face directory (safetensors + processor)")
    p.add_argument("--model", default=None, help="model dir or hub id (default: the embedded default)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_model_export)

    from papo.data.commands import register as register_data

    register_data(sub)
    return parser


TORCHRUN_SHUTDOWN_ENV, TORCHRUN_SHUTDOWN_S = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 900


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's ranks), from /proc; [] where there is none."""
    if not os.path.isdir("/proc"):
        return []
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:  # after "pid (comm)": state, ppid, ...
            found.append(int(entry))
    return found


def _torchrun(nproc: int, argv: list[str]) -> int:
    """``python -m torch.distributed.run --nproc-per-node N -m papo <argv without --nproc-per-node>``."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "papo", *rest]
    print("papo: " + " ".join(cmd[1:]), file=sys.stderr)
    from papo.training.stop_signal import STOP_SIGNALS

    # torchrun in a session of its own gets each signal once, from here (one sent to this process group would
    # otherwise reach it twice). A stop signal goes to the ranks themselves: torchrun would pass it on and then
    # kill ranks still running 30 s later (torch >= 2.12 reads TORCHRUN_SHUTDOWN_ENV, older versions do not),
    # while a stopping rank finishes its step and writes a checkpoint, minutes at 3B. SIGUSR1 would end torchrun.
    env = {**os.environ}
    env.setdefault(TORCHRUN_SHUTDOWN_ENV, str(TORCHRUN_SHUTDOWN_S))
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)

    stops: list[int] = []

    def forward(signum: int, frame: object) -> None:
        ranks = [] if signum == signal.SIGINT else _children(proc.pid)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if ranks:
            stops.append(signum)
        else:  # Ctrl-C, or no ranks started yet (or no /proc): torchrun handles it
            proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        rc = proc.wait()
        # ranks that stopped on the signal exit 128 + it, which torchrun reports as a failure: report the stop
        return 128 + stops[0] if stops and rc != 0 else rc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # papo draws its own progress bars
    from papo.errors import CheckpointError, TrainingStopped, UserError
    from papo.training.stop_signal import Interrupted

    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as err:  # bad input: one clear line; anything else keeps its traceback
        print(f"papo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:  # stopped on a scheduler's signal, checkpoint saved: report it as that signal's end
        if os.environ.get("RANK", "0") == "0":  # every rank stopped at the same step; one says so
            print(f"papo {args.command}: stopped: {err}", file=sys.stderr)
        return 128 + err.signum
    except (TrainingStopped, CheckpointError) as err:  # the run stopped; the message says what to do next
        print(f"papo {args.command}: stopped: {err}", file=sys.stderr)
        return 1
