"""papo against TRL's GRPOTrainer, side by side in one run: the same model, prompts, batch, response cap,
sampling settings and mixed precision, steps timed the same way.

    python benchmarks/race.py --out benchmarks/results/race-h200.json              # Qwen2.5-VL-3B, one GPU
    python benchmarks/race.py --out /tmp/race.json --papo-before /tmp/before.json  # add a train_step.py result
    python benchmarks/race.py --smoke --out /tmp/race.json                         # the embedded model, CPU

Both systems train the random-weight Qwen2.5-VL-3B directory ``train_step.py`` writes, in fp32 master weights
with bf16 autocast, on 32 synthetic prompts × 5 rollouts per step (images resized by PAPO's pixel bounds to
448×448, 256 image tokens), a 2,048-token cap, temperature 1, top_p 0.99, two optimizer updates per step of 80
sequences in micro-batches of 4, gradient checkpointing, lr 1e-6, KL to the reference model (beta 0.01).
papo runs the GRPO preset through ``train_step.py``'s ``run`` (its paper settings: scoring passes of 16, update
passes of 16); TRL runs ``GRPOTrainer`` with transformers ``generate`` (no vLLM), ``steps_per_generation`` set
so that one generation feeds the same two updates. A papo step is one generation and its two updates; so is
a TRL step, timed from TRL's own step callbacks. Tokens count prompt (image tokens included) and response
tokens, as verl and EasyR1 count them (TRL's ``num_tokens``). ``--papo-before`` folds in a ``train_step.py``
result measured at an earlier papo commit with the same arguments, ``--papo-from`` one of the current commit
(when TRL's step needs a run of its own), ``--trl-from`` the TRL entry of an earlier race.py result (when
papo changed and TRL did not; with both ``-from`` options nothing runs), and ``--trl-deadline`` records a lower bound if TRL's step outlasts
the time the run has (the process then exits with status 3; list TRL last in ``--systems``). TRL samples only the ids papo samples (the benchmark model's output layer is wider
than its tokenizer).

TRL is not a papo dependency: install it (and accelerate) to run this benchmark.

papo-before is papo at e63abb4, the commit before the throughput work, on the same model directory:

    mkdir .before && git archive e63abb4 | tar -x -C .before          # .before/ is git-ignored
    sed -i 's/load_config("papo_g"/load_config("grpo"/' .before/benchmarks/train_step.py   # its driver ran PAPO-G only
    python benchmarks/train_step.py --runs 3b:default --steps 1 --prompts 2 --out /tmp/x.json   # writes the model
    touch /tmp/papo-bench-models/qwen2.5-vl-3b/.complete              # the old driver's marker: it must not rewrite it
    (cd .before && PYTHONPATH=$PWD python benchmarks/train_step.py --runs 3b:default --prompts 32 --steps 2 --out /tmp/before.json)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import ensure_model, run  # noqa: E402

from papo.config.schema import load_config  # noqa: E402
from papo.data.stream import PromptStream  # noqa: E402
from papo.models.loading import load_processor  # noqa: E402
from papo.models.logprobs import suppressed_token_ids  # noqa: E402
from papo.models.policy import resolve_model  # noqa: E402
from papo.rewards import score_responses  # noqa: E402
from papo.training.distributed import DistContext  # noqa: E402

PAPO_PIXELS = (200704, 1003520)


def prompts_and_images(n: int, seed: int = 0) -> list[dict]:
    """``n`` synthetic prompts as TRL's conversational rows: the prompt papo's trainer formats, its image
    resized by PAPO's pixel bounds, and what papo's reward needs."""
    cfg = load_config("grpo")
    stream = PromptStream(cfg.data.train, seed)
    rows = []
    for _, sample in stream.take(n):
        image = sample.load_images(*PAPO_PIXELS)[0]
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"},
                                                              {"type": "text", "text": sample.formatted_prompt()}]}],
                     "image": image, "answer": sample.answer, "answer_type": sample.answer_type,
                     "meta": json.dumps(sample.meta or {})})
    return rows


def papo_reward(completions, answer, answer_type, meta, **_) -> list[float]:
    """papo's reward (0.9 accuracy + 0.1 format) on TRL's conversational completions."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    scores = score_responses(texts, list(answer), list(answer_type), [json.loads(m) for m in meta])
    return [float(s["overall"]) for s in scores]


def run_trl(model_dir: str, prompts: int, steps: int, cap: int, smoke: bool, deadline_s: float = 0.0,
            on_deadline: Any = None) -> dict:
    """TRL's steps, and each ``generate`` call it makes (rows, new tokens, seconds). ``deadline_s`` > 0: if TRL
    has not finished by then, ``on_deadline`` gets what it has (its finished steps, its generate calls, and the
    seconds since training started as a lower bound on the step in progress) and the process ends: a step
    longer than a time-limited run still leaves a measured lower bound."""
    from datasets import Dataset
    from transformers import AutoConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    processor = load_processor(model_dir)  # AutoProcessor, or papo's own assembly where torchvision is missing
    config = AutoConfig.from_pretrained(model_dir)
    n, micro, updates = (2, 2, 2) if smoke else (5, 4, 2)
    sequences = prompts * n
    per_update = sequences // updates
    marks: list[float] = []
    records: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            print(f"trl: optimizer step {len(marks)} at {marks[-1] - start:.1f} s", flush=True)  # progress if cut short

        def on_log(self, args, state, control, logs=None, **kwargs):
            records.append({**(logs or {}), "step": state.global_step})

    args = GRPOConfig(
        output_dir=str(Path(tempfile.gettempdir()) / "papo-race-trl"), report_to=[], logging_steps=1, save_strategy="no",
        per_device_train_batch_size=micro, gradient_accumulation_steps=per_update // micro,
        steps_per_generation=sequences // micro, num_generations=n, max_completion_length=cap,
        temperature=1.0, top_p=0.99, top_k=0, learning_rate=1e-6, beta=0.01, epsilon=0.2, epsilon_high=0.3,
        bf16=torch.cuda.is_available(), gradient_checkpointing=True, max_steps=steps * updates,
        model_init_kwargs={"dtype": torch.float32}, use_vllm=False, seed=0, use_cpu=not torch.cuda.is_available(),
        # the ids papo never samples: the benchmark model's output layer has 151,936 rows but its tokenizer far
        # fewer, and sampling the padding rows too makes every completion run to the cap
        generation_kwargs={"suppress_tokens": suppressed_token_ids(config, config.get_text_config().vocab_size, processor.tokenizer)},
    )
    trainer = GRPOTrainer(model=model_dir, reward_funcs=papo_reward, args=args,
                          train_dataset=Dataset.from_list(prompts_and_images(prompts * steps)), processing_class=processor,
                          callbacks=[Clock()])
    generate_calls: list[dict] = []
    model = trainer.model
    plain_generate = model.generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = plain_generate(*a, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prompt_len = (kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).shape[-1]
        generate_calls.append({"rows": int(out.shape[0]), "new_tokens": int(out.shape[-1] - prompt_len),
                               "s": round(time.perf_counter() - t, 3)})
        print(f"trl: generate {generate_calls[-1]}", flush=True)
        return out

    model.generate = timed_generate  # TRL calls the unwrapped model's generate
    start = time.perf_counter()  # read by Clock and cut_short
    if deadline_s > 0:
        def cut_short() -> None:
            done = len(marks) // updates  # whole steps finished; the one in progress began at the last of them
            began = marks[done * updates - 1] if done else start
            steps = [round(b - a, 3) for a, b in zip([start] + marks[updates - 1::updates], marks[updates - 1::updates])]
            on_deadline({"system": "trl", "version": __import__("trl").__version__, "finished": False,
                         "steps_s": steps, "step_s_at_least": round(time.perf_counter() - began, 1),
                         "optimizer_updates_done": len(marks), "generate_calls": list(generate_calls),
                         "logs": list(records),
                         "note": f"cut at the {deadline_s:.0f}-second deadline: step_s_at_least is the time the step in "
                                 "progress had run, a lower bound on it"})
            os._exit(3)  # systems after TRL in --systems do not run

        timer = threading.Timer(deadline_s, cut_short)
        timer.daemon = True
        timer.start()
    trainer.train()
    if deadline_s > 0:
        timer.cancel()
    # a step: one generation and its `updates` optimizer steps
    ends = [start] + marks[updates - 1 :: updates]
    step_s = [round(b - a, 3) for a, b in zip(ends, ends[1:])]
    tokens = [row["num_tokens"] for row in records if "num_tokens" in row]  # cumulative, logged once per generation
    per_step_tokens = [b - a for a, b in zip([0.0] + tokens, tokens)]
    steady = step_s[1:] or step_s
    tokens_steady = per_step_tokens[1:] or per_step_tokens
    result = {"system": "trl", "version": __import__("trl").__version__, "steps_s": step_s,
              "step_s": round(sum(steady) / len(steady), 3), "tokens_per_step": per_step_tokens,
              "tokens_per_s_per_gpu": round(sum(tokens_steady) / sum(steady), 1) if steady and tokens_steady else None,
              "generate_calls": generate_calls, "logs": records}
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="steps per system; the first is left out of the averages")
    ap.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "papo-bench-models"))
    ap.add_argument("--papo-before", default="", help="a train_step.py result JSON measured at an earlier papo commit")
    ap.add_argument("--papo-from", default="", help="a train_step.py GRPO result JSON for the papo entry, instead of "
                    "running papo here (when TRL needs a run of its own)")
    ap.add_argument("--trl-from", default="", help="an earlier race.py result JSON whose TRL entry is reused")
    ap.add_argument("--systems", default="papo,trl")
    ap.add_argument("--trl-deadline", type=float, default=0.0,
                    help="seconds: if TRL's steps are not done by then, record a lower bound and stop (0: wait)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    ctx = DistContext(device=device)
    cap = 16 if args.smoke else 2048
    folded = {"papo": args.papo_from, "trl": args.trl_from}
    model_dir = ""
    if not all(folded.get(system) for system in args.systems.split(",")):
        model_dir = resolve_model("default") if args.smoke else str(ensure_model("3b", Path(args.models_dir) / "qwen2.5-vl-3b", ctx))
    runs = []
    for system in args.systems.split(","):
        try:
            runs.append(run_system(system, args, model_dir, cap, device, ctx, runs))
        except Exception as err:  # one system failing must not lose the others' measurements
            traceback.print_exc()
            runs.append({"system": system, "error": f"{type(err).__name__}: {str(err)[:500]}"})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("detail", "logs")}), flush=True)
        write(args, runs, device)


def run_system(system: str, args, model_dir: str, cap: int, device: str, ctx, done: list[dict]) -> dict:
    if system == "papo" and args.papo_from:
        measured = json.loads(Path(args.papo_from).read_text())
        r = next(run for run in measured["runs"] if run.get("preset") == "grpo")
        return {"system": "papo", "step_s": r["step_s"], "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"],
                "label": measured.get("label", ""), "detail": r}
    if system == "papo":
        extra = ["rollout.n=2", f"rollout.max_new_tokens={cap}", "trainer.micro_batch_size=2"] if args.smoke else []
        name = "embedded-default" if args.smoke else "qwen2.5-vl-3b"
        r = run(name, model_dir, "default", args.prompts, args.steps, device, extra, ctx, preset="grpo")
        return {"system": "papo", "step_s": r["step_s"], "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"], "detail": r}
    if system == "trl" and args.trl_from:
        earlier = json.loads(Path(args.trl_from).read_text())
        r = next(run for run in earlier["runs"] if run["system"] == "trl")
        return {**r, "from": f"{Path(args.trl_from).name}, device {earlier.get('device')}, torch {earlier.get('torch')}"}
    if system == "trl":
        return run_trl(model_dir, args.prompts, args.steps, cap, args.smoke, args.trl_deadline,
                       on_deadline=lambda partial: write(args, done + [partial], device))
    raise ValueError(f"unknown system {system!r} (papo, trl)")


def write(args, runs: list[dict], device: str) -> None:
    runs = list(runs)
    if args.papo_before:
        before = json.loads(Path(args.papo_before).read_text())
        r = before["runs"][0]
        runs.append({"system": "papo-before", "step_s": r["step_s"], "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"],
                     "label": before.get("label", ""), "detail": r})
    by = {r["system"]: r for r in runs}
    measured_on = {}
    for path in (args.papo_from, args.trl_from):  # folded results name the machine they ran on
        if path:
            measured_on = {k: json.loads(Path(path).read_text()).get(k) for k in ("torch", "device")}
    ran_here = any(not (system == "papo" and args.papo_from) and not (system == "trl" and args.trl_from)
                   for system in (r["system"] for r in runs if r["system"] in ("papo", "trl")))
    if ran_here and device == "cuda" and torch.cuda.is_available():
        measured_on = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    result = {"model": "embedded-default" if args.smoke else "qwen2.5-vl-3b",
              "torch": measured_on.get("torch", torch.__version__), "device": measured_on.get("device", device),
              "prompts_per_step": args.prompts, "runs": runs}
    papo, trl = by.get("papo", {}), by.get("trl", {})
    if "step_s" in papo and "step_s" in trl:
        result["trl_step_over_papo_step"] = round(trl["step_s"] / papo["step_s"], 2)
        print(f"TRL step / papo step: {result['trl_step_over_papo_step']}", flush=True)
    elif "step_s" in papo and "step_s_at_least" in trl:
        result["trl_step_over_papo_step_at_least"] = round(trl["step_s_at_least"] / papo["step_s"], 2)
        print(f"TRL step / papo step: at least {result['trl_step_over_papo_step_at_least']}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
