"""The mathematics of GRPO, DAPO and PAPO as pure functions on tensors.

Nothing in this package imports a model, a tokenizer or the trainer: every function takes tensors with the
shapes written next to its arguments and returns tensors, so each can be tested against hand-computed values.
"""

from papo.algo.advantages import ADV_ESTIMATORS, group_advantages, group_index
from papo.algo.aggregation import AGG_MODES, TOKEN_MEAN_SCOPES, aggregate, masked_mean, micro_batch_weight
from papo.algo.filtering import FilterResult, GroupOutcomes, dapo_group_filter, group_outcomes
from papo.algo.kl import KL_ESTIMATORS, entropy_from_logits, kl_estimate
from papo.algo.objective import LossConfig, papo_loss
from papo.algo.perception import (
    APPLY_MODES,
    GAMMA_SCHEDULES,
    double_entropy_loss,
    entropy_band_loss,
    kl_prcp_coef_at,
    kl_prcp_tokens,
    kl_prcp_weights,
    perception_loss,
    perception_reward,
    relative_kl_prcp_coef,
    sampled_entropy,
    token_top_p_mask,
)
from papo.algo.surrogate import PolicyLossOutput, ppo_clip_loss
from papo.algo.visual_dependency import (
    dependency_range,
    mean_dependency,
    pgpo_advantages,
    pgpo_weights,
    token_dependency,
    top_dependent_tokens,
    trajectory_scales,
    vppo_advantages,
)

__all__ = [
    "ADV_ESTIMATORS", "AGG_MODES", "APPLY_MODES", "GAMMA_SCHEDULES", "KL_ESTIMATORS", "TOKEN_MEAN_SCOPES",
    "FilterResult", "GroupOutcomes", "LossConfig", "PolicyLossOutput",
    "aggregate", "dapo_group_filter", "double_entropy_loss", "entropy_band_loss", "entropy_from_logits", "group_advantages",
    "group_outcomes",
    "group_index", "kl_estimate", "kl_prcp_coef_at", "kl_prcp_tokens", "kl_prcp_weights", "masked_mean", "micro_batch_weight",
    "papo_loss", "perception_loss", "perception_reward", "ppo_clip_loss", "relative_kl_prcp_coef", "sampled_entropy",
    "token_top_p_mask", "dependency_range", "mean_dependency", "token_dependency", "top_dependent_tokens",
    "trajectory_scales", "vppo_advantages", "pgpo_advantages", "pgpo_weights",
]
