"""Small models shared by the model tests (built offline in well under a second each)."""

import functools

import torch

from papo.data.synthetic import make_sample
from papo.models.policy import Policy
from papo.models.tiny import build_tiny


@functools.lru_cache(maxsize=None)
def _tiny_state():
    model, processor = build_tiny("tiny", seed=0)
    return model.state_dict(), processor


def tiny_policy() -> Policy:
    """A fresh tiny Qwen2.5-VL policy (weights copied, so tests may train it)."""
    state, processor = _tiny_state()
    model, _ = build_tiny("tiny", seed=0)
    model.load_state_dict(state)
    return Policy(model, processor)


def mixed_batch(policy: Policy, n: int = 2):
    """Prompts of different lengths with images of different sizes: left padding and two image grids."""
    samples = [make_sample("count", "train", 0, 0, size=224), make_sample("maze", "train", 0, 1, size=168)][:n]
    prompts = [s.formatted_prompt() for s in samples]
    images = [s.load_images(None, None) for s in samples]
    return samples, prompts, images


def sharpen_vision(policy: Policy, scale: float = 30.0) -> None:
    """Random-init models ignore the image; scaling the vision merger makes image tokens matter."""
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "merger" in name and name.endswith("weight"):
                p.mul_(scale)
