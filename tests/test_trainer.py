import json
import time

import pytest
import torch
from model_fixtures import record_gradients, record_loss_advantages, small_cfg
from PIL import Image

from papo.algo import group_advantages
from papo.cli import main
from papo.config.schema import PRESETS, ConfigError, load_config
from papo.models.inputs import concat_prompt_batches
from papo.training import experience
from papo.training.experience import MicroBatches
from papo.training.loop import run_train
from papo.training.monitor import HackingMonitor
from papo.training.timing import PassClock
from papo.training.trainer import PromptStream, Trainer

# a seed whose first rollout groups score unequally: GRPO's policy gradient is zero for a group of equal rewards
GROUPS_WITH_DIFFERENT_REWARDS = "trainer.seed=1"


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("preset", PRESETS)
def test_one_step_of_every_preset_moves_the_weights(preset, tmp_path):
    torch.manual_seed(0)
    cfg = small_cfg(preset, [GROUPS_WITH_DIFFERENT_REWARDS])
    trainer = Trainer(cfg, tmp_path, "cpu")
    names = [n for n, p in trainer.policy.model.named_parameters() if p.requires_grad]
    before = _params(trainer.policy.model)
    row = trainer.step()
    params = dict(trainer.policy.model.named_parameters())
    with_grad = {n for n in names if params[n].grad is not None and params[n].grad.abs().sum() > 0}
    moved = {n for n, b in zip(names, before) if not torch.equal(b, params[n])}
    assert with_grad and moved == with_grad  # every tensor with a gradient took the update, no other one changed
    exp = trainer.last_experience
    overall = torch.tensor([float(s["overall"]) for s in exp.scores])
    assert row["reward"] == pytest.approx(float(overall.mean()))
    assert row["accuracy"] == pytest.approx(sum(float(s["accuracy"]) for s in exp.scores) / exp.size)
    assert row["response_length"] == pytest.approx(float(exp.mask.sum(-1).float().mean()))
    at_cap = [int(n) >= cfg.rollout.max_new_tokens for n in exp.mask.sum(-1)]
    assert row["response_clip_ratio"] == pytest.approx(sum(at_cap) / len(at_cap))
    assert row["tokens"] == exp.tokens == int(exp.prompt_tokens.sum() + exp.mask.sum())
    if not cfg.algorithm.online_filter:  # the filter's are counted over every round it drew (test_dapo_*)
        by_group = exp.size // cfg.rollout.n
        acc = torch.tensor([float(s["accuracy"]) for s in exp.scores]).view(by_group, -1)
        assert row["groups_all_correct"] == pytest.approx(float((acc.min(1).values >= 1).float().mean()))
        assert row["groups_all_wrong"] == pytest.approx(float((acc.max(1).values <= 0).float().mean()))
    assert row["skipped_updates"] == 0 and row["skipped"] == ""
    assert abs(row["ppo_kl"]) < 1e-5  # one on-policy mini-batch: ratio 1
    vppo = cfg.algorithm.vppo_token_ratio > 0  # visual dependency needs pi_old's and the masked log-probs first
    assert row["entropy"] > 0 and ("old_logp_s" in row) == vppo  # on-policy: no separate old-log-prob forward
    if cfg.algorithm.kl_prcp_coef > 0:
        assert row["kl_prcp_coef"] == pytest.approx(cfg.algorithm.kl_prcp_coef)
        assert row["kl_prcp"] > 0 and row["masked_entropy"] > 0
    elif vppo or cfg.algorithm.pgpo_threshold > 0:
        assert row["visual_dependency"] > 0 and "masked_logp_s" in row
    else:  # GRPO / DAPO: no masked-image forward unless trainer.log_kl_prcp asks for the metric
        assert "kl_prcp" not in row and "masked_logp_s" not in row
    if cfg.algorithm.kl_ref_coef > 0:
        assert row["ref_kl"] == 0.0  # the reference is the policy before its first update
    else:
        assert "ref_kl" not in row


def test_loss_inputs_are_what_papo_algo_expects(tmp_path, monkeypatch):
    """First of two updates: old log-probs (a separate no-grad forward) equal the trainable forward, masked
    log-probs equal an independent masked forward, advantages equal group_advantages of the recorded rewards."""
    torch.manual_seed(1)
    trainer = Trainer(small_cfg("papo_g", ["trainer.mini_batch_size=1"]), tmp_path, "cpu")
    assert trainer.needs == {"noised": False, "old": True, "masked": True, "ref": True}
    trainer.old_from_update = False  # score the first mini-batch's old log-probs too, to compare them
    recorded = []
    import papo.training.trainer as trainer_module

    real = trainer_module.papo_loss

    def spy(cfg, logp, old, adv, mask, **kw):
        recorded.append((logp.detach().clone(), old.clone(), adv.clone(), mask.clone(), kw["masked_log_probs"].detach().clone()))
        return real(cfg, logp, old, adv, mask, **kw)

    monkeypatch.setattr(trainer_module, "papo_loss", spy)
    exp_holder = {}
    real_collect = trainer.collect

    def collect(timing):
        exp, extra = real_collect(timing)
        exp_holder["exp"] = exp
        return exp, extra

    trainer.collect = collect
    trainer.step()
    exp = exp_holder["exp"]
    logp, old, adv, mask, masked = recorded[0]
    m = mask.bool()
    assert (logp[m] - old[m]).abs().max() < 1e-5  # ratio 1 on the first mini-batch
    rewards = torch.tensor([s["overall"] for s in exp.scores])
    assert torch.allclose(adv, group_advantages(rewards, exp.uids)[: adv.shape[0]])
    assert masked.shape == logp.shape and torch.isfinite(masked[m]).all()
    assert not torch.allclose(masked[m], old[m])  # the masked branch really saw other images


def test_vppo_gives_the_loss_token_advantages_on_visually_dependent_tokens(tmp_path, monkeypatch):
    """VPPO: each response keeps its advantage on ceil(0.4 T) tokens, scaled by alpha >= 0.9 (the unit tests
    check the scales' mean); everywhere else the advantage is 0."""
    torch.manual_seed(0)
    trainer = Trainer(small_cfg("vppo", [GROUPS_WITH_DIFFERENT_REWARDS, "algorithm.online_filter=false",
                                         "trainer.micro_batch_size=8"]), tmp_path, "cpu")
    assert trainer.needs["old"] and trainer.needs["masked"] and not trainer.old_from_update
    recorded = record_loss_advantages(monkeypatch)
    row = trainer.step()
    exp = trainer.last_experience
    base = group_advantages(torch.tensor([s["overall"] for s in exp.scores]), exp.uids)
    start = 0
    for adv, mask in recorded:
        assert adv.shape == mask.shape  # per token
        rows = base[start:start + adv.shape[0]]
        start += adv.shape[0]
        kept = (adv != 0).sum(-1)
        limit = torch.ceil(mask.sum(-1) * 0.4).long()
        assert (kept[rows != 0] == limit[rows != 0]).all() and (kept[rows == 0] == 0).all()
        assert (adv[~mask.bool()] == 0).all()
        alpha = adv.sum(-1)[rows != 0] / (rows[rows != 0] * kept[rows != 0])
        assert (alpha >= 0.9 - 1e-5).all()
    assert start == exp.size and row["visual_dependency"] > 0
    assert exp.uids[0] == exp.uids[1] and exp.masked_images[0][0].tobytes() != exp.masked_images[1][0].tobytes()


def test_pgpo_reshapes_token_advantages_keeping_each_response_sum(tmp_path, monkeypatch):
    """PGPO: per-token advantages whose sum over each response equals T_i * A_i (mass conserved), with pi_old
    from the update's own forward (no separate old pass) and the masked pass from scoring."""
    torch.manual_seed(0)
    trainer = Trainer(small_cfg("pgpo", [GROUPS_WITH_DIFFERENT_REWARDS, "algorithm.online_filter=false"]), tmp_path, "cpu")
    assert trainer.needs == {"noised": False, "old": False, "masked": True, "ref": False}
    recorded = record_loss_advantages(monkeypatch)
    row = trainer.step()
    exp = trainer.last_experience
    base = group_advantages(torch.tensor([s["overall"] for s in exp.scores]), exp.uids)
    adv = torch.cat([a for a, _ in recorded])
    mask = torch.cat([m for _, m in recorded])
    assert adv.shape == mask.shape and (adv[~mask.bool()] == 0).all()
    assert torch.allclose(adv.sum(-1), base * mask.sum(-1), atol=1e-4)
    spread = [(a[m.bool()] / b).std() for a, m, b in zip(adv, mask, base) if b != 0 and m.sum() > 1]
    assert spread and max(spread) > 0  # the weights really vary within responses
    assert row["visual_dependency"] > 0


def test_dvrp_scores_a_noised_view_and_minimises_its_kl(tmp_path, monkeypatch):
    """DVRP: the experience carries one noised copy of each prompt's images (same size, other pixels); a no-grad
    pass scores the completions with it, and the loss gets those log-probs."""
    import papo.training.trainer as trainer_module

    torch.manual_seed(0)
    trainer = Trainer(small_cfg("dvrp", [GROUPS_WITH_DIFFERENT_REWARDS]), tmp_path, "cpu")
    assert trainer.needs["noised"] and trainer.needs["masked"]
    recorded, real = [], trainer_module.papo_loss

    def spy(cfg, logp, old, adv, mask, **kw):
        recorded.append((logp.detach().clone(), kw["noised_log_probs"].clone(), mask.clone()))
        return real(cfg, logp, old, adv, mask, **kw)

    monkeypatch.setattr(trainer_module, "papo_loss", spy)
    row = trainer.step()
    exp = trainer.last_experience
    clean, noised = exp.images[0][0], exp.noised_images[0][0]
    assert clean.size == noised.size and clean.tobytes() != noised.tobytes()
    assert exp.noised_images[0] is exp.noised_images[1]  # one noised copy per prompt
    logp, noised_logp, mask = recorded[0]
    m = mask.bool()
    assert torch.isfinite(noised_logp[m]).all() and not torch.allclose(noised_logp[m], logp[m])
    assert row["kl_noise"] > 0 and row["kl_prcp"] > 0 and "noised_logp_s" in row


def test_skipping_the_on_policy_old_forward_leaves_the_update_unchanged(tmp_path):
    """One update per step: pi_old is the policy being updated, so the update's own log-probs (detached) stand in
    for the old-log-prob forward. The same seed with the forward forced: the same losses, gradients and weights.
    GRPO logs KL_prcp only when asked, through a masked forward it otherwise skips."""
    runs = []
    for force in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(small_cfg("grpo", [GROUPS_WITH_DIFFERENT_REWARDS, "trainer.log_kl_prcp=true"]),
                          tmp_path / str(force), "cpu")
        assert not trainer.needs["old"]  # one update per step: skipped unless forced
        trainer.needs["old"], trainer.old_from_update = force, not force
        rows = [trainer.step()]
        runs.append((rows, _params(trainer.policy.model)))
    (skipped, w_skipped), (forced, w_forced) = runs
    assert "old_logp_s" not in skipped[0] and "old_logp_s" in forced[0]
    for a, b in zip(skipped, forced):
        assert a["grad_norm"] > 0 and a["kl_prcp"] > 0
        for key in ("loss", "pg_loss", "grad_norm", "kl_prcp", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert max(float((x - y).abs().max()) for x, y in zip(w_skipped, w_forced)) < 1e-6


def test_the_first_mini_batch_takes_old_log_probs_from_its_update(tmp_path):
    """Two updates per step: before the first optimizer step the weights that sampled are the weights being
    updated, so only the second mini-batch's sequences go through the old-log-prob pass. The same seed with
    every sequence scored: the same losses, clip fractions and weights."""
    runs = []
    for from_update in (True, False):
        torch.manual_seed(0)
        trainer = Trainer(small_cfg("papo_g", [GROUPS_WITH_DIFFERENT_REWARDS, "trainer.mini_batch_size=1",
                                               "trainer.micro_batch_size=2"]), tmp_path / str(from_update), "cpu")
        trainer.old_from_update = from_update
        olds = []
        real = trainer.score_experience

        def score(exp, batches, timing, real=real, olds=olds):
            logps = real(exp, batches, timing)
            olds.append(logps.old.clone())
            return logps

        trainer.score_experience = score
        rows = [trainer.step(), trainer.step()]
        runs.append((rows, olds, _params(trainer.policy.model)))
    (fast, fast_olds, w_fast), (full, full_olds, w_full) = runs
    for old in fast_olds:  # rows 0-3 (the first mini-batch: 1 prompt x 4 samples) were not scored
        assert (old[:4] == 0).all() and (old[4:] != 0).any()
    assert all((old[:4] != 0).any() for old in full_olds)
    for a, b in zip(fast, full):
        assert "old_logp_s" in a and a["grad_norm"] > 0
        for key in ("loss", "pg_loss", "grad_norm", "kl_prcp", "entropy", "ppo_kl", "clipfrac_high", "clipfrac_low"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert max(float((x - y).abs().max()) for x, y in zip(w_fast, w_full)) < 1e-6


def test_scoring_in_larger_micro_batches_gives_the_same_log_probs(tmp_path):
    """trainer.scoring_micro_batch_size merges whole update micro-batches for the no-grad passes (the authors
    score in micro-batches of 16 and update in 4): the old, masked and reference log-probs stay the same."""
    torch.manual_seed(0)
    trainer = Trainer(small_cfg("papo_g", ["trainer.mini_batch_size=1", "trainer.micro_batch_size=2"]), tmp_path, "cpu")
    trainer.old_from_update = False  # every sequence's old log-probs, whichever passes hold them
    exp, _ = trainer.collect({})
    scored = {}
    for scoring_size in (0, 8):
        batches = MicroBatches(exp, trainer.policy, 2, 4, scoring_size)
        assert len(list(batches.scoring())) == (4 if scoring_size == 0 else 2)  # split at the first mini-batch
        scored[scoring_size] = trainer.score_experience(exp, batches, {}).named()
    assert scored[0].keys() == scored[8].keys() == {"old", "masked", "ref"}
    for mb in batches.scoring():  # a prompt's rollouts share its encoded views: one image id per prompt and view
        prompts = len({exp.uids[row] for row in mb.rows})
        assert len(mb.full.image_ids) == len(mb.rows) > prompts
        assert len(set(mb.full.image_ids)) == len(set(mb.masked.image_ids)) == prompts
        assert not set(mb.full.image_ids) & set(mb.masked.image_ids)
    for name in scored[0]:
        assert (scored[0][name] - scored[8][name]).abs().max() < 1e-5, name
    with pytest.raises(ValueError, match="not a multiple of the micro-batch size 2"):
        MicroBatches(exp, trainer.policy, 2, 4, 3)
    with pytest.raises(ConfigError, match=r"scoring_micro_batch_size \(now 12\) must be 0 or a multiple of trainer.micro_batch_size \(now 8\)"):
        small_cfg("papo_g", ["trainer.scoring_micro_batch_size=12"])


@pytest.mark.parametrize("extra", [[], ["algorithm.masked_grad=true", "algorithm.entropy_estimator=exact",
                                         "algorithm.masked_entropy_coef=0.03", "algorithm.token_mean_scope=mini_batch"]])
def test_update_passes_of_several_micro_batches_leave_the_gradient_unchanged(extra, tmp_path):
    """trainer.update_micro_batch_size runs one forward and backward over several micro-batches, and the loss
    still takes its token mean per micro-batch: the same metrics and weights as one pass per micro-batch.
    Responses of unequal length make the per-micro-batch weighting matter (one mean over a whole pass would
    weigh tokens differently)."""
    runs = []
    for update_size in (0, 4, 6, 8):
        torch.manual_seed(0)
        cfg = small_cfg("papo_g", [GROUPS_WITH_DIFFERENT_REWARDS, "trainer.micro_batch_size=2",
                                   f"trainer.update_micro_batch_size={update_size}", *extra])
        trainer = Trainer(cfg, tmp_path / str(update_size), "cpu")
        grads = record_gradients(trainer)
        row = trainer.step()
        runs.append((row, grads, _params(trainer.policy.model)))
    tokens = trainer.last_experience.mask.sum(-1).view(-1, 2).sum(-1)  # valid tokens of each micro-batch
    assert len(set(tokens.tolist())) > 1
    (base, g_base, w_base), *others = runs
    assert base["grad_norm"] > 0 and base["kl_prcp"] > 0
    for row, grads, weights in others:
        for key in ("loss", "pg_loss", "grad_norm", "kl_prcp", "entropy", "masked_entropy"):
            assert row[key] == pytest.approx(base[key], rel=1e-5, abs=1e-7), key
        assert len(grads) == len(g_base) == 1
        for g, b in zip(grads[0], g_base[0]):  # the update's gradient itself, before AdamW normalises it away
            assert torch.allclose(g, b, rtol=1e-5, atol=1e-9)
        # Adam's first step moves a weight by lr * g / (|g| + eps): an entry with |g| near eps turns rounding-level
        # gradient differences (passes share different image features) into a few percent of lr
        assert max(float((x - y).abs().max()) for x, y in zip(weights, w_base)) < 0.05 * cfg.optim.lr
    with pytest.raises(ConfigError, match=r"update_micro_batch_size \(now 6\) must be 0 or a multiple of trainer.micro_batch_size \(now 4\)"):
        small_cfg("papo_g", ["trainer.micro_batch_size=4", "trainer.update_micro_batch_size=6"])


def test_a_step_with_shared_prompts_equals_one_without(tmp_path, monkeypatch):
    """model.share_prompts packs each prompt once for all its rollouts in every scoring and update pass: the
    step's metrics and gradient are those of passes that pack the prompt with each rollout."""
    from papo.models import packing

    leads, real = [], packing.prompt_leads
    monkeypatch.setattr(packing, "prompt_leads", lambda *args: leads.append(real(*args)) or leads[-1])
    runs = []
    for share in ("false", "true"):
        torch.manual_seed(0)
        cfg = small_cfg("papo_g", [GROUPS_WITH_DIFFERENT_REWARDS, "trainer.micro_batch_size=4",
                                   "trainer.scoring_micro_batch_size=8", f"model.share_prompts={share}"])
        trainer = Trainer(cfg, tmp_path / share, "cpu")
        assert trainer.policy.share_prompts == (share == "true")
        grads = record_gradients(trainer)
        runs.append((trainer.step(), grads))
    (base, g_base), (row, grads) = runs
    assert leads and all(len(set(rows)) < len(rows) for rows in leads)  # every pass of the second step shared
    assert base["grad_norm"] > 0 and base["kl_prcp"] > 0
    for key in ("loss", "pg_loss", "grad_norm", "kl_prcp", "entropy", "masked_entropy", "ppo_kl"):
        assert row[key] == pytest.approx(base[key], rel=1e-5, abs=1e-7), key
    for g, b in zip(grads[0], g_base[0]):
        assert torch.allclose(g, b, rtol=1e-4, atol=1e-8)


def test_update_passes_over_partial_micro_batches_and_two_mini_batches(tmp_path):
    """Micro-batches of 3 over mini-batches of 4 sequences (a partial last micro-batch), update passes of 6
    (a partial last pass), scoring passes of 9: the same losses and gradients as one pass per micro-batch."""
    runs = []
    for sizes in (["trainer.update_micro_batch_size=0"], ["trainer.update_micro_batch_size=6", "trainer.scoring_micro_batch_size=9"]):
        torch.manual_seed(0)
        cfg = small_cfg("papo_g", [GROUPS_WITH_DIFFERENT_REWARDS, "trainer.micro_batch_size=3", "trainer.mini_batch_size=1", *sizes])
        trainer = Trainer(cfg, tmp_path / sizes[0][-1], "cpu")
        norms = []
        real_step = trainer.optim.step

        def step(*args, real_step=real_step, norms=norms, model=trainer.policy.model, **kwargs):
            norms.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone())
            return real_step(*args, **kwargs)

        trainer.optim.step = step
        runs.append((trainer.step(), norms))
    (a, ga), (b, gb) = runs
    assert len(ga) == len(gb) == 2  # two mini-batches, two optimizer steps
    for key in ("loss", "pg_loss", "grad_norm", "kl_prcp", "entropy", "ppo_kl"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for x, y in zip(ga, gb):  # scoring passes of 9 and of 3 round old log-probs differently: fp32 noise only
        assert float((x - y).abs().max()) <= 1e-5 * float(y.abs().max()), float((x - y).abs().max() / y.abs().max())


def test_micro_batches_group_passes_within_mini_batches(tmp_path):
    """Encoding units that both kinds of pass merge whole; update passes never cross a mini-batch, scoring
    passes may; loss groups split a pass back into the authors' micro-batches."""
    torch.manual_seed(0)
    trainer = Trainer(small_cfg("grpo", ["rollout.n=5", "trainer.rollout_batch_size=2"]), tmp_path, "cpu")
    exp, _ = trainer.collect({})
    assert exp.size == 10
    batches = MicroBatches(exp, trainer.policy, size=2, per_update=5, scoring_size=4, update_size=6)
    assert batches.plan == [[[0, 1], [2, 3], [4]], [[5, 6], [7, 8], [9]]]  # gcd(4, 6) = 2 sequences per unit
    passes = [[mb.rows for mb in batches.update_passes(i)] for i in range(len(batches.plan))]
    assert passes == [[[0, 1, 2, 3, 4]], [[5, 6, 7, 8, 9]]]
    assert [batches.rows(i) for i in range(2)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [batches.micro_batch_count(i) for i in range(2)] == [3, 3]
    first = next(batches.update_passes(0))
    assert batches.loss_groups(first) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    # scoring passes may span later mini-batches, never the first one's end (its old log-probs come from its update)
    assert [mb.rows for mb in batches.scoring()] == [[0, 1, 2, 3], [4], [5, 6, 7, 8], [9]]
    with pytest.raises(ValueError, match="update micro-batch size 3 is not a multiple of the micro-batch size 2"):
        MicroBatches(exp, trainer.policy, 2, 4, update_size=3)


@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.parametrize("extra,masked", [([], 2), (["algorithm.mask_per_response=true"], 10)])
def test_the_processor_runs_once_per_prompt_and_view(extra, masked, kept, tmp_path, monkeypatch):
    """The rollouts of a prompt share its image, and its masked image unless masks are drawn per response: each
    is encoded once per step (a kept step: one processor call per view for all its prompts), and every pass holds
    exactly what encoding its sequences one by one would give."""
    torch.manual_seed(0)
    trainer = Trainer(small_cfg("grpo", ["rollout.n=5", "trainer.rollout_batch_size=2", *extra]), tmp_path, "cpu")
    exp, _ = trainer.collect({})
    if not kept:
        monkeypatch.setattr(experience, "ENCODING_CACHE_MAX_SEQUENCES", exp.size - 1)
    real, calls = trainer.policy.encode, []
    monkeypatch.setattr(trainer.policy, "encode", lambda prompts, images: (calls.append(len(prompts)), real(prompts, images))[1])
    batches = MicroBatches(exp, trainer.policy, size=2, per_update=5, scoring_size=4, update_size=6)
    passes = [*batches.scoring(), *(mb for i in range(len(batches.plan)) for mb in batches.update_passes(i))]
    if kept:
        assert calls == [2, masked]  # 2 prompts: their full images, then masked images per prompt or per rollout
    else:  # each encoding unit (2 sequences, of at most 2 prompts) again for every pass, one call a view
        assert len(calls) > 2 and max(calls) <= 2
    for mb in passes:
        prompts = [exp.samples[r].formatted_prompt() for r in mb.rows]
        for got, views in ((mb.full, exp.images), (mb.masked, exp.masked_images)):
            want = concat_prompt_batches([real([p], [views[r]]) for p, r in zip(prompts, mb.rows)], trainer.policy.pad_id)
            assert got.inputs.keys() == want.inputs.keys()
            for key in want.inputs:
                assert torch.equal(got.inputs[key], want.inputs[key]), key


def test_dapo_regenerates_until_the_batch_is_full(tmp_path):
    torch.manual_seed(2)
    trainer = Trainer(small_cfg("dapo"), tmp_path, "cpu")
    rounds = {"n": 0}
    real = trainer.rollout

    def rollout(draws):
        exp = real(draws)
        rounds["n"] += 1
        for i, s in enumerate(exp.scores):  # round 1: every group all-correct (dropped); then mixed groups
            s["accuracy"] = 1.0 if rounds["n"] == 1 else float(i % 2)
        return exp

    trainer.rollout = rollout
    row = trainer.step()
    assert row["filter_rounds"] == 2 and row["filter_kept_groups"] >= 2
    assert trainer.last_experience.size == 2 * 4
    # over both rounds' 4 groups: round 1's 2 all correct, round 2's mixed; accuracy 1 then 0.5
    assert row["groups_all_correct"] == 0.5 and row["groups_all_wrong"] == 0.0
    assert row["accuracy_before_filter"] == 0.75 and row["accuracy"] == 0.5


def test_dapo_rounds_draw_gen_batch_size_prompts(tmp_path):
    torch.manual_seed(2)
    trainer = Trainer(small_cfg("dapo", ["trainer.gen_batch_size=1"]), tmp_path, "cpu")
    drawn = []
    real = trainer.rollout

    def rollout(draws):
        drawn.append([pos for pos, _ in draws])
        exp = real(draws)
        for i, s in enumerate(exp.scores):  # every group mixed: each kept
            s["accuracy"] = float(i % 2)
        return exp

    trainer.rollout = rollout
    exp, extra = trainer.collect({})
    assert drawn == [[0], [1]] and extra == {"filter_rounds": 2, "filter_kept_groups": 2, "filter_trained_groups": 2,
                                             "groups_all_correct": 0.0, "groups_all_wrong": 0.0,
                                             "accuracy_before_filter": 0.5}
    assert exp.size == 2 * 4
    trainer.cfg.trainer.gen_batch_size = 3  # one round gives more groups than the batch: cut to exactly 2 groups
    exp, extra = trainer.collect({})
    assert drawn[2:] == [[2, 3, 4]] and (extra["filter_rounds"], extra["filter_kept_groups"]) == (1, 3)
    assert exp.size == 2 * 4 and exp.uids[0].startswith("2:") and exp.uids[-1].startswith("3:")
    for bad, message in [("-1", "gen_batch_size must be >= 0"), ("4", "needs algorithm.online_filter")]:
        with pytest.raises(ConfigError, match=message):
            small_cfg("dapo" if bad == "-1" else "grpo", [f"trainer.gen_batch_size={bad}"])


def test_prompt_stream_reshuffles_every_epoch_and_resumes_from_pos(tmp_path):
    assert main(["data", "generate", "--task", "count", "--n", "8", "--size", "224", "--out", str(tmp_path / "d")]) == 0
    stream = PromptStream(str(tmp_path / "d"), seed=3)
    draws = [(pos, s.id) for pos, s in stream.take(24)]
    epochs = [[i for _, i in draws[e * 8 : (e + 1) * 8]] for e in range(3)]
    every_row = sorted(s.id for s in stream.data)
    assert all(sorted(epoch) == every_row for epoch in epochs)  # each epoch visits each row once
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    # epoch 0 is the one permutation earlier versions reused, so their checkpoints resume unchanged
    first = torch.randperm(8, generator=torch.Generator().manual_seed(3)).tolist()
    assert epochs[0] == [stream.data[i].id for i in first]
    restored = PromptStream(str(tmp_path / "d"), seed=3)
    restored.pos = 11  # what Trainer.restore sets, mid-epoch 1
    assert [(pos, s.id) for pos, s in restored.take(13)] == draws[11:]
    other = PromptStream(str(tmp_path / "d"), seed=4)
    assert [s.id for _, s in other.take(16)][8:] != epochs[1]


def test_dapo_gives_up_with_a_clear_error(tmp_path):
    trainer = Trainer(small_cfg("dapo", ["algorithm.max_filter_rounds=2"]), tmp_path, "cpu")
    real = trainer.rollout

    def rollout(draws):
        exp = real(draws)
        for s in exp.scores:
            s["accuracy"] = 0.0
        return exp

    trainer.rollout = rollout
    with pytest.raises(RuntimeError, match="max_filter_rounds"):
        trainer.step()


def test_dapo_can_train_on_the_groups_kept_when_rounds_run_out(tmp_path):
    torch.manual_seed(2)
    trainer = Trainer(small_cfg("dapo", ["algorithm.max_filter_rounds=2", "algorithm.filter_fallback=kept"]), tmp_path, "cpu")
    real = trainer.rollout
    rounds = {"n": 0}

    def rollout(draws):  # one mixed group in round 1 (of 2 wanted), then all wrong
        exp = real(draws)
        rounds["n"] += 1
        for i, s in enumerate(exp.scores):
            s["accuracy"] = float(rounds["n"] == 1 and i < 4 and i % 2 == 0)
        return exp

    trainer.rollout = rollout
    row = trainer.step()
    assert row["filter_rounds"] == 2 and row["filter_kept_groups"] == row["filter_trained_groups"] == 1
    assert trainer.last_experience.size == 4 and row["skipped_updates"] == 0 and row["groups_all_wrong"] == 0.75
    rounds["n"] = 1  # every group all wrong: nothing to train on
    with pytest.raises(RuntimeError, match="too few for every rank"):
        trainer.step()
    with pytest.raises(ConfigError, match="filter_fallback must be error or kept"):
        small_cfg("dapo", ["algorithm.filter_fallback=skip"])


def _strip(rows):
    """Rows without what differs between any two runs: wall-clock times, rates and memory peaks."""
    return [{k: v for k, v in r.items() if not k.endswith(("_s", "_gib"))} for r in rows]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    extra = ["trainer.save_every=2", "trainer.keep_last=5"]
    run_train(small_cfg("papo_g", extra + ["trainer.max_steps=4"]), str(tmp_path / "a"))
    run_train(small_cfg("papo_g", extra + ["trainer.max_steps=2"]), str(tmp_path / "b"))
    # the interrupted run also logged a step after its last checkpoint that the resume must not repeat
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "reward": -1}) + "\n")
    assert main(["train", "--resume", str(tmp_path / "b"), "--set", "trainer.max_steps=4"]) == 0
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert _strip(a) == _strip(b)


def test_run_outputs_report_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    cfg = small_cfg("papo_g", ["trainer.max_steps=2", "trainer.save_every=1", "trainer.keep_last=1",
                               "trainer.report_to=tensorboard", "trainer.log_samples_every=1", "trainer.eval_before_after=true",
                               "trainer.eval_k=1", "data.test=synthetic:count+bar_chart?split=test&size=224&n=4"])
    result = run_train(cfg, str(out))
    assert set(result["after"]["per_task"]) == {"count", "bar_chart"}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]  # keep_last=1
    ckpt = out / "checkpoints" / "step-2"
    for name in ("model.safetensors", "config.json", "trainer_state.pt", "processor_config.json"):
        assert (ckpt / name).is_file()
    assert "Held-out accuracy before and after" in (out / "report.md").read_text()
    change = json.loads((out / "heldout_change.json").read_text())  # paired over the same 4 test questions
    before, after = result["before"]["accuracies"], result["after"]["accuracies"]
    assert len(before) == len(after) == change["n"] == 4
    assert change["change"] == pytest.approx(result["after"]["avg_at_k"] - result["before"]["avg_at_k"])
    assert change["before"] == result["before"]["avg_at_k"] and change["after"] == result["after"]["avg_at_k"]
    for png in (out / "plots").glob("*.png"):
        assert Image.open(png).size[0] > 100
    assert list((out / "tensorboard").glob("events.*"))
    assert (out / "samples" / "step-1-masked.png").is_file()
    assert load_config("papo_g", file=str(out / "config.yaml")).trainer.max_steps == 2
    with pytest.raises(ValueError, match="already holds a run"):
        run_train(cfg, str(out))


def test_config_errors_fail_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import papo.models.policy as policy_module

    monkeypatch.setattr(policy_module.Policy, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    for args, message in [(["--set", "algorithm.gamma=1"], "unknown config key 'algorithm.gamma'"),
                          (["--set", "trainer.max_steps=ten"], "not a valid int"),
                          (["--preset", "ppo"], "unknown preset 'ppo'"),
                          (["--set", "algorithm.kl_prcp_coef=-1"], "kl_prcp_coef must be >= 0")]:
        assert main(["train", "--out", str(tmp_path / "x"), *args]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ConfigError):
        load_config("papo_g", overrides=["trainer.rollout_batch_size=3", "trainer.mini_batch_size=2"])


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(small_cfg("grpo", ["trainer.keep_last=3"]), tmp_path, "cpu")
    trainer.step()
    good = trainer.save()
    trainer.step()

    def broken(out):
        (out).mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.policy, "save", broken)
    with pytest.raises(OSError, match="No space left"):
        trainer.save()
    dirs = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert dirs == [good.name]  # no half-written step-2, no leftover .tmp
    trainer.restore(good)
    assert trainer.step_no == 1


def test_hacking_monitor_flags_the_documented_signs():
    monitor = HackingMonitor(window=5)
    healthy = {"kl_prcp": 0.03, "clipfrac_high": 5e-4, "entropy": 0.4, "masked_entropy": 0.4}
    assert not any(monitor.observe(healthy) for _ in range(20))
    collapsing = {"kl_prcp": 1.2, "clipfrac_high": 7e-3, "entropy": 0.9, "masked_entropy": 1.3}
    warnings = [monitor.observe(collapsing) for _ in range(5)]
    assert warnings[-1].startswith("possible KL_prcp hacking") and "KL_prcp" in warnings[-1]
    only_kl = HackingMonitor(window=5)
    for _ in range(10):
        only_kl.observe(healthy)
    assert not any(only_kl.observe({**healthy, "kl_prcp": 1.0}) for _ in range(5))  # one sign is not enough


def test_hacking_monitor_flags_a_collapse_that_starts_from_a_large_kl():
    """A model that never saw masked images starts near KL_prcp 1.7; the k3 clamp at 10 caps the rise below
    4x, and with one update per step the clip fraction stays 0 (the with-grad runs of docs/RESULTS.md)."""
    monitor = HackingMonitor(window=5)
    start = {"kl_prcp": 1.8, "clipfrac_high": 0.0, "entropy": 0.13, "masked_entropy": 2.3}
    assert not any(monitor.observe(start) for _ in range(10))
    wobble = HackingMonitor(window=5)  # a healthy run's KL_prcp moves by a few tenths
    assert not any(wobble.observe({**start, "kl_prcp": 1.8 + 0.4 * (i % 2)}) for i in range(30))
    warnings = [monitor.observe({"kl_prcp": 9.0, "clipfrac_high": 0.0, "entropy": 0.22, "masked_entropy": 13.0}) for _ in range(5)]
    assert "KL_prcp 1.8 -> 9" in warnings[-1] and "both entropies rising" in warnings[-1]


def test_hacking_monitor_reads_the_authors_clip_fraction():
    """The clip sign follows pg_clipfrac_higher (both clip sides, as the authors plot it), not papo's A > 0 side."""
    calm = {"kl_prcp": 0.03, "pg_clipfrac_higher": 5e-3, "clipfrac_high": 5e-4, "entropy": 0.4, "masked_entropy": 0.4}
    rising = HackingMonitor(window=5)
    for _ in range(10):
        rising.observe(calm)
    warnings = [rising.observe({**calm, "kl_prcp": 1.2, "pg_clipfrac_higher": 1.2e-2}) for _ in range(5)]
    assert "clip fraction (pg_clipfrac_higher) 0.005 -> 0.012" in warnings[-1]
    # papo's high side alone rises 4x, but the authors' metric only 1.4x (< clip_rise 2): no second sign
    one_side = HackingMonitor(window=5)
    for _ in range(10):
        one_side.observe(calm)
    assert not any(one_side.observe({**calm, "kl_prcp": 1.2, "pg_clipfrac_higher": 7e-3, "clipfrac_high": 2e-3})
                   for _ in range(5))


def test_hacking_monitor_falls_back_to_clipfrac_high_for_older_rows():
    """A baseline logged before pg_clipfrac_higher existed is compared on clipfrac_high in both windows."""
    monitor = HackingMonitor(window=5)
    for _ in range(10):
        monitor.observe({"kl_prcp": 0.03, "clipfrac_high": 5e-4, "entropy": 0.4, "masked_entropy": 0.4})
    new = {"kl_prcp": 1.2, "pg_clipfrac_higher": 9e-3, "clipfrac_high": 7e-3, "entropy": 0.4, "masked_entropy": 0.4}
    warnings = [monitor.observe(new) for _ in range(5)]
    assert "clip fraction (clipfrac_high) 0.0005 -> 0.007" in warnings[-1]


def test_stop_on_hacking_rolls_back_to_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}

    def observe(self, row):
        calls["n"] += 1
        return "possible KL_prcp hacking: test" if calls["n"] == 3 else ""

    monkeypatch.setattr(HackingMonitor, "observe", observe)
    cfg = small_cfg("papo_g", ["trainer.max_steps=5", "trainer.save_every=1", "trainer.keep_last=5", "trainer.stop_on_hacking=true"])
    result = run_train(cfg, str(tmp_path / "run"))
    assert result["steps"] == 2  # stopped at step 3, weights and state restored from step-2
    assert any("rolled back to step-2" in w for w in result["warnings"])
    assert "Warnings" in (tmp_path / "run" / "report.md").read_text()


def test_overlong_prompts_are_filtered_from_file_datasets(tmp_path):
    assert main(["data", "generate", "--task", "count+maze", "--n", "4", "--size", "224", "--out", str(tmp_path / "d")]) == 0
    cfg = small_cfg("grpo", [f"data.train={tmp_path / 'd'}", "data.max_prompt_length=190"])
    trainer = Trainer(cfg, tmp_path / "run", "cpu")
    lengths = {s.task: trainer.prompt_tokens(s) for s in trainer.stream.data}
    assert set(lengths) == {"count"} and lengths["count"] <= 190  # count prompts ~180 tokens, maze ~200


def test_a_user_reward_file_named_in_the_config_scores_the_rollouts(tmp_path):
    (tmp_path / "length_reward.py").write_text(
        "def reward(response, answer, answer_type, meta):\n"
        "    return {'overall': 0.25, 'accuracy': 0.0, 'format': 1.0}\n")
    trainer = Trainer(small_cfg("grpo", [f"algorithm.reward={tmp_path / 'length_reward.py'}:reward"]), tmp_path, "cpu")
    row = trainer.step()
    assert row["reward"] == 0.25 and row["format"] == 1.0
    with pytest.raises(ConfigError, match="algorithm.reward"):
        small_cfg("grpo", ["algorithm.reward=exact_match"])


def test_resume_with_max_steps_extends_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    run_train(small_cfg("grpo", ["trainer.max_steps=2", "trainer.save_every=1"]), str(out))  # step-2 and final/
    assert main(["train", "--resume", str(out), "--max-steps", "3"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and (out / "checkpoints" / "step-3").is_dir()
    assert "max_steps: 3" in (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0  # nothing left to train: says so, evaluates nothing
    assert "already trained 3 steps" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    for flags in (["--model", "other"], ["--data", "synthetic:count"], ["--out", str(tmp_path / "x")]):
        assert main(["train", "--resume", str(out), *flags]) == 2
        assert f"{flags[0]} cannot change on --resume" in capsys.readouterr().err


def test_a_time_limit_ends_training_before_a_step_would_pass_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from papo.training import loop

    clock = [1000.0]  # every step takes 10 s of this clock; nothing else advances it
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: clock[0], strftime=time.strftime))
    step = Trainer.step

    def ten_seconds(self):
        clock[0] += 10.0
        return step(self)

    monkeypatch.setattr(Trainer, "step", ten_seconds)
    out = tmp_path / "run"
    # before step 3: 20 s gone + 10 s for the step > 25 s, so it ends after step 2 and saves it (save_every 20 would not)
    result = run_train(small_cfg("grpo", ["trainer.max_steps=4", "trainer.max_time_s=25"]), str(out))
    assert result["steps"] == 2 and [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    assert (out / "final" / "config.json").is_file()
    assert "trainer.max_time_s=25 ended training after step 2 of 4" in (out / "report.md").read_text()
    assert main(["train", "--resume", str(out), "--set", "trainer.max_time_s=0"]) == 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    ctx = SimpleNamespace(any=bool)
    clock[0] = 50.0
    assert loop._out_of_time(0.0, 20.0, 60.0, ctx) and not loop._out_of_time(0.0, 20.0, 80.0, ctx)
    assert not loop._out_of_time(0.0, 20.0, 0.0, ctx)  # 0: no limit
    with pytest.raises(ConfigError, match="max_time_s must be >= 0"):
        small_cfg("grpo", ["trainer.max_time_s=-1"])


def test_progress_lines_when_stdout_is_not_a_terminal(tmp_path):
    import io

    from rich.console import Console

    buf = io.StringIO()
    run_train(small_cfg("grpo", ["trainer.max_steps=2"]), str(tmp_path / "run"), console=Console(file=buf, force_terminal=False))
    lines = [line for line in buf.getvalue().splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 1/2", "step 2/2"]
    assert all("reward" in line and "s/step" in line for line in lines)


def test_lora_reference_is_the_policy_with_adapters_off(tmp_path):
    """Under LoRA the reference policy is no copy: the same model with its adapters disabled, which at step 0
    is exactly the policy (KL_ref 0), and later differs from it by what the adapters learned."""
    trainer = Trainer(small_cfg("papo_g", ["model.lora_rank=4", "optim.lr=1e-2"]), tmp_path / "run", "cpu")
    assert trainer.ref is trainer.policy.root
    first, second = trainer.step(), trainer.step()
    assert first["ref_kl"] == 0.0
    assert second["ref_kl"] > 0.0


def test_exact_entropies_with_a_logged_masked_branch_train(tmp_path):
    """Exact entropies come from the update's own forward; a masked branch that is only logged has none, so its
    entropy is left out of the row (this raised before)."""
    cfg = small_cfg("grpo", ["algorithm.entropy_estimator=exact", "trainer.log_kl_prcp=true"])
    row = Trainer(cfg, tmp_path, "cpu").step()
    assert row["kl_prcp"] > 0 and row["entropy"] > 0 and "masked_entropy" not in row


def test_noisy_rollout_samples_half_of_each_group_from_a_noised_image_and_trains_on_the_clean_one(tmp_path, monkeypatch):
    """NoisyRollout: two generate calls per step, the second with noised images (same size, other pixels) and
    the second half of each group's noise keys; the experience keeps only the clean images, and its groups are
    the clean half then the noised half of each prompt."""
    torch.manual_seed(0)
    trainer = Trainer(small_cfg("noisy_rollout", [GROUPS_WITH_DIFFERENT_REWARDS, "rollout.n=4"]), tmp_path, "cpu")
    calls, real = [], trainer.sampler.generate

    def spy(batch, params, n=1, keys=None, weights=None):
        out = real(batch, params, n=n, keys=keys, weights=weights)
        calls.append((batch, n, keys.clone(), out, weights))
        return out

    trainer.sampler.generate = spy
    row = trainer.step()
    exp = trainer.last_experience
    (clean, n1, k1, c1, w1), (noised, n2, k2, c2, w2) = calls
    assert w1 is None and w2 == ()  # the second call reuses the weights the first loaded
    assert n1 == n2 == 2 and torch.equal(clean.inputs["input_ids"], noised.inputs["input_ids"])
    assert clean.inputs["pixel_values"].shape == noised.inputs["pixel_values"].shape
    assert not torch.equal(clean.inputs["pixel_values"], noised.inputs["pixel_values"])
    assert torch.equal(torch.stack([k1.view(-1, 2), k2.view(-1, 2)], 1).view(-1), trainer_keys(trainer, exp))
    # group of prompt 0: its two clean completions, then its two noised ones
    width = exp.ids.shape[1]
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=trainer.policy.pad_id)  # noqa: E731
    assert torch.equal(exp.ids[:4], torch.cat([pad(c1.ids)[:2], pad(c2.ids)[:2]]))
    assert len(set(exp.uids[:4])) == 1
    clean = trainer.policy.load_images(exp.samples[3])[0]  # scoring and the update encode exp.images
    assert exp.images[3][0].tobytes() == clean.tobytes()
    assert row["skipped_updates"] == 0


def trainer_keys(trainer, exp):
    from papo.rollout.keyed_noise import rollout_keys

    draws = sorted({int(u.split(":")[0]) for u in exp.uids})
    return rollout_keys(trainer.cfg.trainer.seed, torch.tensor(draws), trainer.cfg.rollout.n)


def test_noisy_rollout_and_dvrp_share_one_noised_copy(tmp_path, monkeypatch):
    """Both on: the noised images NoisyRollout samples from are the view DVRP scores, made once per prompt."""
    import papo.training.trainer as trainer_module

    made = []
    real = trainer_module.diffusion_noise

    def counted(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "diffusion_noise", counted)
    trainer = Trainer(small_cfg("noisy_rollout", [GROUPS_WITH_DIFFERENT_REWARDS, "algorithm.kl_noise_coef=0.01"]),
                      tmp_path, "cpu")
    row = trainer.step()
    exp = trainer.last_experience
    assert len(made) == trainer.cfg.trainer.rollout_batch_size  # one image per prompt, noised once
    assert row["kl_noise"] > 0 and exp.noised_images[0] is exp.noised_images[1]


def test_the_pass_clock_adds_each_names_seconds():
    clock = PassClock("cpu")
    for name in ("old_logp_s", "masked_logp_s", "old_logp_s"):
        with clock.measure(name):
            time.sleep(0.01)
    timing = {"old_logp_s": 1.0}
    clock.add_to(timing)
    assert set(timing) == {"old_logp_s", "masked_logp_s"}
    assert 1.02 <= timing["old_logp_s"] < 1.5 and 0.01 <= timing["masked_logp_s"] < 0.5
    assert clock.spans == []  # read once
