"""The variants of PAPO described in a third-party write-up, each against hand-computed values."""

import pytest
import torch
from model_fixtures import small_cfg

from papo.algo import LossConfig, entropy_band_loss, papo_loss, perception_reward, relative_kl_prcp_coef
from papo.config.schema import ConfigError, load_config
from papo.training.trainer import Trainer


def test_band_limited_entropy_penalises_only_outside_the_band():
    h = lambda x: torch.tensor(x)  # noqa: E731
    assert entropy_band_loss(h(1.0), h(0.5), 0.1, 2.0, 0.01) == 0  # both inside
    # full 0.05 is 0.05 below h_min, masked 2.5 is 0.5 above h_max: 0.01 * (0.05 + 0.5)
    assert entropy_band_loss(h(0.05), h(2.5), 0.1, 2.0, 0.01).item() == pytest.approx(0.0055)
    assert entropy_band_loss(h(3.0), None, 0.1, 2.0, 1.0).item() == pytest.approx(1.0)


def test_relative_coefficient_makes_the_perception_term_a_fraction_of_the_policy_loss():
    pg, kl = torch.tensor(-0.04, requires_grad=True), torch.tensor(0.2, requires_grad=True)
    gamma = relative_kl_prcp_coef(0.5, pg, kl)
    assert gamma.item() == pytest.approx(0.5 * 0.04 / 0.2) and not gamma.requires_grad
    assert (gamma * kl).item() == pytest.approx(0.5 * 0.04)


def test_perception_reward_sums_token_kl_per_response():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    masked = torch.tensor([[-1.0, -1.0, -9.0], [-1.5, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    k3 = lambda d: torch.exp(torch.tensor(d)) - d - 1  # noqa: E731 - k3(old, masked) with d = masked - old
    expected = torch.stack([k3(0.0) + k3(1.0), k3(-1.0) + k3(0.0)])
    assert torch.allclose(perception_reward(old, masked, mask, 0.5), 0.5 * expected)


def test_variants_enter_papo_loss():
    torch.manual_seed(0)
    logp = (torch.randn(2, 4) - 1).requires_grad_()
    old, masked, mask, adv = logp.detach(), logp.detach() - 0.3, torch.ones(2, 4), torch.tensor([1.0, -1.0])
    cfg = LossConfig(kl_prcp_coef=0.5, kl_prcp_relative=True, kl_ref_coef=0.0)
    loss, m = papo_loss(cfg, logp, old, adv, mask, masked_log_probs=masked)
    assert (m["kl_prcp_coef"] * m["kl_prcp"]).item() == pytest.approx(0.5 * abs(m["pg_loss"].item()), rel=1e-5)
    band = LossConfig(kl_prcp_coef=0.0, kl_ref_coef=0.0, entropy_band=(2.0, 3.0), entropy_band_coef=0.1)
    loss, m = papo_loss(band, logp, old, adv, mask, masked_log_probs=masked)
    # sampled entropies are mean NLLs: both below h_min = 2.0 here, so each adds 0.1 * (2.0 - H)
    expected = 0.1 * ((2.0 - m["entropy"]).clamp(min=0) + (2.0 - m["masked_entropy"]).clamp(min=0))
    assert m["entropy_band_loss"].item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="entropy_band"):
        LossConfig(entropy_band=(2.0, 1.0))


def test_variant_config_keys_and_the_encoder_patch_size(tmp_path):
    cfg = small_cfg("papo_g", ["algorithm.entropy_band=[0.1, 2.0]", "algorithm.entropy_band_coef=0.01",
                               "algorithm.kl_prcp_relative=true", "algorithm.kl_prcp_coef=0.5",
                               "algorithm.kl_prcp_reward_coef=0.1", "algorithm.mask_patch_size=0"])
    assert cfg.algorithm.loss_config().entropy_band == (0.1, 2.0)
    trainer = Trainer(cfg, tmp_path, "cpu")
    assert trainer.masking.patch_size == 14  # the tiny Qwen2.5-VL encoder's patch
    row = trainer.step()
    assert "kl_prcp_reward" in row and "entropy_band_loss" in row and row["skipped"] == ""
    with pytest.raises(ConfigError, match="kl_prcp_reward_coef"):
        load_config("papo_g", overrides=["algorithm.kl_prcp_reward_coef=-1"])
