import logging

import torch

from papo.algo import dapo_group_filter, group_outcomes


def test_keeps_only_mixed_groups():
    acc = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    result = dapo_group_filter(acc, ["all-right", "all-right", "all-wrong", "all-wrong", "mixed", "mixed"])
    assert result.keep.tolist() == [False, False, False, False, True, True]
    assert (result.kept_groups, result.total_groups, result.fallback_fired) == (1, 3, False)


def test_bounds_are_strict():
    acc = torch.tensor([0.5, 0.5, 0.2, 0.4])
    result = dapo_group_filter(acc, [0, 0, 1, 1], low=0.3, high=0.5)  # means 0.5 and 0.3: both on a bound
    assert not result.keep.any()


def test_nothing_kept_keeps_nothing_by_default(caplog):
    acc = torch.tensor([1.0, 1.0, 0.0, 0.0])
    with caplog.at_level(logging.WARNING):
        result = dapo_group_filter(acc, [0, 0, 1, 1])
    assert not result.keep.any() and not result.fallback_fired
    assert caplog.text == ""


def test_official_keep_all_fallback_is_opt_in_and_logged(caplog):
    acc = torch.tensor([1.0, 1.0, 0.0, 0.0])
    with caplog.at_level(logging.WARNING):
        result = dapo_group_filter(acc, [0, 0, 1, 1], keep_all_if_empty=True)
    assert result.keep.all() and result.fallback_fired
    assert "kept 0 of 2 groups" in caplog.text


def test_group_outcomes_count_the_groups_without_an_advantage():
    acc = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    out = group_outcomes(acc, ["a", "a", "b", "b", "c", "c", "d", "d", "d"])
    assert (out.groups, out.all_correct, out.all_wrong) == (4, 1, 1)  # a all right, b all wrong, c and d mixed
