"""Models: loading any image-text-to-text model, the tiny Qwen2.5-VL family, inputs, log-probs, precision, and
``Policy`` (model + processor + token support)."""

from papo.models.loading import ModelOptions, load_model, load_processor
from papo.models.policy import DEFAULT_MODEL, Policy, default_model_dir, resolve_model

__all__ = ["DEFAULT_MODEL", "ModelOptions", "Policy", "default_model_dir", "load_model", "load_processor", "resolve_model"]
