"""NoisyRollout's noised images (Liu et al. 2025, arXiv 2504.13055; the authors' code, NoisyRollout at 09347dd,
``verl/utils/image_aug.py`` and ``ray_trainer.py``).

The noise is a diffusion model's forward process at step k: with intensities x in [0, 1],
x_k = sqrt(abar_k) x + sqrt(1 - abar_k) eps, eps ~ N(0, 1), clipped to [0, 1] and truncated back to 8 bits.
Here abar_k = prod_{i <= k} (1 - beta_i) and beta = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5.
The step anneals over training: k_t = floor(alpha_0 * (1 - sigmoid(lambda * (t / T - gamma / T)))). The
authors' Geometry3K setting has alpha_0 = 500, lambda = 30, gamma = 40 and T = 60: the diffusion step falls
from 500 (noise standard deviation 0.505) to 250 at training step 40 (0.147) and to 3 by step 50. The noise is drawn from a generator keyed by (seed, sample, draw,
image), where the authors' is unseeded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from papo.data.images import to_rgb
from papo.data.masking import mask_rng

DIFFUSION_STEPS = 1000


def _alpha_bars() -> np.ndarray:
    x = np.linspace(-6.0, 6.0, DIFFUSION_STEPS, dtype=np.float64)
    betas = 1.0 / (1.0 + np.exp(-x)) * (0.5e-2 - 1e-5) + 1e-5
    return np.cumprod(1.0 - betas)


ALPHA_BARS = _alpha_bars()


def noise_step_at(step: int, total_steps: int, start: int = 500, decay: float = 30.0, mid_step: float = 40.0) -> int:
    """k_t: the diffusion step of training step ``step`` (counted from 1) of ``total_steps``. A ``mid_step``
    below 1 is a fraction of ``total_steps``: DVRP's schedule, k = alpha_0 sigmoid(gamma (0.5 - t / T)), is this
    one with mid_step 0.5 and decay gamma = 10."""
    if mid_step < 1:
        mid_step *= total_steps
    x = decay * (step / max(total_steps, 1) - mid_step / max(total_steps, 1))
    keep = 1.0 - 1.0 / (1.0 + math.exp(-x)) if x > -700 else 1.0
    return min(int(start * keep), DIFFUSION_STEPS - 1)


def noise_rng(seed: int, sample_id: Any, draw: int, image_index: int) -> np.random.Generator:
    """The noise's generator: keyed like the masks, in a stream of its own (a masked and a noised copy of the
    same image draw unrelated numbers)."""
    return mask_rng(seed, f"noise:{sample_id}", draw, image_index)


def diffusion_noise(image: Any, step: int, rng: np.random.Generator) -> Image.Image:
    """The image after ``step`` steps of the forward process; same size, RGB."""
    rgb = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    abar = float(ALPHA_BARS[step])
    noisy = math.sqrt(abar) * rgb + math.sqrt(1.0 - abar) * rng.standard_normal(rgb.shape, dtype=np.float32)
    return Image.fromarray((np.clip(noisy, 0.0, 1.0) * 255.0).astype(np.uint8))
