import math

import pytest
import torch
from conftest import close

from papo.algo import entropy_from_logits, kl_estimate

LOG_P = torch.log(torch.tensor([[0.5]]))
LOG_Q = torch.log(torch.tensor([[0.25]]))


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("k1", math.log(2)),
        ("kl", math.log(2)),
        ("abs", math.log(2)),
        ("k2", 0.5 * math.log(2) ** 2),
        ("mse", 0.5 * math.log(2) ** 2),
        # x = log q - log p = -log 2:  e^x - x - 1 = 0.5 + log 2 - 1
        ("k3", 0.5 + math.log(2) - 1),
        ("low_var_kl", 0.5 + math.log(2) - 1),
    ],
)
def test_hand_computed_estimators(kind, expected):
    close(kl_estimate(LOG_P, LOG_Q, kind), [[expected]], tol=1e-6)


def test_k3_clamps_value_and_gradient():
    log_p = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    log_q = torch.tensor([[30.0, -30.0, -2.0]])
    k3 = kl_estimate(log_p, log_q, "k3")
    # x=+30 -> clamp 20 -> e^20-21 -> 10 ; x=-30 -> clamp -20 -> e^-20+19 -> 10 ; x=-2 -> e^-2+1 (unclamped)
    close(k3, [[10.0, 10.0, math.exp(-2) + 1]], tol=1e-6)
    k3.sum().backward()
    close(log_p.grad, [[0.0, 0.0, 1 - math.exp(-2)]], tol=1e-6)


def test_always_float32():
    out = kl_estimate(LOG_P.bfloat16(), LOG_Q.bfloat16(), "k3")
    assert out.dtype == torch.float32


def test_unknown_and_full_estimators_are_rejected():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(LOG_P, LOG_Q, "k4")
    with pytest.raises(ValueError, match="full-vocabulary"):
        kl_estimate(LOG_P, LOG_Q, "full")


def test_k3_is_unbiased_for_kl_p_q_under_samples_from_p():
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = kl_estimate(p.log()[samples], q.log()[samples], "k3").double().mean()
    assert abs(float(est) - true_kl) < 0.01, (float(est), true_kl)


def test_entropy_from_logits_hand_computed():
    close(entropy_from_logits(torch.zeros(4)), math.log(4))
    close(entropy_from_logits(torch.tensor([0.0, 0.0, float("-inf")])), math.log(2))
    close(entropy_from_logits(torch.tensor([[0.0, math.log(3)]])), [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])


def test_entropy_gradient_is_finite_with_suppressed_ids():
    """Suppressed ids are -inf logits: the entropy's gradient must stay finite (it was nan, through 0 x -inf)."""
    logits = torch.tensor([[0.5, -1.0, float("-inf"), 2.0]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    p = torch.tensor([0.5, -1.0, 2.0]).softmax(-1)
    h = -(p * p.log()).sum()
    expected = -p * (p.log() + h)  # dH/dz_i = -p_i (log p_i + H)
    close(logits.grad[0, [0, 1, 3]], expected, tol=1e-6)
    assert logits.grad[0, 2] == 0


def test_entropy_from_logits_against_float64_reference():
    logits = torch.randn(3, 5, 11) * 4
    p = logits.double().softmax(-1)
    close(entropy_from_logits(logits), -(p * p.log()).sum(-1), tol=1e-5)
