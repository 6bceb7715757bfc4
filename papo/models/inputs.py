"""Model inputs for prompts (chat template + images) and prompts + completions.

The generic rule that covers Qwen2/2.5/3-VL and LLaVA-style processors: call the processor on the whole batch
(left padding), treat every tensor shaped like ``input_ids`` as per-token (extend it for completions:
attention mask with the completion mask, the others such as ``mm_token_type_ids`` with zeros), and pass the
image tensors through untouched. ``mm_token_type_ids`` must be carried: without it transformers 5.x silently
falls back to 1-D positions for Qwen and log-probs drift from generation.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from papo.data.sample import chat_content

_image_serials = itertools.count()  # every encoded image gets its own id


@dataclass
class PromptBatch:
    inputs: dict[str, Tensor]  # processor output; input_ids / attention_mask (B, P), left-padded
    image_keys: tuple[str, ...]  # keys that carry the images (swapped for the masked branch)
    # one id per image, in order: equal ids mark the same encoded image (a prompt's rows repeat its encoding),
    # so its features are computed once (papo.models.image_features); None: every image distinct
    image_ids: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return self.inputs["input_ids"].shape[0]

    @property
    def prompt_len(self) -> int:
        return self.inputs["input_ids"].shape[1]

    def to(self, device: Any) -> PromptBatch:
        return replace(self, inputs={k: to_device(v, device) for k, v in self.inputs.items()})

    def pixels_to(self, device: Any) -> PromptBatch:
        """The image data (floating image tensors) on ``device``; token ids, masks and image grids stay where they
        are, for host code that reads them."""
        return replace(self, inputs={k: to_device(v, device) if k in self.image_keys and v.is_floating_point() else v
                                     for k, v in self.inputs.items()})

    def image_count(self) -> int:
        counted = self.inputs.get("image_grid_thw", self.inputs.get("pixel_values"))  # a grid row or a tensor each
        return 0 if counted is None else len(counted)

    def identified(self) -> tuple[int, ...]:
        """``image_ids``, or new ids (every image distinct) for a batch built without them."""
        return self.image_ids if self.image_ids is not None else new_image_ids(self.image_count())


def new_image_ids(count: int) -> tuple[int, ...]:
    return tuple(itertools.islice(_image_serials, count))


def to_device(t: Tensor, device: Any) -> Tensor:
    """``t`` on ``device``. A host-to-GPU copy goes through pinned memory without blocking: from pageable memory
    the host would wait for every kernel already queued (torch's caching host allocator keeps the pinned copy
    until the transfer is done). Other copies are as ``Tensor.to``."""
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def chat_text(processor: Any, prompt: str, images: Sequence[Any]) -> str:
    """The chat-templated prompt string, ready for the assistant turn."""
    messages = [{"role": "user", "content": chat_content(prompt, list(images))}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(processor: Any, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> PromptBatch:
    """prompts[i] holds one ``<image>`` per entry of images[i] (already decoded and resized)."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    texts = [chat_text(processor, p, ims) for p, ims in zip(prompts, images)]
    flat = [im for ims in images for im in ims]
    enc = processor(text=texts, images=flat or None, padding=True, padding_side="left", return_tensors="pt")
    inputs = {k: v for k, v in enc.items() if isinstance(v, Tensor)}
    image_keys = tuple(k for k in processor.image_processor.model_input_names if k in inputs)
    batch = PromptBatch(inputs, image_keys)
    return replace(batch, image_ids=new_image_ids(batch.image_count()))


def pad_completions(completions: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token-id lists: (ids (B, R), mask (B, R)); R >= 1 so empty completions keep a column."""
    width = max(1, max((len(c) for c in completions), default=0))
    ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        mask[i, : len(c)] = 1
    return ids, mask


def tokenize_completions(tokenizer: Any, texts: Sequence[str], eos_id: int | None, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded (ids, mask) of completion texts (e.g. SFT targets), each ending with ``eos_id`` if given."""
    tail = [eos_id] if eos_id is not None else []
    return pad_completions([tokenizer(t, add_special_tokens=False)["input_ids"] + tail for t in texts], pad_id)


def is_per_token(value: Any, rows: int, length: int) -> bool:
    """Whether an input tensor holds one entry per token (shaped like ``input_ids``: (rows, length))."""
    return isinstance(value, Tensor) and value.dim() == 2 and tuple(value.shape) == (rows, length)


def concat_prompt_batches(batches: Sequence[PromptBatch], pad_id: int) -> PromptBatch:
    """One batch of the rows of ``batches`` in order, left-padded again to the longest prompt: per-token tensors
    are padded (``input_ids`` with ``pad_id``, the others with zeros), image tensors are concatenated. The
    positions come from the attention mask, so a row's log-probs do not depend on the padding it gets."""
    if not batches:
        raise ValueError("no prompt batches to concatenate")
    image_keys = tuple(dict.fromkeys(k for b in batches for k in b.image_keys))  # a text-only batch has none
    keys = list(dict.fromkeys(k for b in batches for k in b.inputs))
    width = max(b.prompt_len for b in batches)
    out = {}
    for key in keys:
        if key in image_keys:
            out[key] = torch.cat([b.inputs[key] for b in batches if key in b.inputs])
            continue
        if missing := [i for i, b in enumerate(batches) if key not in b.inputs]:
            raise ValueError(f"cannot concatenate prompt batches: {key!r} is missing from batch {missing[0]}")
        parts = [b.inputs[key] for b in batches]
        if all(is_per_token(t, b.size, b.prompt_len) for t, b in zip(parts, batches)):
            fill = pad_id if key == "input_ids" else 0
            out[key] = torch.cat([torch.nn.functional.pad(t, (width - t.shape[1], 0), value=fill) for t in parts])
        else:
            raise ValueError(f"cannot concatenate prompt batches: {key!r} is neither per-token nor an image tensor")
    return PromptBatch(out, image_keys, tuple(i for b in batches for i in b.identified()))


def split_prompt_batch(batch: PromptBatch, images_per_row: Sequence[int]) -> list[PromptBatch]:
    """Each row of ``batch`` as a batch of its own, its left padding dropped: what encoding that prompt alone gives,
    so that a step's prompts can go through the processor in one call and still be cached one by one. Image
    tensors are split by image (one entry per image, e.g. ``image_grid_thw``) or, for Qwen's flat patches, by
    each image's grid."""
    counts = [int(c) for c in images_per_row]
    if len(counts) != batch.size:
        raise ValueError(f"{len(counts)} image counts for {batch.size} prompts")
    n_images, ids = sum(counts), batch.identified()
    grid = batch.inputs.get("image_grid_thw")
    image_bounds = list(itertools.accumulate(counts, initial=0))
    patch_bounds = None if grid is None else [int(grid[:i].prod(-1).sum()) for i in image_bounds]
    lengths = batch.inputs["attention_mask"].sum(-1).tolist()
    rows: list[dict[str, Tensor]] = [{} for _ in counts]
    for key, value in batch.inputs.items():
        if key in batch.image_keys:
            if patch_bounds is not None and key != "image_grid_thw" and len(value) == patch_bounds[-1]:
                bounds = patch_bounds
            elif len(value) == n_images:
                bounds = image_bounds
            else:
                raise ValueError(f"cannot split {key!r} ({len(value)} entries) over {n_images} images")
            for i, row in enumerate(rows):
                if counts[i]:  # a text-only prompt's encoding has no image tensors
                    row[key] = value[bounds[i] : bounds[i + 1]]
        elif is_per_token(value, batch.size, batch.prompt_len):
            for i, row in enumerate(rows):
                row[key] = value[i : i + 1, batch.prompt_len - int(lengths[i]) :]
        else:
            raise ValueError(f"cannot split prompt batches: {key!r} is neither per-token nor an image tensor")
    return [PromptBatch(row, tuple(k for k in batch.image_keys if k in row), ids[image_bounds[i] : image_bounds[i + 1]])
            for i, row in enumerate(rows)]


def append_completions(batch: PromptBatch, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Inputs for prompt + completion: ids / mask (B, R) right-padded completions."""
    b, p = batch.inputs["input_ids"].shape
    if ids.shape[0] != b or mask.shape != ids.shape:
        raise ValueError(f"completions {tuple(ids.shape)} / mask {tuple(mask.shape)} do not match {b} prompts")
    out = {}
    for key, value in batch.inputs.items():
        if key == "input_ids":
            out[key] = torch.cat([value, ids.to(value)], dim=1)
        elif key == "attention_mask":
            out[key] = torch.cat([value, mask.to(value)], dim=1)
        elif key not in batch.image_keys and is_per_token(value, b, p):
            out[key] = torch.cat([value, torch.zeros_like(ids, dtype=value.dtype)], dim=1)  # e.g. mm_token_type_ids
        else:
            out[key] = value
    return out


def with_images(inputs: dict[str, Tensor], images: PromptBatch) -> dict[str, Tensor]:
    """The same token ids and positions with other image tensors (PAPO's masked branch). Masking keeps image
    sizes, so the number of image tokens and the 3-D positions are unchanged."""
    out = dict(inputs)
    for key in images.image_keys:
        if key.endswith("grid_thw") and not torch.equal(inputs[key].cpu(), images.inputs[key].cpu()):
            raise ValueError(f"masked images changed {key}: the masked branch must keep every image's size")
        if inputs[key].shape != images.inputs[key].shape:
            raise ValueError(f"masked {key} has shape {tuple(images.inputs[key].shape)}, expected {tuple(inputs[key].shape)}")
        out[key] = images.inputs[key]
    return out


def with_pixel_values(inputs: dict[str, Tensor], pixel_values: Tensor) -> dict[str, Tensor]:
    """``with_images`` for the patch-aligned fast path, which edits ``pixel_values`` directly."""
    if inputs["pixel_values"].shape != pixel_values.shape:
        raise ValueError(f"pixel_values shape {tuple(pixel_values.shape)} != {tuple(inputs['pixel_values'].shape)}")
    return {**inputs, "pixel_values": pixel_values.to(inputs["pixel_values"])}
