import math

import pytest
import torch
from conftest import close

from papo.algo import (
    double_entropy_loss,
    kl_prcp_coef_at,
    kl_prcp_weights,
    perception_loss,
    sampled_entropy,
    token_top_p_mask,
)

# Two tokens. Token 1: pi = 0.5 under the full image, 0.25 under the masked image (r = 0.5).
#             Token 2: pi = 0.2 under the full image, 0.4 under the masked image (r = 2).
# k3 = r - log r - 1:  token 1: 0.5 + log 2 - 1 = 0.193147 ; token 2: 2 - log 2 - 1 = 0.306853
K3 = [0.5 + math.log(2) - 1, 2 - math.log(2) - 1]
MASK = torch.ones(1, 2)


def _logps():
    full = torch.log(torch.tensor([[0.5, 0.2]])).requires_grad_()
    masked = torch.log(torch.tensor([[0.25, 0.4]]))
    return full, masked


def test_hand_computed_value_and_term():
    full, masked = _logps()
    term, value = perception_loss(full, masked, MASK, coef=0.02)
    close(value, sum(K3) / 2, tol=1e-6)  # = 0.25
    close(term, -0.02 * sum(K3) / 2, tol=1e-7)


def test_sign_full_image_tokens_are_pushed_up():
    full, masked = _logps()
    term, _ = perception_loss(full, masked, MASK, coef=0.02)
    term.backward()
    # dL/dl_t = -gamma * (1 - r_t) / N
    close(full.grad, [[-0.02 * (1 - 0.5) / 2, -0.02 * (1 - 2.0) / 2]], tol=1e-7)
    # gradient descent raises token 1 (more likely with the full image) and lowers token 2
    assert full.grad[0, 0] < 0 < full.grad[0, 1]


def test_per_token_clip_caps_value_and_zeroes_gradient():
    full, masked = _logps()
    term, value = perception_loss(full, masked, MASK, coef=1.0, clip=0.2)
    close(value, (K3[0] + 0.2) / 2, tol=1e-6)
    term.backward()
    close(full.grad, [[-(1 - 0.5) / 2, 0.0]], tol=1e-7)


def test_token_top_p_mask_hand_computed():
    values = torch.tensor([[0.1, 0.5, 0.3, 0.9, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # valid values sorted: 0.1 0.3 0.5 0.9 ; the 0.5 quantile (linear) = 0.4 -> keep 0.5 and 0.9
    assert token_top_p_mask(values, mask, 0.5).tolist() == [[False, True, False, True, False]]
    # perception_loss keeps the denominator at all valid tokens: with k1 and masked log-probs of 0 the
    # per-token KL_prcp equals `values`, so the result is (0.5 + 0.9) / 4
    _, value = perception_loss(values, torch.zeros(1, 5), mask, coef=1.0, estimator="k1", token_top_p=0.5)
    close(value, (0.5 + 0.9) / 4, tol=1e-6)
    with pytest.raises(ValueError, match="top-p"):
        token_top_p_mask(values, mask, 0.0)


def test_token_top_p_mask_per_sequence_and_empty_rows():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    keep = token_top_p_mask(values, mask, 0.25)  # 0.75 quantile of 1..4 = 3.25 -> only 4.0
    assert keep.tolist() == [[False, False, False, True], [False, False, False, False]]


def test_apply_mode_weights():
    correct = torch.tensor([True, False, True])
    close(kl_prcp_weights(correct, "all"), [1.0, 1.0, 1.0])
    close(kl_prcp_weights(correct, "correct_only"), [1.0, 0.0, 1.0])
    close(kl_prcp_weights(correct, "weighted", incorrect_weight=0.1), [1.0, 0.1, 1.0])
    with pytest.raises(ValueError, match="apply mode"):
        kl_prcp_weights(correct, "incorrect_only")


def test_weights_scale_each_response():
    full = torch.log(torch.tensor([[0.5], [0.2]]))
    masked = torch.log(torch.tensor([[0.25], [0.4]]))
    _, value = perception_loss(full, masked, torch.ones(2, 1), 1.0, weights=torch.tensor([1.0, 0.1]))
    close(value, (K3[0] + 0.1 * K3[1]) / 2, tol=1e-6)


def test_gamma_schedule():
    assert kl_prcp_coef_at(37, 200, 0.02, "fixed") == 0.02
    close(kl_prcp_coef_at(0, 200, 0.02, "linear"), 0.02)
    close(kl_prcp_coef_at(50, 200, 0.02, "linear"), 0.01)  # half-way through the first 100 steps
    close(kl_prcp_coef_at(100, 200, 0.02, "linear"), 0.0)
    close(kl_prcp_coef_at(180, 200, 0.02, "linear"), 0.0)
    close(kl_prcp_coef_at(10, 20, 0.02, "linear", start=0.04, end=0.01, anneal_ratio=1.0), 0.025)
    with pytest.raises(ValueError, match="schedule"):
        kl_prcp_coef_at(0, 10, 0.02, "cosine")


def test_double_entropy_hand_computed():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    mask = torch.tensor([[1, 1, 0]])
    h = sampled_entropy(logp, mask)
    close(h, (math.log(2) + math.log(4)) / 2, tol=1e-6)
    close(double_entropy_loss(h, torch.tensor(2.0), 0.05, 0.03, scale=0.5), 0.5 * (0.05 * float(h) + 0.03 * 2.0), tol=1e-7)
