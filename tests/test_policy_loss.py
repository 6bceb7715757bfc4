import math

import pytest
import torch
from conftest import close

from papo.algo import ppo_clip_loss

# Four tokens, one per row: (ratio, advantage) and what each branch gives with eps 0.2 / 0.3, dual clip 3.
#   ratio 1.5, A=+1: max(-1.5, -1.3) = -1.3           upper clip active
#   ratio 0.5, A=-1: max(0.5, 0.8) = 0.8; min(0.8, 3)  lower clip active
#   ratio 4.0, A=-1: max(4.0, 1.3) = 4.0; min(4.0, 3)  dual clip active -> 3.0
#   ratio 1.1, A=+1: max(-1.1, -1.1) = -1.1            unclipped
RATIOS = [1.5, 0.5, 4.0, 1.1]
ADV = torch.tensor([1.0, -1.0, -1.0, 1.0])
MASK = torch.ones(4, 1)


def _inputs():
    old = torch.log(torch.tensor([[0.2], [0.4], [0.1], [0.5]]))
    new = (old + torch.log(torch.tensor(RATIOS))[:, None]).requires_grad_()
    return new, old


def test_hand_computed_loss_and_clip_fractions():
    new, old = _inputs()
    out = ppo_clip_loss(new, old, ADV, MASK, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    close(out.loss, (-1.3 + 0.8 + 3.0 - 1.1) / 4, tol=1e-6)
    close(out.clipfrac_high, 0.25)
    close(out.clipfrac_low, 0.25)
    close(out.clipfrac_dual, 0.25)
    close(out.pg_clipfrac_higher, 0.5)  # authors': the 1.5/+1 and 0.5/-1 tokens take the clipped branch
    close(out.pg_clipfrac_lower, 0.25)  # authors': the dual-clipped 4.0/-1 token
    close(out.ppo_kl, -sum(math.log(r) for r in RATIOS) / 4, tol=1e-6)


def test_hand_computed_gradient_only_unclipped_token_moves():
    new, old = _inputs()
    ppo_clip_loss(new, old, ADV, MASK).loss.backward()
    # d(-A * ratio)/d logp = -A * ratio, divided by 4 tokens; clipped tokens get zero.
    close(new.grad, [[0.0], [0.0], [0.0], [-1.1 / 4]], tol=1e-6)


# (ratio, advantage) per token, eps 0.2 / 0.3, dual clip 3; "branch" is the one max/min takes.
#   1.5, +1: max(-1.5, -1.3)            clipped   -> higher, clipfrac_high
#   0.5, -1: max(0.5, 0.8)              clipped   -> higher, clipfrac_low
#   4.0, -1: max(4.0, 1.3) = 4 > 3      dual      -> lower, clipfrac_dual
#   0.5, +1: max(-0.5, -0.8)            unclipped (ratio outside the band, but the pessimistic branch is the raw one)
#   1.5, -1: max(1.5, 1.3)              unclipped
#   1.2,  0: max(0, 0)                  neither (ties are not clipped)
#   0.7, -2: max(1.4, 1.6); 1.6 < 6     clipped   -> higher, clipfrac_low
#   2.0, -0.5: max(1.0, 0.65); 1.0 < 1.5  unclipped, dual cap not reached
AUTHOR_RATIOS = [1.5, 0.5, 4.0, 0.5, 1.5, 1.2, 0.7, 2.0]
AUTHOR_ADV = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 0.0, -2.0, -0.5])


def test_authors_clip_fractions_count_the_branch_taken():
    old = torch.full((8, 1), math.log(0.3))
    new = old + torch.log(torch.tensor(AUTHOR_RATIOS))[:, None]
    out = ppo_clip_loss(new, old, AUTHOR_ADV, torch.ones(8, 1), clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    close(out.pg_clipfrac_higher, 3 / 8)
    close(out.pg_clipfrac_lower, 1 / 8)
    close(out.clipfrac_high, 1 / 8)
    close(out.clipfrac_low, 2 / 8)
    close(out.clipfrac_dual, 1 / 8)
    # padding: the last three tokens (one of them clipped) leave the denominator and the counts
    mask = torch.tensor([[1]] * 5 + [[0]] * 3)
    out = ppo_clip_loss(new, old, AUTHOR_ADV, mask, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    close(out.pg_clipfrac_higher, 2 / 5)
    close(out.pg_clipfrac_lower, 1 / 5)
    # without the dual clip nothing counts as "lower", and the 4.0/-1 token still is not a higher-side clip
    out = ppo_clip_loss(new, old, AUTHOR_ADV, torch.ones(8, 1), clip_low=0.2, clip_high=0.3, dual_clip=None)
    close(out.pg_clipfrac_higher, 3 / 8)
    close(out.pg_clipfrac_lower, 0.0)


def test_no_dual_clip():
    new, old = _inputs()
    out = ppo_clip_loss(new, old, ADV, MASK, dual_clip=None)
    close(out.loss, (-1.3 + 0.8 + 4.0 - 1.1) / 4, tol=1e-6)
    close(out.clipfrac_dual, 0.0)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(new, old, ADV, MASK, dual_clip=0.5)


def test_on_policy_first_minibatch_is_plain_policy_gradient():
    logp = torch.randn(3, 5).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.ones(3, 5)
    out = ppo_clip_loss(logp, logp.detach(), adv, mask)
    close(out.loss, -adv.mean(), tol=1e-6)  # ratio == 1 everywhere
    out.loss.backward()
    close(logp.grad, (-adv[:, None] / 15).expand(3, 5), tol=1e-7)


def test_log_ratio_clamp_keeps_everything_finite():
    new = torch.tensor([[60.0, -60.0, 0.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    for adv in (torch.tensor([1.0]), torch.tensor([-1.0])):
        out = ppo_clip_loss(new, old, adv, torch.ones(1, 3))
        (g,) = torch.autograd.grad(out.loss, new)
        assert torch.isfinite(out.loss) and torch.isfinite(g).all()
        assert g[0, 0] == 0 and g[0, 1] == 0  # saturated log-ratios carry no gradient


def test_padding_is_ignored():
    new, old = _inputs()
    padded_new = torch.cat([new.detach(), torch.full((4, 1), 50.0)], dim=1)
    padded_old = torch.cat([old, torch.full((4, 1), -50.0)], dim=1)
    mask = torch.tensor([[1, 0]] * 4)
    out = ppo_clip_loss(padded_new, padded_old, ADV, mask)
    close(out.loss, (-1.3 + 0.8 + 3.0 - 1.1) / 4, tol=1e-6)
    close(out.clipfrac_high, 0.25)


def _reference(new, old, adv, mask, lo, hi, c):
    """Independent float64 version in ratio space (no log-space tricks)."""
    new, old, adv, mask = new.double(), old.double(), adv.double()[:, None], mask.double()
    ratio = torch.exp(new - old)
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - lo, 1 + hi))
    surrogate = torch.where(adv < 0, torch.minimum(surrogate, -adv * c), surrogate)
    return (surrogate * mask).sum() / mask.sum()


@pytest.mark.parametrize("clip_high", [0.28, 0.3])
def test_against_float64_reference_on_random_inputs(clip_high):
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(8, 12, generator=g) * 3
    new = old + torch.randn(8, 12, generator=g) * 0.5
    adv = torch.randn(8, generator=g)
    mask = (torch.arange(12)[None] < torch.randint(1, 13, (8, 1), generator=g)).long()
    out = ppo_clip_loss(new, old, adv, mask, 0.2, clip_high, 3.0)
    close(out.loss, _reference(new, old, adv, mask, 0.2, clip_high, 3.0), tol=1e-5)
    # the authors' "higher" is papo's two sides together, their "lower" papo's dual clip
    close(out.pg_clipfrac_higher, out.clipfrac_high + out.clipfrac_low, tol=1e-6)
    close(out.pg_clipfrac_lower, out.clipfrac_dual, tol=0)
