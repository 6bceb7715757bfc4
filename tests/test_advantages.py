import math

import pytest
import torch
from conftest import close

from papo.algo import group_advantages


def test_grpo_hand_computed_groups_of_two_and_three():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    uids = ["a", "a", "b", "b", "b"]
    # group a: mean 0.5, unbiased std sqrt(0.5) ; group b: mean 1/3, unbiased std sqrt(1/3)
    sa, sb = math.sqrt(0.5), math.sqrt(1 / 3)
    expected = [0.5 / (sa + 1e-6), -0.5 / (sa + 1e-6), (2 / 3) / (sb + 1e-6), (-1 / 3) / (sb + 1e-6), (-1 / 3) / (sb + 1e-6)]
    close(group_advantages(rewards, uids), expected)


def test_grouping_follows_uid_not_position():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    interleaved = group_advantages(rewards, torch.tensor([7, 3, 7, 3]))
    contiguous = group_advantages(rewards[[0, 2, 1, 3]], torch.tensor([7, 7, 3, 3]))
    close(interleaved[[0, 2, 1, 3]], contiguous)


def test_uniform_group_has_zero_advantage():
    close(group_advantages(torch.tensor([0.9, 0.9, 0.9]), ["q"] * 3), [0.0, 0.0, 0.0])


def test_dr_grpo_drops_the_std():
    close(group_advantages(torch.tensor([1.0, 0.0, 0.0]), ["q"] * 3, "dr_grpo"), [2 / 3, -1 / 3, -1 / 3])


def test_rloo_leave_one_out_baseline():
    # r_i - mean of the others: 1 - 0, 0 - 0.5, 0 - 0.5
    close(group_advantages(torch.tensor([1.0, 0.0, 0.0]), ["q"] * 3, "rloo"), [1.0, -0.5, -0.5])


def test_singleton_group_is_an_error_for_grpo():
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), ["a", "a", "b"])
    close(group_advantages(torch.tensor([1.0]), ["a"], "dr_grpo"), [0.0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        group_advantages(torch.zeros(2), [0, 0], "ppo")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), [0, 0])
    with pytest.raises(ValueError, match="group ids"):
        group_advantages(torch.zeros(3), [0, 0])


def test_against_float64_reference_on_random_inputs():
    g = torch.Generator().manual_seed(3)
    n_groups, n = 7, 5
    rewards = torch.rand(n_groups * n, generator=g)
    uids = torch.randperm(n_groups * n, generator=g) % n_groups
    adv = group_advantages(rewards, uids)
    for k in range(n_groups):
        r = rewards[uids == k].double()
        close(adv[uids == k], (r - r.mean()) / (r.std(unbiased=True) + 1e-6), tol=1e-5)
