"""Rollout throughput: transformers ``generate`` vs ``papo.rollout``, measured side by side in one run.

    python benchmarks/rollout.py --out benchmarks/results/rollout-h100.json [--prompts 32,128,512] [--new-tokens 256]

Models, random weights (timing does not depend on their values), bf16, SDPA:
  * ``qwen2.5-vl-3b``: the public Qwen2.5-VL-3B-Instruct architecture (text 2048-d x 36 layers, 16 heads, 2 KV
    heads, vocabulary 151,936, tied embeddings; vision 1280-d x 32 layers), with papo's tokenizer ids for
    the special tokens; every prompt carries one 448x448 image (256 image tokens);
  * ``20m``: papo's ``20m`` tiny Qwen2.5-VL (the embedded family), 224x224 images.
Every row generates exactly ``--new-tokens`` tokens (the EOS is a suppressed id), sampled at T=1.
tokens/s counts generated tokens over the whole call, prefill included, for both engines. The bound is the
decode bound of memory bandwidth: the bytes a decode step must read (language-model weights, the KV cache
at the average length) over the device-to-device copy bandwidth measured here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from architectures import qwen25_vl_config
from PIL import Image
from train_step import byte_costs, copy_bandwidth

from papo.models.attention import use_packed_vision_attention
from papo.models.inputs import encode_prompts
from papo.models.loading import set_pixel_bounds
from papo.models.tiny import build_config, build_processor
from papo.rollout import RolloutEngine
from papo.rollout.hf import hf_generate
from papo.rollout.sampling import SamplingParams


def build(name: str, device: str = "cuda"):
    from transformers import AutoModelForImageTextToText

    processor = build_processor()
    cfg = qwen25_vl_config("3b", processor.tokenizer) if name == "qwen2.5-vl-3b" else build_config(name, processor.tokenizer)
    side = 448 if name == "qwen2.5-vl-3b" else 224
    set_pixel_bounds(processor, side * side, side * side)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
    use_packed_vision_attention(model)  # as papo.models.Policy does: both engines prefill through it
    return model, processor, side


def decode_bytes(model, rows: int, prompt_len: int, new_tokens: int) -> float:
    weights, per_token = byte_costs(model)
    return weights + per_token * rows * (prompt_len + new_tokens / 2)


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30


def run(name: str, prompts: list[tuple[int, int]], new_tokens: int, bandwidth: float, hf_limit: int) -> list[dict]:
    model, processor, side = build(name)
    tok = processor.tokenizer
    image_pad = model.config.image_token_id  # suppressed, so never sampled: every row runs to new_tokens
    suppress = [image_pad, model.config.video_token_id, model.config.vision_start_token_id, model.config.vision_end_token_id]
    eos, pad = [image_pad], tok.pad_token_id
    engine = RolloutEngine(model, suppress, eos, pad)
    params = SamplingParams(new_tokens, temperature=1.0)
    results = []
    for p, g in prompts:
        n = p * g  # rows: p prompts, g samples each
        images = [[Image.new("RGB", (side, side), ((37 * i) % 255, 90, 160))] for i in range(p)]
        batch = encode_prompts(processor, [f"<image>Question {i}: how many shapes are there?" for i in range(p)], images)
        shape = f"{p} prompts" + (f" x {g} samples" if g > 1 else "")
        row = {"workload": f"{name}, {shape} x {new_tokens} new tokens, {side}x{side} image", "model": name,
               "prompts": p, "samples_per_prompt": g, "prompt_tokens": batch.prompt_len, "new_tokens": new_tokens}
        _, warm_s, _ = timed(lambda: engine.generate(batch, params, g))  # warm-up: compilation, CUDA graph capture, allocator
        (comp, _), papo_s, papo_mem = timed(lambda: engine.generate(batch, params, g))
        assert int(comp.lengths.min()) == new_tokens
        row.update(papo_tokens_per_s=round(n * new_tokens / papo_s, 1), papo_seconds=round(papo_s, 3), papo_peak_gib=round(papo_mem, 2),
                   papo_warmup_s=round(warm_s, 1),
                   papo_prefill_s=round(engine.last_timing["prefill_s"], 3),
                   papo_decode_tokens_per_s=round(n * engine.last_timing["decode_steps"] / engine.last_timing["decode_s"], 1))
        if n <= hf_limit:
            hf_generate(model, _slice(batch, min(n, 4)), SamplingParams(8), suppress, eos, pad)  # warm-up
            comp, hf_s, hf_mem = timed(lambda: hf_generate(model, batch, params, suppress, eos, pad, g))
            assert int(comp.lengths.min()) == new_tokens
            row.update(hf_tokens_per_s=round(n * new_tokens / hf_s, 1), hf_seconds=round(hf_s, 3), hf_peak_gib=round(hf_mem, 2),
                       speedup=round(hf_s / papo_s, 2))
        row["bound_tokens_per_s"] = round(n / (decode_bytes(model, n, batch.prompt_len, new_tokens) / bandwidth), 1)
        print(json.dumps(row), flush=True)
        results.append(row)
    engine.release()
    return results


def check(new_tokens: int = 64, n: int = 16) -> dict:
    """Greedy tokens of the 20m model in fp32: CUDA graphs vs eager steps (must be identical), and the compiled
    engine and transformers generate vs eager (agreement up to kernel-level rounding)."""
    model, processor, side = build("20m")
    model.float()
    tok = processor.tokenizer
    suppress = [model.config.image_token_id]
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    images = [[Image.new("RGB", (side, side), ((53 * i) % 255, 20, 200))] for i in range(n)]
    batch = encode_prompts(processor, [f"<image>What is shown? {'x ' * (i % 5)}" for i in range(n)], images)
    params = SamplingParams(new_tokens, greedy=True)
    graphs = RolloutEngine(model, suppress, eos, tok.pad_token_id, compile=False).generate(batch, params)[0]
    eager = RolloutEngine(model, suppress, eos, tok.pad_token_id, use_cuda_graphs=False, compile=False).generate(batch, params)[0]
    compiled = RolloutEngine(model, suppress, eos, tok.pad_token_id, compile=True).generate(batch, params)[0]
    hf = hf_generate(model, batch, params, suppress, eos, tok.pad_token_id)

    def agreement(other):
        w = min(eager.ids.shape[1], other.ids.shape[1])
        return round(float((eager.ids[:, :w] == other.ids[:, :w]).float().mean()), 4)

    result = {"graphs_equal_eager": bool(torch.equal(graphs.ids, eager.ids)), "compiled_tokens_equal_to_eager": agreement(compiled),
              "hf_tokens_equal_to_eager": agreement(hf)}
    print(json.dumps(result), flush=True)
    return result


def _slice(batch, n):
    from papo.models.inputs import PromptBatch
    from papo.rollout.engine import _slice_rows

    return PromptBatch(_slice_rows(batch.inputs, 0, n), batch.image_keys)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", default="32,128,512,16x8", help="prompt counts; PxG: P prompts with G samples each")
    ap.add_argument("--small-prompts", default="128,512,16x8")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hf-limit", type=int, default=512, help="skip transformers generate above this many rows")
    ap.add_argument("--models", default="qwen2.5-vl-3b,20m")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    checks = check()
    bandwidth = copy_bandwidth()
    print(f"device-to-device copy bandwidth {bandwidth / 1e9:.0f} GB/s ({torch.cuda.get_device_name()})", flush=True)
    results = []
    for name in args.models.split(","):
        counts = args.prompts if name == "qwen2.5-vl-3b" else args.small_prompts
        workloads = [tuple(int(v) for v in (x.split("x") + ["1"])[:2]) for x in counts.split(",")]
        results += run(name, workloads, args.new_tokens, bandwidth, args.hf_limit)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
                                              "torch": torch.__version__, "checks": checks, "results": results}, indent=1))


if __name__ == "__main__":
    main()
