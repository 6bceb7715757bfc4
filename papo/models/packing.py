"""Padding-free forwards: the sequences of a micro-batch laid end to end in one row.

A micro-batch of left-padded prompts and right-padded completions computes every padded position: with
responses from a few hundred tokens to the 2,048-token cap, a micro-batch of 4 runs about as long as its
longest row four times over. Packing keeps only the valid tokens of each sequence, in order, in one row of
``T`` tokens. The language model attends causally within each sequence (``packed_seq_lens``, read by
papo.models.attention's packed text attention), and every token keeps the 3-D M-RoPE position the padded batch
gives it: positions are computed on the padded batch (the model's own ``get_rope_index``, or for the
Qwen2-VL family ``papo.models.mrope``, equal to it) and then packed.
The vision tower sees the same images as before. A token's log-prob is therefore the padded
forward's, up to kernel rounding.

Shared prompts. A prompt's G rollouts sit side by side in a pass and repeat its prompt token for token, image
included: at PAPO's pixel bounds a prompt is a few hundred tokens, as long as many responses. Rows whose prompt
tokens and images are the same (``PromptBatch.image_ids``, never pixels) share one copy: the row holds the
prompt once, then each of its responses, and each response attends to that copy and causally to itself (a key
segment of prompt + response, aligned at its end), which is exactly what it attends to in its own sequence. A
prompt position's hidden state is the same for every row that shares it, so log-probs are unchanged, and in a
backward pass its gradient sums over the responses as it would over G copies.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from papo.models.attention import PACKED_TEXT_ATTENTION, PackedSegments
from papo.models.image_features import select_images
from papo.models.inputs import is_per_token
from papo.models.mrope import rope_index


def can_pack(model: Any, inputs: dict[str, Tensor]) -> bool:
    """True if ``model`` (the image-text-to-text model, not a peft wrapper) takes packed forwards and ``inputs``
    carry what its M-RoPE positions are computed from. Without images or ``mm_token_type_ids`` transformers
    falls back to 1-D positions over the padded row; those inputs keep the padded forward, so as to get them."""
    config = getattr(model.config, "text_config", None)  # the packed attention is set only on models with get_rope_index
    return (getattr(config, "_attn_implementation", None) == PACKED_TEXT_ATTENTION
            and inputs.get("mm_token_type_ids") is not None
            and (inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None))


@dataclass
class Packed:
    inputs: dict[str, Any]  # keyword arguments of the backbone's forward: one row of T tokens
    index: Tensor  # (B, L) position in the packed row of each padded position, -1 for padding
    image_ids: Sequence[Hashable] | None  # one per image the packed row holds


def prompt_leads(inputs: dict[str, Tensor], prompt_len: int, image_ids: Sequence[Hashable] | None,
                 counts: list[int] | None = None) -> list[int]:
    """For each row, the first row with the same prompt: equal prompt tokens, padding included, and the same
    images (``image_ids``: one per image, in row order; ``counts``: images per row, ``images_per_row``'s if not
    given). Every row leads itself without ``image_ids`` or with videos (their ids are not tracked)."""
    b = inputs["input_ids"].shape[0]
    if image_ids is None or inputs.get("video_grid_thw") is not None:
        return list(range(b))
    counts = images_per_row(inputs, prompt_len) if counts is None else counts
    if sum(counts) != len(image_ids):
        raise ValueError(f"{len(image_ids)} image ids for {sum(counts)} images in the prompts")
    ids = inputs["input_ids"][:, :prompt_len].cpu()
    keep = inputs["attention_mask"][:, :prompt_len].cpu()
    first: dict[tuple, int] = {}
    leads, at = [], 0
    for row, count in enumerate(counts):
        key = (tuple(ids[row].tolist()), tuple(keep[row].tolist()), tuple(image_ids[at : at + count]))
        at += count
        leads.append(first.setdefault(key, row))
    return leads


def images_per_row(inputs: dict[str, Tensor], prompt_len: int) -> list[int]:
    """The number of images in each prompt: runs of image tokens (``mm_token_type_ids`` 1)."""
    image = inputs["mm_token_type_ids"][:, :prompt_len].cpu() == 1
    return (image & ~torch.nn.functional.pad(image[:, :-1], (1, 0), value=False)).sum(-1).tolist()


def pack(model: Any, inputs: dict[str, Tensor], prompt_len: int | None = None,
         image_ids: Sequence[Hashable] | None = None) -> Packed:
    """Pack prompt + completion ``inputs`` (append_completions' layout: (B, L) with an attention mask, prompts
    ``prompt_len`` wide). With ``prompt_len`` and ``image_ids`` rows that share a prompt hold one copy of it."""
    ids, keep = inputs["input_ids"], inputs["attention_mask"].bool()
    b, length = ids.shape
    positions = rope_index(model, inputs)[0].to(ids.device)  # (3, B, L), as the padded forward computes them
    counts = images_per_row(inputs, prompt_len) if prompt_len is not None and image_ids is not None else None
    leads = prompt_leads(inputs, prompt_len, image_ids, counts) if counts is not None else list(range(b))
    if leads == list(range(b)):
        flat = keep.reshape(-1).nonzero().squeeze(-1)  # row-major: sequences stay in order, and so do their images
        segments, kept_images = PackedSegments.sequences(keep.sum(-1).tolist(), ids.device), None
    else:
        flat, segments = _shared_layout(keep, prompt_len, leads)
        first_image = [0, *itertools.accumulate(counts)]
        kept_images = [i for lead in sorted(set(leads)) for i in range(first_image[lead], first_image[lead + 1])]
    # the three M-RoPE rows only: with a leading text row transformers would detect packed sequences and build
    # a dense T x T block-diagonal mask that packed attention does not read
    packed_positions = positions.reshape(3, -1)[:, flat][:, None]  # (3, 1, T)
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if key == "attention_mask":
            continue
        image = key.startswith("pixel_values") or key.endswith("grid_thw")
        out[key] = value.reshape(-1)[flat][None] if not image and is_per_token(value, b, length) else value
    if kept_images is not None:  # only the leading rows' prompts, so only their images
        out["pixel_values"], out["image_grid_thw"] = select_images(inputs["pixel_values"], inputs["image_grid_thw"],
                                                                   kept_images)
        image_ids = [image_ids[i] for i in kept_images]
    out.update(position_ids=packed_positions, packed_seq_lens=segments)  # no attention mask
    index = torch.full((b * length,), -1, dtype=torch.long, device=ids.device)
    index[flat] = torch.arange(flat.numel(), device=ids.device)
    index = index.view(b, length)
    for row, lead in enumerate(leads):  # a shared prompt's positions are its leading row's
        if lead != row:
            index[row, :prompt_len] = index[lead, :prompt_len]
    return Packed(out, index, image_ids)


def _shared_layout(keep: Tensor, prompt_len: int, leads: list[int]) -> tuple[Tensor, PackedSegments]:
    """(flat positions of the packed tokens in the (B * L) batch, their attention segments) when rows share
    prompts: each leading row's prompt, then the responses of every row it leads."""
    b, length = keep.shape
    host = keep.cpu()
    response_cols = [prompt_len + host[row, prompt_len:].nonzero().squeeze(-1) for row in range(b)]
    flat, q_lengths, k_lengths, key_index = [], [], [], []
    at = 0
    for lead in sorted(set(leads)):
        prompt = host[lead, :prompt_len].nonzero().squeeze(-1) + lead * length
        p = prompt.numel()
        prompt_at = torch.arange(at, at + p)
        flat.append(prompt)
        q_lengths.append(p)
        k_lengths.append(p)
        key_index.append(prompt_at)
        at += p
        for row in (r for r, lr in enumerate(leads) if lr == lead):
            response = response_cols[row] + row * length
            n = response.numel()
            if n == 0:
                continue
            flat.append(response)
            q_lengths.append(n)
            k_lengths.append(p + n)
            key_index += [prompt_at, torch.arange(at, at + n)]
            at += n
    device = keep.device
    return torch.cat(flat).to(device), PackedSegments.build(q_lengths, k_lengths, torch.cat(key_index).to(device))
