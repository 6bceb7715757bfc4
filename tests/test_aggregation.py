import pytest
import torch
from conftest import close

from papo.algo import aggregate, masked_mean

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_token_mean_hand_computed():
    close(aggregate(VALUES, MASK, "token-mean"), (1 + 2 + 3 + 4) / 4)


def test_seq_mean_token_mean_hand_computed():
    close(aggregate(VALUES, MASK, "seq-mean-token-mean"), ((1 + 2 + 3) / 3 + 4 / 1) / 2)


def test_seq_mean_token_sum_hand_computed():
    close(aggregate(VALUES, MASK, "seq-mean-token-sum"), ((1 + 2 + 3) + 4) / 2)


def test_seq_mean_token_sum_norm_hand_computed():
    close(aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm_length=4), (6 / 4 + 4 / 4) / 2)
    with pytest.raises(ValueError, match="norm_length"):
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_padding_never_contributes_even_nan_or_inf(mode):
    poisoned = VALUES.clone()
    poisoned[1, 1], poisoned[1, 2] = float("nan"), float("inf")
    close(aggregate(poisoned, MASK, mode), aggregate(VALUES, MASK, mode))


def test_padding_does_not_receive_gradient():
    values = VALUES.clone().requires_grad_()
    aggregate(values, MASK, "token-mean").backward()
    close(values.grad, [[0.25, 0.25, 0.25], [0.25, 0.0, 0.0]])


def test_empty_rows_are_left_out_of_sequence_means():
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    close(aggregate(VALUES, mask, "seq-mean-token-mean"), 2.0)
    close(aggregate(VALUES, mask, "seq-mean-token-sum"), 6.0)


def test_all_padding_gives_zero_not_nan():
    mask = torch.zeros_like(MASK)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        close(aggregate(VALUES, mask, mode), 0.0)
    close(masked_mean(VALUES, mask), 0.0)


def test_bad_mode_and_shape():
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'sum'"):
        aggregate(VALUES, MASK, "sum")
    with pytest.raises(ValueError, match="same shape"):
        aggregate(VALUES, MASK[:, :2])


def test_against_float64_reference_on_random_inputs():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(6, 9, generator=g)
    lengths = torch.tensor([9, 1, 4, 7, 0, 3])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    v, m = values.double(), mask.double()
    rows = [i for i in range(6) if lengths[i] > 0]
    expected = {
        "token-mean": (v * m).sum() / m.sum(),
        "seq-mean-token-mean": torch.stack([(v[i] * m[i]).sum() / m[i].sum() for i in rows]).mean(),
        "seq-mean-token-sum": torch.stack([(v[i] * m[i]).sum() for i in rows]).mean(),
    }
    for mode, ref in expected.items():
        close(aggregate(values, mask, mode), ref, tol=1e-5)
