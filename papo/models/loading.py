"""Load any image-text-to-text model and its processor through the transformers Auto classes, offline-safe.

Pitfalls handled here (each has a test):
  * torchvision may be absent: Qwen-VL processors then cannot build their video processor, so papo uses an
    image-only subclass (same class name, so directories it saves stay loadable by ``AutoProcessor``).
  * ``AutoProcessor`` can silently return a bare tokenizer: the loader checks for an image processor.
  * ``min_pixels=`` / ``max_pixels=`` passed to a Qwen image-processor constructor mutate the class-level
    ``size`` dict for every later instance: papo assigns a fresh dict to the instance instead.
  * ``from_config(cfg, dtype=...)`` mutates ``cfg``: papo builds from a deep copy.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, ProcessorMixin
from transformers.utils import cached_file, is_torchvision_available

from papo.errors import UserError
from papo.models.checkpointing import set_checkpointing
from papo.models.precision import dtype_of

log = logging.getLogger(__name__)

_TOKEN_ATTRS = ("image_token", "video_token", "vision_start_token", "vision_end_token")
_DEFAULT_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                   "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
_IMAGE_ONLY: dict[type, type] = {}


def image_only_processor_class(base: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of a Qwen-VL-style processor without the (torchvision-only) video processor.

    ``ProcessorMixin`` derives its sub-processors from the ``__init__`` signature, so dropping the
    ``video_processor`` argument is enough; the token attributes the base ``__init__`` would set are set here."""
    if base in _IMAGE_ONLY:
        return _IMAGE_ONLY[base]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        for attr in _TOKEN_ATTRS:
            token = getattr(tokenizer, attr, None) or _DEFAULT_TOKENS[attr]
            setattr(self, attr, token)
            setattr(self, f"{attr}_id", getattr(tokenizer, f"{attr}_id", None) or tokenizer.convert_tokens_to_ids(token))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    # same __name__: save_pretrained records the stock class, which AutoProcessor finds where torchvision exists
    cls = type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__, "__doc__": f"Image-only {base.__name__}."})
    _IMAGE_ONLY[base] = cls
    return cls


def _processor_class(name_or_path: str, **hub_kwargs: Any) -> type | None:
    """The processor class a checkpoint declares (processor_config.json), else the one mapped to its config."""
    for filename in ("processor_config.json", "preprocessor_config.json"):
        path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path:
            name = json.loads(open(path).read()).get("processor_class")
            if name and hasattr(transformers, name):
                return getattr(transformers, name)
    try:
        config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    except (OSError, ValueError):
        return None
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    return PROCESSOR_MAPPING.get(type(config), None)


def set_pixel_bounds(processor: ProcessorMixin, min_pixels: int | None, max_pixels: int | None) -> None:
    """Bound the processor's own resize (Qwen ``smart_resize``) without touching class-level defaults."""
    if min_pixels is None and max_pixels is None:
        return
    ip = processor.image_processor
    size = dict(getattr(ip, "size", None) or {})
    if "shortest_edge" not in size or "longest_edge" not in size:
        raise UserError(f"{type(ip).__name__} has no min/max pixel bounds (size={size}); leave them unset")
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    ip.size = type(ip.size)(**size) if not isinstance(ip.size, dict) else size


def load_processor(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None,
                   **hub_kwargs: Any) -> ProcessorMixin:
    """The processor of a local dir or hub id, working with or without torchvision."""
    base = _processor_class(str(name_or_path), **hub_kwargs)
    needs_video = base is not None and "video_processor" in inspect.signature(base.__init__).parameters
    if needs_video and not is_torchvision_available():
        processor = image_only_processor_class(base).from_pretrained(name_or_path, **hub_kwargs)
    else:
        processor = AutoProcessor.from_pretrained(name_or_path, **hub_kwargs)
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise UserError(
            f"{name_or_path}: AutoProcessor returned {type(processor).__name__}, not an image-text processor "
            "(missing processor_config.json / preprocessor_config.json?)"
        )
    set_pixel_bounds(processor, min_pixels, max_pixels)
    return processor


@dataclass(frozen=True)
class ModelOptions:
    param_dtype: str = "float32"  # float32 | bfloat16 | float16: what the weights are stored in (papo.models.precision)
    attn_implementation: str | None = None  # sdpa (transformers default) | eager | flash_attention_2
    freeze_vision: bool = False  # official PAPO trains the vision tower
    gradient_checkpointing: bool | str = False  # false / true (full) / "selective" (papo.models.checkpointing)
    lora_rank: int = 0  # > 0: wrap with a peft LoRA adapter on the language model's linear layers
    lora_alpha: int = 16
    lora_target: str = "all-linear"
    padding_free: bool = True  # Policy: scoring and update forwards without padding (papo.models.packing)
    share_prompts: bool = True  # Policy: packed forwards hold one copy of a prompt its rows share
    compile_layers: bool = False  # Policy: scoring and update forwards through compiled blocks and head
    uncheckpointed_layers: int = 0  # under checkpointing, the last decoder layers that keep their activations

    def torch_dtype(self) -> torch.dtype:
        return dtype_of(self.param_dtype)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Instances of the model's no-split classes (``_no_split_modules``: Qwen2.5-VL's decoder layers and vision
    blocks), in module order: what FSDP shards and compilation wraps one by one (sharded ones too, whose class
    FSDP2 has swapped for a subclass)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if plain_class(m).__name__ in names]


def vision_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of the vision tower (Qwen ``visual``, LLaVA ``vision_tower`` + ``multi_modal_projector``)."""
    names = ("visual", "vision_tower", "vision_model", "multi_modal_projector")
    return [p for n, p in model.named_parameters() if any(f".{k}." in f".{n}" for k in names)]


def prepare_model(model: torch.nn.Module, opts: ModelOptions) -> torch.nn.Module:
    if opts.attn_implementation:
        model.set_attn_implementation(opts.attn_implementation)
    if opts.freeze_vision:
        for p in vision_parameters(model):
            p.requires_grad_(False)
    set_checkpointing(model, opts.gradient_checkpointing, opts.uncheckpointed_layers)
    if opts.lora_rank > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError("LoRA needs peft: pip install peft") from None
        # vision weights stay frozen under LoRA; the adapter goes on the language model only
        target = opts.lora_target if opts.lora_target != "all-linear" else r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        model = get_peft_model(model, LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha, target_modules=target))
    return model


def resolve_device(device: str) -> str:
    """"auto" -> cuda where available, else cpu; an explicit cuda without a GPU is an error, not a fallback."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return device


def load_model(name_or_path: str, opts: ModelOptions = ModelOptions(), device: str | torch.device = "cpu",
               **hub_kwargs: Any) -> torch.nn.Module:
    """``AutoModelForImageTextToText.from_pretrained`` plus the options above."""
    kwargs: dict[str, Any] = {"dtype": opts.torch_dtype(), **hub_kwargs}
    if opts.attn_implementation:
        kwargs["attn_implementation"] = opts.attn_implementation
    if torch.device(device).type == "cuda":  # straight onto the GPU: no host copy of a multi-GB model
        kwargs.setdefault("device_map", str(device))
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs).to(device)
    return prepare_model(model, opts)


def model_from_config(config: Any, dtype: torch.dtype = torch.float32, seed: int | None = None) -> torch.nn.Module:
    """Random-init model of ``config`` (a deep copy is used: from_config with dtype mutates its argument)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(copy.deepcopy(config))
    return model.to(dtype)


def plain_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps in a subclass that mixes in ``FSDPModule``."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
