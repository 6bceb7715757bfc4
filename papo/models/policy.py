"""``Policy``: a model, its processor and the token support they share, behind the small interface the
trainer, SFT and evaluation use (encode prompts, sample, decode, score log-probs, save)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from papo.data.hub import is_hub_id
from papo.data.sample import Sample
from papo.images import resize_to_pixel_bounds
from papo.masking import corrupt_images
from papo.models.attention import use_packed_vision_attention
from papo.models.generation import ENGINES, Completions, SamplingParams, hf_generate
from papo.models.inputs import PromptBatch, append_completions, encode_prompts, tokenize_completions, with_images
from papo.models.loading import ModelOptions, load_model, load_processor
from papo.models.logprobs import response_logprobs, suppress_mask, suppressed_token_ids
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


class Policy:
    """``compute_dtype``: what forwards and rollouts run in (None: the parameters' dtype); with float32
    parameters and bfloat16 compute, scoring and updates run under autocast and the rollout engine keeps its
    own bfloat16 copy of the weights (``papo.models.precision``)."""

    def __init__(self, model: Any, processor: Any, min_pixels: int | None = None, max_pixels: int | None = None,
                 compute_dtype: torch.dtype | None = None):
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        param_dtype = next(model.parameters()).dtype
        self.precision = Precision(param_dtype, compute_dtype or param_dtype)
        use_packed_vision_attention(model)  # one SDPA call per image size instead of one per image or window
        # papo resizes images with PAPO's rule before the processor; None keeps the dataset's pixels
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.suppress_ids = suppressed_token_ids(model, self.tokenizer)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.suppress = suppress_mask(self.suppress_ids, vocab, model.device)
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id]
        self.eos_ids = sorted({int(e) for e in eos} | {int(self.tokenizer.eos_token_id)})
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self.rollout_engine = "auto"
        self.rollout_compile = True  # papo.rollout compiles on CUDA unless False
        self._engine = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, opts: ModelOptions = ModelOptions(), device: str = "cpu",
                        min_pixels: int | None = None, max_pixels: int | None = None,
                        processor_min_pixels: int | None = None, processor_max_pixels: int | None = None,
                        compute_dtype: torch.dtype | None = None) -> "Policy":
        path = resolve_model(name_or_path)
        processor = load_processor(path, processor_min_pixels, processor_max_pixels)
        return cls(load_model(path, opts, device), processor, min_pixels, max_pixels, compute_dtype)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------- prompts and sampling

    def load_images(self, sample: Sample) -> list[Image.Image]:
        return sample.load_images(self.min_pixels, self.max_pixels)

    def load_image_pair(self, sample: Sample, masking: Any, seed: int, draw: int = 0) -> tuple[list[Image.Image], list[Image.Image]]:
        """(full, masked) images of a sample. As in the official code, the mask is drawn on the decoded image at
        its original resolution and both copies then go through the same resize, so their token grids match."""
        raw = sample.load_images(None, None)
        masked = corrupt_images(raw, masking, seed, sample.id, draw)
        if self.min_pixels is None and self.max_pixels is None:
            return raw, masked
        lo, hi = self.min_pixels or 1, self.max_pixels or 1 << 62
        return [resize_to_pixel_bounds(im, lo, hi) for im in raw], [resize_to_pixel_bounds(im, lo, hi) for im in masked]

    def encode(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> PromptBatch:
        return encode_prompts(self.processor, prompts, images)

    def generate(self, batch: PromptBatch, params: SamplingParams, n: int = 1) -> Completions:
        """``n`` completions per prompt, prompt-major. On CUDA, models ``papo.rollout`` supports decode there
        (``rollout_engine``: "auto", or "papo" / "hf" to force one); the rest through transformers ``generate``."""
        if self._engine_on():
            if self._engine is None:
                from papo.rollout import RolloutEngine

                self._engine = RolloutEngine(self.model, self.suppress_ids, self.eos_ids, self.pad_id,
                                             compile=None if self.rollout_compile else False,
                                             dtype=self.precision.compute_dtype)
            self._engine.load_weights(self.model.named_parameters())  # the engine samples from the current weights
            return self._engine.generate(batch, params, n)[0]
        with self.precision.autocast(self.device):
            return hf_generate(self.model, batch, params, self.suppress_ids, self.eos_ids, self.pad_id, n)

    def release_rollout_memory(self) -> None:
        """Drop the rollout engine's KV cache (kept between calls to save re-allocating in evaluation)."""
        if self._engine is not None:
            self._engine.release()

    def _engine_on(self) -> bool:
        if self.rollout_engine not in ENGINES:
            raise ValueError(f"rollout engine must be one of {ENGINES}, got {self.rollout_engine!r}")
        if self.rollout_engine == "hf":
            return False
        from papo.rollout import supports

        if self.rollout_engine == "papo":
            if not supports(self.model):
                raise ValueError(f"papo.rollout cannot decode {type(self.model).__name__}; use rollout engine 'hf' or 'auto'")
            return True
        return self.device.type == "cuda" and supports(self.model)

    def decode(self, completions: Completions) -> list[str]:
        return self.tokenizer.batch_decode(completions.token_lists(), skip_special_tokens=True)

    def tokenize_completions(self, texts: Sequence[str], add_eos: bool = True) -> tuple[Tensor, Tensor]:
        """Right-padded (ids, mask) of completion texts, e.g. SFT targets."""
        return tokenize_completions(self.tokenizer, texts, self.eos_ids[0] if add_eos else None, self.pad_id)

    # ------------------------------------------------------------- scoring

    def logprobs(self, batch: PromptBatch, ids: Tensor, mask: Tensor, temperature: float = 1.0,
                 images: PromptBatch | None = None, with_entropy: bool = False,
                 chunk_tokens: int = 2048, model: Any = None) -> tuple[Tensor, Tensor | None]:
        """Log-probs (B, R) of completions ``ids`` after ``batch``'s prompts; ``images`` swaps in other image
        tensors with the same token ids and positions (the masked branch); ``model`` scores with another model
        that shares the processor (the reference policy)."""
        inputs = append_completions(batch.to(self.device), ids.to(self.device), mask.to(self.device))
        if images is not None:
            inputs = with_images(inputs, images)
        with self.precision.autocast(self.device):
            return response_logprobs(model or self.model, inputs, mask.to(self.device), temperature, self.suppress,
                                     chunk_tokens, with_entropy)

    def save(self, out_dir: str | Path) -> Path:
        """A Hugging Face directory: safetensors, config, generation config, processor, tokenizer, chat template."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.model
        if hasattr(model, "merge_and_unload"):  # LoRA: write merged weights, keep the live adapter untouched
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(out, safe_serialization=True)
        self.processor.save_pretrained(out)
        return out
