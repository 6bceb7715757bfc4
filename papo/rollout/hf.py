"""Sampling with transformers ``generate``: the portable path, for every model and device."""

from __future__ import annotations

from typing import Any

import torch

from papo.models.inputs import PromptBatch
from papo.rollout.sampling import Completions, SamplingParams, trim_after_eos


@torch.no_grad()
def hf_generate(model: Any, batch: PromptBatch, params: SamplingParams, suppress_ids: list[int], eos_ids: list[int],
                pad_id: int, n: int = 1) -> Completions:
    """``n`` completions per prompt row, prompt-major (transformers expands the inputs, images included)."""
    inputs = batch.to(model.device).inputs
    kwargs: dict[str, Any] = dict(
        max_new_tokens=params.max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
        suppress_tokens=suppress_ids or None, use_cache=True, num_return_sequences=1 if params.greedy else n,
    )
    if params.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    if inputs["input_ids"].is_cuda:
        # cuDNN's SDPA builds a new graph for every new KV length, so the first generate of each shape costs
        # seconds; the flash / memory-efficient kernels do not
        torch.backends.cuda.enable_cudnn_sdp(False)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**inputs, **kwargs)
    finally:
        model.train(was_training)
    out = out[:, batch.prompt_len :].cpu()
    if params.greedy and n > 1:  # greedy copies are identical: decode once
        out = out.repeat_interleave(n, 0)
    return trim_after_eos(out, eos_ids, pad_id)
