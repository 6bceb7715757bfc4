"""The full per-micro-batch PAPO objective, composed from the pure pieces.

    L = PG_clip                                  (ppo_clip_loss)
      + beta  * agg(k3(ref - logp))              (reference KL, GRPO presets only)
      - gamma * agg(w * k3(masked - logp))       (implicit perception loss, maximised)
      + eta_1 * d * H(full) + eta_2 * d * H(masked)   (double entropy, a penalty)
      + lambda * agg(k3(noised - logp))            (DVRP's robustness to a noised image, off by default)

Variants (off by default): ``kl_prcp_relative`` sizes gamma per micro-batch as a fraction of |PG|;
``entropy_band`` replaces the always-down entropy push by hinges outside [h_min, h_max].

GRPO and DAPO are the same function with gamma = eta = 0; nothing here branches on the algorithm name.
Official gradient flow detaches the masked branch (``masked_grad=False``): KL_prcp then trains only through
the full-image log-probs and the masked entropy term has zero gradient (authors, PAPO issue #20).
``masked_grad=True`` is the paper's literal objective (official ``RECOMPUTE_AUG_LOG_PROBS=True``): the caller
recomputes masked log-probs with grad and both branches receive gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from papo.algo.aggregation import AGG_MODES, aggregate, masked_mean
from papo.algo.kl import canonical_kl_estimator, kl_estimate
from papo.algo.perception import (
    double_entropy_loss,
    entropy_band_loss,
    perception_loss,
    relative_kl_prcp_coef,
    sampled_entropy,
)
from papo.algo.surrogate import ppo_clip_loss

ENTROPY_ESTIMATORS = ("sampled", "exact")


@dataclass
class LossConfig:
    """Loss hyper-parameters. Defaults are the official PAPO-G (3B) values; gamma = 0 gives plain GRPO."""

    clip_low: float = 0.2  # eps_low
    clip_high: float = 0.3  # eps_high (0.28 for DAPO / PAPO-D)
    dual_clip: float | None = 3.0  # c for negative advantages; None disables
    loss_agg: str = "token-mean"
    norm_length: int | None = None  # only for seq-mean-token-sum-norm
    kl_ref_coef: float = 0.0  # beta (0.01 in the GRPO presets)
    kl_ref_estimator: str = "low_var_kl"
    kl_prcp_coef: float = 0.02  # gamma
    kl_prcp_estimator: str = "low_var_kl"
    kl_prcp_clip: float | None = None  # per-token cap, official experimental value 0.2
    kl_prcp_token_top_p: float | None = None  # keep top-p tokens per sequence, official value 0.2
    entropy_coef: float = 0.0  # eta_1, full image
    masked_entropy_coef: float = 0.0  # eta_2, masked image
    entropy_estimator: str = "sampled"  # official one-sample NLL, or "exact" full-vocabulary entropy
    masked_grad: bool = False  # official: masked branch detached
    # variants from a third-party write-up (docs/algorithm.md says how each differs from the authors' code)
    kl_prcp_relative: bool = False  # kl_prcp_coef is then the perception term's size as a fraction of |pg_loss|
    entropy_band: tuple[float, float] | None = None  # (h_min, h_max): band-limited double entropy
    entropy_band_coef: float = 0.0
    # DVRP: + coef * agg(k3(noised - logp)), the KL to a lightly noised view, minimised (0: off)
    kl_noise_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("clip_low", "clip_high"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        for name in ("kl_ref_coef", "kl_prcp_coef", "entropy_coef", "masked_entropy_coef", "kl_noise_coef"):
            if getattr(self, name) < 0:
                why = " (KL_prcp is maximised by a positive gamma)" if name == "kl_prcp_coef" else ""
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}{why}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 or None, got {self.dual_clip}")
        if self.loss_agg not in AGG_MODES:
            raise ValueError(f"loss_agg must be one of {', '.join(AGG_MODES)}, got {self.loss_agg!r}")
        canonical_kl_estimator(self.kl_ref_estimator)
        canonical_kl_estimator(self.kl_prcp_estimator)
        if self.kl_prcp_clip is not None and self.kl_prcp_clip <= 0:
            raise ValueError(f"kl_prcp_clip must be > 0 or None, got {self.kl_prcp_clip}")
        if self.kl_prcp_token_top_p is not None and not 0 < self.kl_prcp_token_top_p <= 1:
            raise ValueError(f"kl_prcp_token_top_p must be in (0, 1] or None, got {self.kl_prcp_token_top_p}")
        if self.entropy_band is not None and not (len(self.entropy_band) == 2 and 0 <= self.entropy_band[0] < self.entropy_band[1]):
            raise ValueError(f"entropy_band must be (h_min, h_max) with 0 <= h_min < h_max, got {self.entropy_band}")
        if self.entropy_band_coef < 0 or (self.entropy_band_coef > 0 and self.entropy_band is None):
            raise ValueError("entropy_band_coef must be >= 0, and > 0 only with an entropy_band")
        if self.entropy_estimator not in ENTROPY_ESTIMATORS:
            raise ValueError(f"entropy_estimator must be one of {', '.join(ENTROPY_ESTIMATORS)}, got {self.entropy_estimator!r}")

    @property
    def uses_masked_branch(self) -> bool:
        return self.kl_prcp_coef > 0 or self.masked_entropy_coef > 0

    @property
    def masked_forward_in_update(self) -> bool:
        """Does the update need its own masked-image forward? With ``masked_grad`` (gradient through both
        branches) or for exact masked entropies; otherwise step 5's no-grad masked log-probs serve. Whether
        gradient flows through the masked branch is decided in ``papo_loss`` alone (``masked_grad``)."""
        return self.masked_grad or (self.entropy_estimator == "exact" and self.masked_entropy_coef > 0)

    def to_dict(self) -> dict:
        return asdict(self)


def papo_loss(
    cfg: LossConfig,
    log_probs: Tensor,  # (B, T) log pi_theta(o_t | q, I), with grad
    old_log_probs: Tensor,  # (B, T) log pi_old(o_t | q, I), no grad
    advantages: Tensor,  # (B,) or (B, T)
    mask: Tensor,  # (B, T) 1 for response tokens
    masked_log_probs: Tensor | None = None,  # (B, T) log pi(o_t | q, I_mask); needed when gamma or eta_2 > 0
    ref_log_probs: Tensor | None = None,  # (B, T) log pi_ref(o_t | q, I); needed when beta > 0
    kl_prcp_coef: float | None = None,  # scheduled gamma for this step; None = cfg.kl_prcp_coef
    kl_prcp_weights: Tensor | None = None,  # (B,) per-response w_i; None = 1 ("all", official)
    entropies: Tensor | None = None,  # (B, T) exact per-token entropy, full image (entropy_estimator="exact")
    masked_entropies: Tensor | None = None,  # (B, T) exact per-token entropy, masked image
    noised_log_probs: Tensor | None = None,  # (B, T) log pi_old(o_t | q, I_noise), no grad; needed when kl_noise_coef > 0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss (scalar, with grad) and detached scalar metrics."""
    if log_probs.shape != mask.shape or old_log_probs.shape != mask.shape:
        raise ValueError(f"log_probs {tuple(log_probs.shape)}, old_log_probs {tuple(old_log_probs.shape)} and mask {tuple(mask.shape)} differ")
    gamma = cfg.kl_prcp_coef if kl_prcp_coef is None else kl_prcp_coef
    # d: the official annealing scales the entropy terms by gamma_now / gamma_config
    scale = gamma / cfg.kl_prcp_coef if cfg.kl_prcp_coef > 0 else 1.0
    agg = dict(agg=cfg.loss_agg, norm_length=cfg.norm_length)

    pg = ppo_clip_loss(log_probs, old_log_probs, advantages, mask, cfg.clip_low, cfg.clip_high, cfg.dual_clip, **agg)
    loss = pg.loss
    metrics: dict[str, Tensor] = {
        "pg_loss": pg.loss.detach(),
        "clipfrac_high": pg.clipfrac_high,
        "clipfrac_low": pg.clipfrac_low,
        "clipfrac_dual": pg.clipfrac_dual,
        "pg_clipfrac_higher": pg.pg_clipfrac_higher,
        "pg_clipfrac_lower": pg.pg_clipfrac_lower,
        "ppo_kl": pg.ppo_kl,
    }

    if cfg.kl_ref_coef > 0:
        if ref_log_probs is None:
            raise ValueError("kl_ref_coef > 0 needs ref_log_probs")
        ref_kl = aggregate(kl_estimate(log_probs, ref_log_probs.detach(), cfg.kl_ref_estimator), mask, cfg.loss_agg, cfg.norm_length)
        loss = loss + cfg.kl_ref_coef * ref_kl
        metrics["ref_kl"] = ref_kl.detach()

    if masked_log_probs is not None:
        if cfg.masked_grad:
            if torch.is_grad_enabled() and log_probs.requires_grad and not masked_log_probs.requires_grad:
                raise ValueError("masked_grad=True needs masked_log_probs recomputed with grad")
        else:
            masked_log_probs = masked_log_probs.detach()
            masked_entropies = None if masked_entropies is None else masked_entropies.detach()
    elif cfg.uses_masked_branch:
        raise ValueError("kl_prcp_coef or masked_entropy_coef > 0 needs masked_log_probs")

    if masked_log_probs is not None:
        prcp_term, kl_prcp = perception_loss(
            log_probs, masked_log_probs, mask, gamma, kl_prcp_weights, cfg.kl_prcp_estimator,
            cfg.kl_prcp_clip, cfg.kl_prcp_token_top_p, **agg,
        )
        if cfg.kl_prcp_relative and gamma > 0:
            gamma = relative_kl_prcp_coef(gamma, pg.loss, kl_prcp)
            prcp_term = -gamma * kl_prcp
        if gamma > 0:
            loss = loss + prcp_term
        metrics["kl_prcp"] = kl_prcp.detach()
        metrics["kl_prcp_coef"] = torch.as_tensor(gamma, dtype=torch.float32).detach()

    if noised_log_probs is not None:  # DVRP's robustness: stay close to the policy on a lightly noised image
        kl_noise = aggregate(kl_estimate(log_probs, noised_log_probs.detach(), "low_var_kl"), mask,
                             cfg.loss_agg, cfg.norm_length)
        if cfg.kl_noise_coef > 0:
            loss = loss + cfg.kl_noise_coef * kl_noise
        metrics["kl_noise"] = kl_noise.detach()
    elif cfg.kl_noise_coef > 0:
        raise ValueError("kl_noise_coef > 0 needs noised_log_probs")

    entropy = _entropy(cfg, log_probs, entropies, mask)
    # exact masked entropies exist only when the masked branch's forward returned them (a loss term needs them);
    # without them the masked entropy is not logged rather than estimated another way
    no_exact = cfg.entropy_estimator == "exact" and masked_entropies is None and cfg.masked_entropy_coef == 0
    masked_entropy = None if masked_log_probs is None or no_exact else _entropy(cfg, masked_log_probs, masked_entropies, mask)
    metrics["entropy"] = entropy.detach()
    if masked_entropy is not None:
        metrics["masked_entropy"] = masked_entropy.detach()
    if cfg.entropy_coef > 0 or cfg.masked_entropy_coef > 0:
        loss = loss + double_entropy_loss(
            entropy, masked_entropy if masked_entropy is not None else torch.zeros(()),
            cfg.entropy_coef, cfg.masked_entropy_coef, scale,
        )
    if cfg.entropy_band_coef > 0:
        band = entropy_band_loss(entropy, masked_entropy, *cfg.entropy_band, cfg.entropy_band_coef)
        loss = loss + band
        metrics["entropy_band_loss"] = band.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def _entropy(cfg: LossConfig, log_probs: Tensor, exact: Tensor | None, mask: Tensor) -> Tensor:
    if cfg.entropy_estimator == "sampled":
        return sampled_entropy(log_probs, mask)
    if exact is None:
        raise ValueError("entropy_estimator='exact' needs per-token entropies from the model forward")
    return masked_mean(exact.float(), mask)
