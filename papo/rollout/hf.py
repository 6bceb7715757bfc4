"""Sampling with transformers ``generate``: the portable path, for every model and device.

With ``keys`` the tokens are papo's keyed exponential race (``papo.rollout.keyed_noise``), computed by a
logits processor under greedy decoding, so they equal papo's engine's tokens for the same keys; without,
transformers samples with its own warpers and generator."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from papo.models.inputs import PromptBatch
from papo.rollout.decode_step import race_scores
from papo.rollout.sampling import Completions, SamplingParams, trim_after_eos


class KeyedRace:
    """A logits processor whose argmax is papo's keyed sample of the row (greedy decoding then samples)."""

    def __init__(self, params: SamplingParams, keys: Tensor, prompt_len: int) -> None:
        self.params, self.keys, self.prompt_len = params, keys, prompt_len

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        column = torch.full((scores.shape[0],), input_ids.shape[1] - self.prompt_len, device=scores.device)
        return race_scores(scores.float(), self.params, self.keys.to(scores.device), column)


@torch.no_grad()
def hf_generate(model: Any, batch: PromptBatch, params: SamplingParams, suppress_ids: list[int], eos_ids: list[int],
                pad_id: int, n: int = 1, keys: Tensor | None = None, synced: bool = False) -> Completions:
    """``n`` completions per prompt row, prompt-major. ``keys`` (B * n,): keyed sampling, one greedy pass per
    sample index; None: transformers' sampling (it expands the inputs, images included). ``synced``: keep
    decoding until every process is done (a sharded model runs collectives in each forward)."""
    inputs = batch.to(model.device).inputs
    kwargs: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                                  suppress_tokens=suppress_ids or None, use_cache=True, synced_gpus=synced)
    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None, num_return_sequences=1)
    if inputs["input_ids"].is_cuda:
        # cuDNN's SDPA builds a new graph for every new KV length, so the first generate of each shape costs
        # seconds; the flash / memory-efficient kernels do not
        torch.backends.cuda.enable_cudnn_sdp(False)
    was_training = model.training
    model.eval()
    try:
        if params.greedy:
            outs = [model.generate(**inputs, **kwargs, **greedy)] * n  # greedy copies are identical: decode once
        elif keys is not None:
            per_sample = keys.view(batch.size, n)
            outs = [model.generate(**inputs, **kwargs, **greedy, logits_processor=[KeyedRace(params, per_sample[:, j], batch.prompt_len)])
                    for j in range(n)]
        else:
            outs = [model.generate(**inputs, **kwargs, do_sample=True, temperature=params.temperature, top_p=params.top_p,
                                   top_k=params.top_k or None, num_return_sequences=n)]
    finally:
        model.train(was_training)
    outs = [o[:, batch.prompt_len:].cpu() for o in outs]
    if len(outs) > 1:  # sample j of prompt b goes to row b * n + j
        width = max(o.shape[1] for o in outs)
        outs = [torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad_id) for o in outs]
        out = torch.stack(outs, 1).flatten(0, 1)
    else:
        out = outs[0]
    return trim_after_eos(out, eos_ids, pad_id)
