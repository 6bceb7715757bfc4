"""Per-token log-probs (and exact entropies) of response tokens, with the sampler's token support.

The language-model head is applied to chunks of the valid response positions, each under activation checkpointing
when gradients are on, so (tokens x vocabulary) logits for the whole batch never exist at once, in the
forward or the backward pass. Logits are divided by the sampling temperature and the suppressed ids (vision
placeholders, padded vocabulary rows) are set to -inf, exactly as the sampler's logits processors do, so a
log-prob here equals the sampler's.

Inside ``compiled_head()`` (the trainer's scoring and update regions, with ``model.compile_layers``) each chunk
runs through ``torch.compile``: eager code writes the (tokens x vocabulary) logits out in float32 about five
times (cast, temperature, suppression, log-softmax and their backward), Inductor reads the bf16 logits once or
twice.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from papo.algo.kl import entropy_from_logits
from papo.models import compiled
from papo.models.image_features import computes_image_features, embed_with_images, image_features
from papo.models.mrope import rope_index
from papo.models.packing import can_pack, pack


def suppressed_token_ids(cfg: Any, vocab: int, tokenizer: Any) -> list[int]:
    """Ids no policy may sample: image/video placeholders and vision delimiters (sampling ``<|image_pad|>``
    would make the re-scoring forward fail with an image-feature count mismatch) and the unused rows of a
    ``vocab``-row output layer padded beyond the tokenizer. ``cfg``: the model's config."""
    ids = set()
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value >= 0:
            ids.add(value)
    ids.update(range(len(tokenizer), vocab))
    return sorted(ids)


def suppress_mask(ids: list[int], vocab: int, device: Any = None) -> Tensor:  # (V,) bool
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    if ids:
        mask[torch.as_tensor(ids, device=device)] = True
    return mask


def _backbone(model: Any, inputs: dict[str, Any], image_ids: Sequence[Hashable] | None = None) -> Tensor:
    """Last hidden states (B, L, H), without computing logits for every position. Where papo computes the image
    features (``papo.models.image_features``: once per distinct image of ``image_ids``), the model receives
    embeddings and the 3-D positions instead of pixels and token ids."""
    base = getattr(model, "model", None)
    if base is None:
        raise TypeError(f"{type(model).__name__} has no .model backbone; papo needs an image-text-to-text model")
    # positions come from the token ids, which the model then no longer receives: without the token types that
    # place the images, transformers' own forward runs (it falls back to 1-D positions)
    positioned = inputs.get("position_ids") is not None or inputs.get("mm_token_type_ids") is not None
    if inputs.get("pixel_values") is not None and positioned and computes_image_features(model):
        inputs = dict(inputs)
        grid = inputs.pop("image_grid_thw").cpu()  # the trainer's batches keep it on the host
        features = image_features(base, inputs.pop("pixel_values"), grid, image_ids)
        if inputs.get("position_ids") is None:
            inputs["position_ids"] = rope_index(model, {**inputs, "image_grid_thw": grid})[0].to(features.device)
        inputs["inputs_embeds"] = embed_with_images(base, inputs.pop("input_ids"), features)
    return base(**inputs, use_cache=False).last_hidden_state


def _chunk_logprobs(head: Any, h: Tensor, targets: Tensor, temperature: float, suppress: Tensor | None,
                    with_entropy: bool) -> tuple[Tensor, Tensor]:
    logits = head(h).float() / temperature  # (N, V)
    if suppress is not None:
        logits = logits.masked_fill(suppress, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    entropy = entropy_from_logits(logits) if with_entropy else torch.zeros_like(logp)
    return logp, entropy


_compiled_chunks: dict[Any, Any] = {}  # per compiler backend: _chunk_logprobs through torch.compile
# the compiled chunk function inside a compiled_head() region of this thread or task, else None
_compiled_chunk: ContextVar[Any] = ContextVar("compiled_chunk", default=None)


@contextmanager
def compiled_head() -> Iterator[None]:
    """The region where the head's chunks run compiled. Like compiled layers, it must hold the backward:
    checkpointing recomputes each chunk there."""
    if compiled.BACKEND not in _compiled_chunks:
        _compiled_chunks[compiled.BACKEND] = compiled.compiled_function(_chunk_logprobs)
    token = _compiled_chunk.set(_compiled_chunks[compiled.BACKEND])
    try:
        with compiled.compile_settings():
            yield
    finally:
        _compiled_chunk.reset(token)


def response_logprobs(
    model: Any,
    inputs: dict[str, Tensor],  # prompt + completion inputs (append_completions)
    response_mask: Tensor,  # (B, R): 1 for real completion tokens
    temperature: float = 1.0,
    suppress: Tensor | None = None,  # (V,) bool
    chunk_tokens: int = 2048,
    with_entropy: bool = False,
    image_ids: Sequence[Hashable] | None = None,  # one per image, equal for the same image (PromptBatch.image_ids)
    share_prompts: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """(log-probs (B, R) float32, exact entropies (B, R) or None); zero at padded positions.

    Padding-free when the model takes packed forwards (papo.models.packing), with one copy of each prompt that
    several rows share (``share_prompts``, with ``image_ids``), and the language-model head only ever sees the
    valid response positions."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if hasattr(model, "get_base_model"):  # peft: the adapters sit inside the base model's own modules
        model = model.get_base_model()
    b, r = response_mask.shape
    ids = inputs["input_ids"]
    p = ids.shape[1] - r
    rows, cols = response_mask.bool().nonzero(as_tuple=True)  # valid response tokens, row by row
    before = p - 1 + cols  # the position that predicts each of them
    if can_pack(model, inputs):
        packed = pack(model, inputs, p if share_prompts else None, image_ids)
        hidden = _backbone(model, packed.inputs, packed.image_ids)[0][packed.index[rows, before]]  # (N, H)
    else:
        hidden = _backbone(model, inputs, image_ids)[rows, before]
    targets = ids[rows, p + cols]
    logps, entropies = token_logprobs(model.get_output_embeddings(), hidden, targets, temperature, suppress,
                                      chunk_tokens, with_entropy)

    def scatter(values: Tensor) -> Tensor:  # (N,) -> (B, R), zero at padded positions
        return values.new_zeros(b, r).index_put((rows, cols), values)

    return scatter(logps), scatter(entropies) if with_entropy else None


def token_logprobs(head: Any, hidden: Tensor, targets: Tensor, temperature: float, suppress: Tensor | None,
                   chunk_tokens: int, with_entropy: bool) -> tuple[Tensor, Tensor]:
    """(N, H) hidden states and (N,) next tokens -> (N,) log-probs and (N,) entropies (zeros without
    ``with_entropy``), ``chunk_tokens`` rows of logits at a time."""
    chunk_logprobs = _compiled_chunk.get() or _chunk_logprobs
    logps, entropies = [], []
    for start in range(0, max(1, hidden.shape[0]), chunk_tokens):
        args = (head, hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens], temperature, suppress, with_entropy)
        if torch.is_grad_enabled() and hidden.requires_grad:
            lp, ent = checkpoint(chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = chunk_logprobs(*args)
        logps.append(lp)
        entropies.append(ent)
    return torch.cat(logps), torch.cat(entropies)
