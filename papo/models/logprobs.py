"""Per-token log-probs (and exact entropies) of response tokens, with the sampler's token support.

The language-model head is applied to chunks of response positions, each under activation checkpointing
when gradients are on, so (tokens x vocabulary) logits for the whole batch never exist at once, in the
forward or the backward pass. Logits are divided by the sampling temperature and the suppressed ids (vision
placeholders, padded vocabulary rows) are set to -inf, exactly as the sampler's logits processors do, so a
log-prob here equals the sampler's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from papo.algo.kl import entropy_from_logits


def suppressed_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Ids no policy may sample: image/video placeholders and vision delimiters (sampling ``<|image_pad|>``
    would make the re-scoring forward fail with an image-feature count mismatch) and the unused rows of a
    vocabulary padded beyond the tokenizer."""
    cfg = model.config
    ids = set()
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value >= 0:
            ids.add(value)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids.update(range(len(tokenizer), vocab))
    return sorted(ids)


def suppress_mask(ids: list[int], vocab: int, device: Any = None) -> Tensor:  # (V,) bool
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    if ids:
        mask[torch.as_tensor(ids, device=device)] = True
    return mask


def _hidden_states(model: Any, inputs: dict[str, Tensor]) -> Tensor:
    """(B, L, H) last hidden states, without computing logits for every position."""
    base = getattr(model, "model", None)
    if base is None:
        raise TypeError(f"{type(model).__name__} has no .model backbone; papo needs an image-text-to-text model")
    return base(**inputs, use_cache=False).last_hidden_state


def _chunk_logprobs(head: Any, h: Tensor, targets: Tensor, temperature: float, suppress: Tensor | None,
                    with_entropy: bool) -> tuple[Tensor, Tensor]:
    logits = head(h).float() / temperature  # (N, V)
    if suppress is not None:
        logits = logits.masked_fill(suppress, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    entropy = entropy_from_logits(logits) if with_entropy else torch.zeros_like(logp)
    return logp, entropy


def response_logprobs(
    model: Any,
    inputs: dict[str, Tensor],  # prompt + completion inputs (append_completions)
    response_mask: Tensor,  # (B, R): 1 for real completion tokens
    temperature: float = 1.0,
    suppress: Tensor | None = None,  # (V,) bool
    chunk_tokens: int = 2048,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(log-probs (B, R) float32, exact entropies (B, R) or None); zero at padded positions."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if hasattr(model, "get_base_model"):  # peft: the adapters sit inside the base model's own modules
        model = model.get_base_model()
    b, r = response_mask.shape
    ids = inputs["input_ids"]
    p = ids.shape[1] - r
    hidden = _hidden_states(model, inputs)[:, p - 1 : p + r - 1]  # (B, R, H): position t predicts token t + 1
    valid = response_mask.bool()
    # padded targets may be suppressed ids (-inf): score a harmless id there and zero the result
    safe_id = int(getattr(model.config, "pad_token_id", None) or 0)
    targets = torch.where(valid, ids[:, p:], torch.full_like(ids[:, p:], safe_id)).reshape(-1)
    flat = hidden.reshape(b * r, -1)
    head = model.get_output_embeddings()
    logps, entropies = [], []
    for start in range(0, flat.shape[0], chunk_tokens):
        args = (head, flat[start : start + chunk_tokens], targets[start : start + chunk_tokens], temperature, suppress, with_entropy)
        if torch.is_grad_enabled() and flat.requires_grad:
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        logps.append(lp)
        entropies.append(ent)
    zero = torch.zeros((), device=flat.device)
    logp = torch.where(valid, torch.cat(logps).view(b, r), zero)
    entropy = torch.where(valid, torch.cat(entropies).view(b, r), zero) if with_entropy else None
    return logp, entropy
