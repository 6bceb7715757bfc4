import dataclasses

import pytest
import torch
from conftest import close

from papo.algo import LossConfig, aggregate, kl_estimate, papo_loss, ppo_clip_loss

B, T = 6, 10


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    new = (old + torch.randn(B, T, generator=g) * 0.3).requires_grad_()
    masked = old + torch.randn(B, T, generator=g)
    ref = old + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    mask = (torch.arange(T)[None] < torch.randint(2, T + 1, (B, 1), generator=g)).long()
    return new, old, masked, ref, adv, mask


def _official_float64(new, old, masked, ref, adv, mask, c: LossConfig):
    """The official per-micro-batch loss written out from the paper/code description, in float64."""
    l, o, a, r, m = (t.double() for t in (new, old, masked, ref, mask))
    A = adv.double()[:, None]
    n = m.sum()
    ratio = torch.exp(l - o)
    pg = torch.maximum(-A * ratio, -A * ratio.clamp(1 - c.clip_low, 1 + c.clip_high))
    pg = torch.where(A < 0, torch.minimum(pg, -A * c.dual_clip), pg)

    def k3(x):
        return (torch.exp(x) - x - 1).clamp(max=10)

    total = (pg * m).sum() / n
    total = total + c.kl_ref_coef * (k3(r - l) * m).sum() / n
    total = total - c.kl_prcp_coef * (k3(a - l) * m).sum() / n
    total = total + c.entropy_coef * (-l * m).sum() / n + c.masked_entropy_coef * (-a * m).sum() / n
    return total


PRESETS = {
    "grpo": LossConfig(kl_prcp_coef=0.0, kl_ref_coef=0.01),
    "papo_g": LossConfig(kl_prcp_coef=0.02, kl_ref_coef=0.01),
    "papo_g_7b": LossConfig(kl_prcp_coef=0.02, kl_ref_coef=0.01, entropy_coef=0.05, masked_entropy_coef=0.05),
    "dapo": LossConfig(kl_prcp_coef=0.0, clip_high=0.28),
    "papo_d": LossConfig(kl_prcp_coef=0.01, clip_high=0.28, entropy_coef=0.03, masked_entropy_coef=0.03),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_matches_official_formula_value_and_gradient(name):
    cfg = PRESETS[name]
    new, old, masked, ref, adv, mask = _batch()
    loss, metrics = papo_loss(cfg, new, old, adv, mask, masked_log_probs=masked, ref_log_probs=ref)
    (grad,) = torch.autograd.grad(loss, new)

    new64 = new.detach().double().requires_grad_()
    expected = _official_float64(new64, old, masked, ref, adv, mask, cfg)
    (grad64,) = torch.autograd.grad(expected, new64)
    close(loss, expected, tol=1e-5)
    close(grad, grad64, tol=1e-6)
    close(metrics["loss"], expected, tol=1e-5)


def test_grpo_is_pg_plus_ref_kl_exactly():
    cfg = LossConfig(kl_prcp_coef=0.0, kl_ref_coef=0.01)
    new, old, _, ref, adv, mask = _batch(1)
    loss, metrics = papo_loss(cfg, new, old, adv, mask, ref_log_probs=ref)
    expected = ppo_clip_loss(new, old, adv, mask).loss + 0.01 * aggregate(kl_estimate(new, ref, "k3"), mask)
    assert torch.equal(loss, expected)
    assert "kl_prcp" not in metrics and "masked_entropy" not in metrics


def test_dvrp_adds_the_noised_view_kl_minimised_and_keeps_the_view_detached():
    new, old, masked, noised, adv, mask = _batch(4)
    noised = noised.clone().requires_grad_()
    cfg = LossConfig(kl_prcp_coef=0.01, kl_noise_coef=0.01)
    loss, metrics = papo_loss(cfg, new, old, adv, mask, masked_log_probs=masked, noised_log_probs=noised)
    pg = ppo_clip_loss(new, old, adv, mask).loss
    expected = pg - 0.01 * aggregate(kl_estimate(new, masked, "k3"), mask) + 0.01 * aggregate(kl_estimate(new, noised, "k3"), mask)
    close(loss, expected, tol=1e-6)
    close(metrics["kl_noise"], aggregate(kl_estimate(new, noised, "k3"), mask), tol=1e-6)
    loss.backward()
    assert noised.grad is None and new.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="noised_log_probs"):
        papo_loss(cfg, new.detach(), old, adv, mask, masked_log_probs=masked)


def test_metrics_dict():
    new, old, masked, ref, adv, mask = _batch(2)
    _, metrics = papo_loss(PRESETS["papo_g_7b"], new, old, adv, mask, masked_log_probs=masked, ref_log_probs=ref)
    for key in ("loss", "pg_loss", "kl_prcp", "kl_prcp_coef", "ref_kl", "entropy", "masked_entropy",
                "clipfrac_low", "clipfrac_high", "clipfrac_dual", "pg_clipfrac_higher", "pg_clipfrac_lower", "ppo_kl"):
        assert key in metrics and metrics[key].dim() == 0 and not metrics[key].requires_grad, key
    close(metrics["kl_prcp"], aggregate(kl_estimate(new, masked, "k3"), mask), tol=1e-6)
    close(metrics["masked_entropy"], aggregate(-masked, mask), tol=1e-6)


def test_detached_masked_branch_gets_no_gradient_official():
    new, old, masked, _, adv, mask = _batch(3)
    masked = masked.clone().requires_grad_()
    cfg = LossConfig(kl_prcp_coef=0.02, entropy_coef=0.05, masked_entropy_coef=0.05)
    loss, _ = papo_loss(cfg, new, old, adv, mask, masked_log_probs=masked)
    loss.backward()
    assert masked.grad is None
    assert new.grad is not None and new.grad.abs().sum() > 0


def test_with_grad_masked_branch_receives_kl_and_entropy_gradient():
    new, old, masked, _, adv, mask = _batch(4)
    masked = masked.clone().requires_grad_()
    gamma, eta2 = 0.02, 0.05
    cfg = LossConfig(kl_prcp_coef=gamma, masked_entropy_coef=eta2, masked_grad=True)
    loss, _ = papo_loss(cfg, new, old, adv, mask, masked_log_probs=masked)
    loss.backward()
    # d/da [-gamma * k3(a - l) - eta2 * a] / N = (-gamma * (exp(a - l) - 1) - eta2) / N on valid tokens
    x = (masked - new).detach()
    expected = torch.where(mask.bool(), (-gamma * (x.exp() - 1) - eta2) / mask.sum(), torch.zeros(()))
    expected = torch.where(x.exp() - x - 1 >= 10, torch.where(mask.bool(), -eta2 / mask.sum(), 0.0), expected)
    close(masked.grad, expected, tol=1e-6)


def test_with_grad_mode_requires_a_masked_forward_with_grad():
    new, old, masked, _, adv, mask = _batch(5)
    with pytest.raises(ValueError, match="recomputed with grad"):
        papo_loss(LossConfig(masked_grad=True), new, old, adv, mask, masked_log_probs=masked)


def test_missing_inputs_are_clear_errors():
    new, old, masked, _, adv, mask = _batch(6)
    with pytest.raises(ValueError, match="needs masked_log_probs"):
        papo_loss(LossConfig(kl_prcp_coef=0.02), new, old, adv, mask)
    with pytest.raises(ValueError, match="needs ref_log_probs"):
        papo_loss(LossConfig(kl_ref_coef=0.01), new, old, adv, mask, masked_log_probs=masked)
    with pytest.raises(ValueError, match="per-token entropies"):
        papo_loss(LossConfig(entropy_estimator="exact"), new, old, adv, mask, masked_log_probs=masked)


def test_exact_entropy_option_uses_given_entropies():
    new, old, masked, _, adv, mask = _batch(7)
    ent, ment = torch.rand(B, T), torch.rand(B, T)
    cfg = LossConfig(kl_prcp_coef=0.0, entropy_coef=0.1, masked_entropy_coef=0.2, entropy_estimator="exact")
    loss, metrics = papo_loss(cfg, new, old, adv, mask, masked_log_probs=masked, entropies=ent, masked_entropies=ment)
    close(metrics["entropy"], aggregate(ent, mask), tol=1e-6)
    pg = ppo_clip_loss(new, old, adv, mask).loss
    close(loss, pg + 0.1 * aggregate(ent, mask) + 0.2 * aggregate(ment, mask), tol=1e-6)


def test_scheduled_gamma_also_scales_double_entropy():
    new, old, masked, _, adv, mask = _batch(8)
    cfg = LossConfig(kl_prcp_coef=0.02, entropy_coef=0.05, masked_entropy_coef=0.05)
    loss, metrics = papo_loss(cfg, new, old, adv, mask, masked_log_probs=masked, kl_prcp_coef=0.005)
    expected = _official_float64(new, old, masked, masked, adv, mask,
                                 dataclasses.replace(cfg, kl_prcp_coef=0.005, entropy_coef=0.0125, masked_entropy_coef=0.0125))
    close(loss, expected, tol=1e-5)
    close(metrics["kl_prcp_coef"], 0.005)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("clip_low", 1.2, "clip_low"),
        ("kl_prcp_coef", -0.02, "maximised"),
        ("loss_agg", "mean", "loss_agg"),
        ("kl_prcp_estimator", "k5", "unknown KL estimator"),
        ("kl_prcp_token_top_p", 1.5, "top_p"),
        ("entropy_estimator", "renyi", "entropy_estimator"),
        ("dual_clip", 1.0, "dual_clip"),
    ],
)
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**{field: value})


def test_masked_forward_in_update_follows_gradient_flow_and_exact_entropy():
    assert not LossConfig().masked_forward_in_update  # official: step 5's no-grad masked log-probs serve
    assert LossConfig(masked_grad=True).masked_forward_in_update
    assert LossConfig(entropy_estimator="exact", masked_entropy_coef=0.03).masked_forward_in_update
    assert not LossConfig(entropy_estimator="exact").masked_forward_in_update  # no masked entropy term
