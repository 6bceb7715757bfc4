"""``Policy``: a model, its processor and the token support they share, behind the small interface the
trainer, SFT and evaluation use (encode prompts, decode responses, score log-probs, save). Sampling lives in
``papo.rollout`` and image masking in ``papo.data.masking``: the bundle holds neither an engine nor a mask."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from papo.data.hub import is_hub_id
from papo.data.sample import Sample
from papo.models.attention import use_packed_text_attention, use_packed_vision_attention
from papo.models.compiled import compiled_calls, routed
from papo.models.image_features import computes_image_features
from papo.models.inputs import (
    PromptBatch,
    append_completions,
    encode_prompts,
    to_device,
    tokenize_completions,
    with_images,
)
from papo.models.loading import ModelOptions, load_model, load_processor, plain_class, transformer_blocks
from papo.models.logprobs import compiled_head, response_logprobs, suppress_mask, suppressed_token_ids
from papo.models.lora import lora_scalings, merge_lora
from papo.models.precision import Precision

DEFAULT_MODEL = "default"  # the warm-started tiny Qwen2.5-VL shipped inside the package


def default_model_dir() -> Path:
    return Path(str(resources.files("papo") / "assets" / "default-model"))


def resolve_model(name_or_path: str | None) -> str:
    """``None`` / "default" -> the embedded checkpoint; anything else is a local dir or hub id."""
    if name_or_path in (None, "", DEFAULT_MODEL):
        path = default_model_dir()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the embedded default model is missing from {path}; reinstall papo")
        return str(path)
    local = Path(str(name_or_path)).expanduser()
    if local.exists():
        return str(local)
    if not is_hub_id(str(name_or_path)):  # else the hub client fails with a message about repo id syntax
        raise FileNotFoundError(f"model {str(name_or_path)!r} not found: no such directory, and not a hub id (owner/name)")
    return str(name_or_path)


class RootCall(torch.nn.Module):
    """One module call around any function of a model. papo scores and samples by calling parts of a model
    (its backbone, its head in chunks, ``generate``) rather than its forward; a sharded model (FSDP2) gathers
    its root parameters (embeddings, head, norms) and schedules their gradient reduction in the hooks of a
    module call, so every such function runs as ``root(fn, *args)``, which calls ``fn(model, *args)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


class Policy:
    """``compute_dtype``: what forwards and rollouts run in (None: the parameters' dtype); with float32
    parameters and bfloat16 compute, scoring and updates run under autocast and the rollout engine keeps its
    own bfloat16 copy of the weights (``papo.models.precision``). ``padding_free``: scoring and update forwards
    pack each batch's sequences without padding where the model allows it (``papo.models.packing``), with one
    copy of each prompt that several rows share (``share_prompts``).
    ``compile_layers``: inside ``compiled_passes`` (the trainer's scoring and update) the transformer blocks
    and the log-prob head run compiled (``papo.models.compiled``); generation stays eager."""

    def __init__(self, model: Any, processor: Any, min_pixels: int | None = None, max_pixels: int | None = None,
                 compute_dtype: torch.dtype | None = None, padding_free: bool = True, compile_layers: bool = False,
                 share_prompts: bool = True):
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.root = RootCall(model)  # what a sharded model is wrapped in (papo.training.sharding)
        param_dtype = next(model.parameters()).dtype
        self.precision = Precision(param_dtype, compute_dtype or param_dtype)
        use_packed_vision_attention(model)  # one SDPA call per image size instead of one per image or window
        if padding_free:  # scoring and update forwards skip padding (papo.models.packing)
            use_packed_text_attention(model)
        # papo resizes images with PAPO's rule before the processor; None keeps the dataset's pixels
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.suppress_ids = suppressed_token_ids(model.config, model.get_output_embeddings().weight.shape[0], self.tokenizer)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.suppress = suppress_mask(self.suppress_ids, vocab, model.device)
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id]
        self.eos_ids = sorted({int(e) for e in eos} | {int(self.tokenizer.eos_token_id)})
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self.compile_layers, self.share_prompts = compile_layers, share_prompts
        self._compiled: dict[int, dict] = {}  # per scoring model (policy, reference): its layers' compiled calls

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, opts: ModelOptions = ModelOptions(), device: str = "cpu",
                        min_pixels: int | None = None, max_pixels: int | None = None,
                        processor_min_pixels: int | None = None, processor_max_pixels: int | None = None,
                        compute_dtype: torch.dtype | None = None) -> Policy:
        path = resolve_model(name_or_path)
        processor = load_processor(path, processor_min_pixels, processor_max_pixels)
        _warn_if_processor_shrinks(processor, min_pixels, path)
        return cls(load_model(path, opts, device), processor, min_pixels, max_pixels, compute_dtype, opts.padding_free,
                   opts.compile_layers, opts.share_prompts)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def patch_size(self) -> int:
        """The vision encoder's patch side in pixels (PAPO masks patches of this size)."""
        return int(getattr(self.processor.image_processor, "patch_size", None) or 14)

    # ------------------------------------------------------------- prompts and sampling

    def load_images(self, sample: Sample) -> list[Image.Image]:
        return sample.load_images(self.min_pixels, self.max_pixels)

    def encode(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> PromptBatch:
        return encode_prompts(self.processor, prompts, images)

    def decode(self, completions: Any) -> list[str]:
        """Response texts of ``papo.rollout.Completions``."""
        return self.tokenizer.batch_decode(completions.token_lists(), skip_special_tokens=True)

    def tokenize_completions(self, texts: Sequence[str], add_eos: bool = True) -> tuple[Tensor, Tensor]:
        """Right-padded (ids, mask) of completion texts, e.g. SFT targets."""
        return tokenize_completions(self.tokenizer, texts, self.eos_ids[0] if add_eos else None, self.pad_id)

    # ------------------------------------------------------------- scoring

    def logprobs(self, batch: PromptBatch, ids: Tensor, mask: Tensor, temperature: float = 1.0,
                 images: PromptBatch | None = None, with_entropy: bool = False,
                 chunk_tokens: int = 2048, model: RootCall | None = None) -> tuple[Tensor, Tensor | None]:
        """Log-probs (B, R) of completions ``ids`` after ``batch``'s prompts; ``images`` swaps in other image
        tensors with the same token ids and positions (the masked branch); ``model`` scores with another model
        that shares the processor (the reference policy, as a ``RootCall``)."""
        if images is not None:  # swapped on the host, where the image grids are compared
            batch = PromptBatch(with_images(batch.inputs, images), batch.image_keys, images.image_ids)
        mask = to_device(mask, self.device)
        inputs = append_completions(batch.to(self.device), to_device(ids, self.device), mask)
        if "image_grid_thw" in inputs and computes_image_features(self.model):
            inputs["image_grid_thw"] = batch.inputs["image_grid_thw"]  # read on the host: no copy back from the GPU
        with self.precision.autocast(self.device):
            return (model or self.root)(response_logprobs, inputs, mask, temperature, self.suppress,
                                        chunk_tokens, with_entropy, batch.image_ids, self.share_prompts)

    @contextlib.contextmanager
    def compiled_passes(self, *others: RootCall | None) -> Iterator[None]:
        """The region where this policy's transformer blocks (decoder layers and vision blocks) and log-prob head
        (and those of ``others``, e.g. the reference model) run compiled, with ``compile_layers``. It must hold the backward too: activation
        checkpointing recomputes each layer there, and the recomputation must run the same code as the forward."""
        if not self.compile_layers:
            yield
            return
        calls: dict = {}
        for root in {id(r): r for r in (self.root, *others) if r is not None}.values():
            if id(root) not in self._compiled:
                self._compiled[id(root)] = compiled_calls(transformer_blocks(root.model))
            calls.update(self._compiled[id(root)])
        with routed(calls), compiled_head():
            yield

    def save(self, out_dir: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """A Hugging Face directory: safetensors, config, generation config, processor, tokenizer, chat template.
        ``state_dict``: the whole model's tensors when the live model is sharded (gathered by the caller)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.model
        if hasattr(model, "get_base_model"):  # LoRA: the base model with the adapters merged into its weights
            state_dict = merge_lora(model.state_dict() if state_dict is None else state_dict, lora_scalings(model))
            model = model.get_base_model()
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
        plain = plain_class(model).__name__
        config = json.loads((out / "config.json").read_text())
        if config.get("architectures") != [plain]:  # FSDP2's subclass name must not reach the Auto classes
            config["architectures"] = [plain]
            (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.processor.save_pretrained(out)
        return out


def _warn_if_processor_shrinks(processor: Any, min_pixels: int | None, path: str) -> None:
    """The processor resizes again after papo's pixel bounds: a processor whose own maximum is below
    ``min_pixels`` (the tiny models' 224 x 224) silently gives fewer image tokens than the bounds promise."""
    size = getattr(processor.image_processor, "size", None)
    longest = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    if min_pixels and longest and min_pixels > longest:
        warnings.warn(f"data.min_pixels={min_pixels} exceeds the maximum of {path}'s image processor ({longest} pixels): "
                      f"the processor shrinks every image to at most {longest} pixels again", UserWarning, stacklevel=3)
