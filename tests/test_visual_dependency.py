"""VPPO's token visual dependency, token filter and trajectory scaling, against hand-computed values."""

import math

import pytest
import torch

from papo.algo.visual_dependency import (
    dependency_range,
    mean_dependency,
    token_dependency,
    top_dependent_tokens,
    trajectory_scales,
    vppo_advantages,
)


def test_token_dependency_is_k3_of_the_old_policy_against_the_masked_image():
    # pi_old = 0.5 with the image, 0.25 masked: r = 0.5, k3 = r - log r - 1 = log 2 - 0.5
    old, masked = torch.tensor([[math.log(0.5), 0.0]]), torch.tensor([[math.log(0.25), 0.0]])
    dep = token_dependency(old.requires_grad_(), masked)
    assert dep[0, 0].item() == pytest.approx(math.log(2) - 0.5, abs=1e-6)
    assert dep[0, 1].item() == 0.0 and not dep.requires_grad


def test_top_dependent_tokens_keeps_ceil_of_the_share_per_response():
    dep = torch.tensor([[0.1, 0.9, 0.5, 0.3, 7.0], [2.0, 1.0, 3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    # response 0: 4 tokens, ceil(0.4 * 4) = 2 -> 0.9 and 0.5 (7.0 is padding); response 1: ceil(1.2) = 2 -> 3.0, 2.0
    keep = top_dependent_tokens(dep, mask, 0.4)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, True, False, False]]
    ties = top_dependent_tokens(torch.ones(1, 4), torch.ones(1, 4), 0.5)  # equal scores: the first positions
    assert ties.tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="share"):
        top_dependent_tokens(dep, mask, 0.0)


def test_trajectory_scales_average_one_over_the_micro_batch():
    mean_dep = torch.tensor([0.0, 0.5, 1.0, 9.0])
    valid = torch.tensor([True, True, True, False])
    # lo = 0, hi = 1 (from the mini-batch): n = 0, 0.5, 1; mean 0.5; alpha = 0.9 + 0.1 * n / 0.5 = 0.9, 1.0, 1.1
    alpha = trajectory_scales(mean_dep, valid, 0.0, 1.0, 0.9)
    assert alpha.tolist() == pytest.approx([0.9, 1.0, 1.1, 1.0], abs=1e-6)
    assert alpha[valid].mean().item() == pytest.approx(1.0, abs=1e-6)
    # a value outside the mini-batch's range is clamped; a flat range or a single response scales by 1
    assert trajectory_scales(torch.tensor([2.0, 0.0]), torch.tensor([True, True]), 0.0, 1.0, 0.9).tolist() == \
        pytest.approx([0.9 + 0.1 * 1 / 0.5, 0.9], abs=1e-6)
    assert trajectory_scales(mean_dep, valid, 0.5, 0.5, 0.9).tolist() == [1.0] * 4
    assert trajectory_scales(mean_dep[:1], valid[:1], 0.0, 1.0, 0.9).tolist() == [1.0]


def test_vppo_advantages_hand_computed():
    dep = torch.tensor([[0.2, 0.4, 0.0], [0.6, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # means: (0.2 + 0.4) / 2 = 0.3 and 0.6 / 3 = 0.2; with lo = 0.2, hi = 0.3: n = 1, 0; mu = 0.5
    # alpha = 0.9 + 0.1 * n / 0.5 = 1.1, 0.9; kept tokens: ceil(0.8) = 1 -> 0.4; ceil(1.2) = 2 -> 0.6 and position 1
    lo, hi = dependency_range(mean_dependency(dep, mask), mask.bool().any(-1))
    assert (lo, hi) == pytest.approx((0.2, 0.3))
    adv = vppo_advantages(torch.tensor([2.0, -1.0]), dep, mask, lo, hi, token_ratio=0.4, beta_min=0.9)
    assert torch.allclose(adv, torch.tensor([[0.0, 2.2, 0.0], [-0.9, -0.9, 0.0]]), atol=1e-6)


def test_dependency_range_ignores_empty_responses():
    assert dependency_range(torch.tensor([5.0, 1.0, 3.0]), torch.tensor([False, True, True])) == (1.0, 3.0)
    assert dependency_range(torch.tensor([5.0]), torch.tensor([False])) == (float("inf"), float("-inf"))
    # such a range counts as flat
    assert trajectory_scales(torch.tensor([1.0, 2.0]), torch.tensor([True, True]), float("inf"), float("-inf"), 0.9).tolist() == [1.0, 1.0]


def test_pgpo_weights_hand_computed():
    from papo.algo.visual_dependency import pgpo_advantages, pgpo_weights

    e = math.e
    dep = torch.tensor([[0.0, e - 1, e * e - 1, 5.0], [0.3, 0.3, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # response 0: s = log1p(S) = 0, 1, 2 -> I = 0, 0.5, 1; tau 0.4, beta 2: w~ = 0, 1 + 2 * 0.1 / 0.6, 1 + 2 = 3
    # sum 4.3333 over 3 tokens: w = 3 * w~ / 4.3333 = 0, 0.92308, 2.07692. Response 1: flat scores, all I = 0,
    # so the weights sum to 0 and fall back to 1
    w = pgpo_weights(dep, mask, 0.4, 2.0)
    expected = torch.tensor([[0.0, 3 * (4 / 3) / (13 / 3), 3 * 3 / (13 / 3), 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(w, expected, atol=1e-5)
    assert torch.allclose((w * mask).sum(-1), mask.sum(-1).float())  # mass conserved
    adv = pgpo_advantages(torch.tensor([2.0, -1.0]), dep, mask)
    assert torch.allclose(adv, torch.tensor([[2.0], [-1.0]]) * expected, atol=1e-5)
    with pytest.raises(ValueError, match="threshold"):
        pgpo_weights(dep, mask, 1.0)
