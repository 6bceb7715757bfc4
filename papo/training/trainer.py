"""``papo train``: GRPO, DAPO, PAPO-G and PAPO-D in one loop, and the methods after PAPO (VPPO, PGPO,
NoisyRollout, DVRP) as options of the same step.

One training step, as in the paper's algorithm (``Trainer.step``):
  1. draw prompts; make one masked image per prompt, shared by its G rollouts and fresh for every draw (VPPO:
     one per rollout; DVRP: also one noised image per prompt)
  2. sample G responses per prompt from the full image (NoisyRollout: half of them from a noised one)
  3. rewards (0.9 accuracy + 0.1 format)
  4. DAPO only: keep groups with filter_low < mean(key) < filter_high, drawing more prompts until full
  5. old log-probs (full image; not for the first mini-batch, whose update sees the sampling weights), masked log-probs (masked image; PAPO, or
     trainer.log_kl_prcp), reference log-probs (when beta > 0): each no-grad pass only when something reads it
  6. group advantages (VPPO, PGPO: per token, by visual dependency)
  7. mini-batch updates, micro-batch gradient accumulation, grad-norm clip
A step with a non-finite reward or log-prob is skipped whole, a mini-batch with a non-finite gradient is not
applied: non-finite values never reach the weights, and each skip is logged with its cause.

Phases hand each other small dataclasses (``papo.training.experience``): ``collect`` (1-4) returns an
``Experience``, ``score_experience`` (5) its ``LogProbs``, ``update`` (6-7) the metrics.

Several processes (torchrun) run this same step on their share of the prompts: the policy is sharded with FSDP2,
decisions that skip or stop a step go through the distributed context (``self.ctx``), and only its main rank
writes. Simplifications, stated up front: one PPO epoch; sampling through ``papo.rollout.Sampler`` and scoring
through ``Policy.logprobs``; an out-of-memory error stops the run (every rank) rather than retrying smaller.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from papo.algo import (
    GroupOutcomes,
    dapo_group_filter,
    dependency_range,
    group_advantages,
    group_outcomes,
    kl_prcp_coef_at,
    kl_prcp_weights,
    masked_mean,
    mean_dependency,
    micro_batch_weight,
    papo_loss,
    perception_reward,
    pgpo_advantages,
    token_dependency,
    vppo_advantages,
)
from papo.config.schema import TrainConfig
from papo.data.masking import image_views
from papo.data.noising import diffusion_noise, noise_rng, noise_step_at
from papo.data.sample import Sample
from papo.data.stream import PromptStream
from papo.errors import TrainingStopped, UserError
from papo.models.checkpointing import checkpoint_mode
from papo.models.compiled import use_compiled_layers
from papo.models.inputs import PromptBatch, to_device
from papo.models.loading import ModelOptions
from papo.models.policy import Policy, RootCall
from papo.models.precision import Precision, store_for_compute
from papo.rewards import RewardFunction, get_reward, score_responses
from papo.rollout.keyed_noise import rollout_keys
from papo.rollout.sampler import Sampler
from papo.rollout.sampling import Completions, SamplingParams, interleave_groups
from papo.training.checkpoint import (
    is_sharded_checkpoint,
    latest_checkpoint,
    load_sharded_checkpoint,
    load_trainer_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from papo.training.distributed import DistContext
from papo.training.experience import Experience, LogProbs, MicroBatches, concat, select
from papo.training.faults import Poison, failpoint
from papo.training.monitor import HackingMonitor
from papo.training.optim import build_optimizer, constant_with_warmup
from papo.training.rng import rng_state, set_rng_state
from papo.training.sharding import check_world_size, full_state_dict, shard_model
from papo.training.timing import PassClock


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str | Path, device: str, train_data: Any = None,
                 reward: RewardFunction | None = None, ctx: DistContext | None = None) -> None:
        """``train_data`` / ``reward``: Python objects that replace ``cfg.data.train`` / ``cfg.algorithm.reward``
        (the Python API's rows in memory and reward callables). ``ctx``: the distributed context (default: the
        current process group, or a single process)."""
        self.cfg, self.out, self.device = cfg, Path(out), device
        self.ctx = ctx or DistContext.current(device)
        m = cfg.model
        self.precision = Precision.resolve(m.param_dtype, m.compute_dtype, device)
        opts = ModelOptions(m.param_dtype, m.attn_implementation, m.freeze_vision, m.gradient_checkpointing, m.lora_rank,
                            padding_free=m.padding_free, share_prompts=m.share_prompts,
                            uncheckpointed_layers=m.uncheckpointed_layers,
                            compile_layers=use_compiled_layers(m.compile_layers, device, m.lora_rank))
        self.policy = Policy.from_pretrained(m.name, opts, device, cfg.data.min_pixels, cfg.data.max_pixels,
                                             compute_dtype=self.precision.compute_dtype)
        # the reference policy, when the loss has a KL_ref term: under LoRA the policy itself with its adapters
        # off (the frozen base is the start policy), else a frozen copy under the same autocast, so KL_ref is
        # exactly 0 at step 0; unsharded, that copy keeps its matmul weights in the compute dtype, as autocast
        # would cast them (FSDP2's mixed precision casts each unit's weights once per forward instead)
        self.lora = hasattr(self.policy.model, "disable_adapter")
        self.sharded = self.ctx.group  # under torchrun, one process included
        self.ref = None
        if cfg.algorithm.kl_ref_coef > 0 and self.lora:
            self.ref = self.policy.root
        elif cfg.algorithm.kl_ref_coef > 0:
            frozen = copy.deepcopy(self.policy.model).eval().requires_grad_(False)
            self.ref = RootCall(frozen if self.sharded else store_for_compute(frozen, self.precision))
        if self.sharded:  # FSDP2: each rank holds 1/world of every weight; the reference model shards the same way
            check_world_size(cfg, self.ctx.world_size)
            for root in {id(r): r for r in (self.policy.root, self.ref) if r is not None}.values():
                shard_model(root, self.precision, self.policy.device, self.ctx.world_size)
        # a sharded policy: the engine keeps whole weights of its own, gathered one tensor at a time before each
        # rollout, and the transformers path keeps every rank decoding until all are done
        self.sampler = Sampler(self.policy, cfg.rollout.engine, cfg.rollout.compile, own_weights=self.sharded or None,
                               synced=self.sharded)
        self.loss_cfg = cfg.algorithm.loss_config()
        # token advantages shaped by visual dependency (pi_old against the masked image): VPPO needs it for a
        # whole mini-batch before its update, PGPO only per response
        self.vppo = cfg.algorithm.vppo_token_ratio > 0
        self.pgpo = cfg.algorithm.pgpo_threshold > 0
        self.needs = self.scoring_passes()
        # before the first optimizer step of a step the weights that sampled are the weights being updated: the
        # first mini-batch takes pi_old from the update's own forward (detached), unless a reward reads it first
        self.old_from_update = cfg.algorithm.kl_prcp_reward_coef == 0 and not self.vppo
        self.masking = cfg.algorithm.masking(encoder_patch_size=self.policy.patch_size)
        self.params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
        trainable = [p for p in self.policy.model.parameters() if p.requires_grad]
        self.optim = build_optimizer(trainable, cfg.optim.lr, cfg.optim.weight_decay, self.precision, cfg.optim.kahan_summation)
        self.sched = constant_with_warmup(self.optim, cfg.optim.warmup_steps)
        self.stream = PromptStream(cfg.data.train if train_data is None else train_data, cfg.trainer.seed, count_tokens=self.prompt_tokens,
                                   max_prompt_length=cfg.data.max_prompt_length)
        self.reward = reward or get_reward(cfg.algorithm.reward)  # a file.py:function the user named runs here, never data
        self.monitor = HackingMonitor()
        self.poison = Poison()  # failpoints' "nan" faults (papo.training.faults); inert unless configured
        self.step_no = 0
        self.bad_steps = 0  # consecutive steps whose updates were all skipped
        self.phase = ""

    def scoring_passes(self) -> dict[str, bool]:
        """Which of step 5's no-grad forwards a step needs. Old log-probs: unless the step makes one update
        (then the weights that sampled are the weights being updated, and the ratio is exactly 1); when it makes
        several, the pass covers the mini-batches after the first only (``old_from_update``). Old and masked,
        for every mini-batch: for a KL_prcp reward or VPPO's visual dependency. Masked: for
        a KL_prcp or masked-entropy term, or the KL_prcp metric when asked
        (``trainer.log_kl_prcp``), unless the update recomputes it with gradient. Reference: when beta > 0."""
        a, t = self.cfg.algorithm, self.cfg.trainer
        # built from the old and masked log-probs of a whole mini-batch before its update
        before_update = a.kl_prcp_reward_coef > 0 or self.vppo
        masked = self.loss_cfg.uses_masked_branch or before_update or self.pgpo or t.log_kl_prcp
        return {"noised": self.loss_cfg.kl_noise_coef > 0,
                "old": t.mini_batch_size < t.rollout_batch_size or before_update,
                "masked": masked and (before_update or self.pgpo or not self.loss_cfg.masked_forward_in_update),
                "ref": self.ref is not None}

    def prompt_tokens(self, sample: Sample) -> int:
        """Prompt length with image tokens, as the model sees it (chat template + processor)."""
        return int(self.policy.encode([sample.formatted_prompt()], [self.policy.load_images(sample)]).inputs["input_ids"].shape[1])

    # ------------------------------------------------------------------ one step

    def rollout(self, draws: list[tuple[int, Sample]]) -> Experience:
        """This rank's share of ``draws`` (contiguous, by draw index): G rollouts each, scored. Every rollout's
        sampling noise is keyed by (seed, draw, sample index), so its tokens do not depend on the world size."""
        draws = self.ctx.share(draws)
        g, samples, uids, images, masked = self.cfg.rollout.n, [], [], [], []
        per_response = self.cfg.algorithm.mask_per_response
        for pos, sample in draws:
            ims, views = image_views(sample, self.masking, self.cfg.trainer.seed, pos, self.policy.min_pixels,
                                     self.policy.max_pixels, responses=g if per_response else 0)
            for j in range(g):
                samples.append(sample)
                uids.append(f"{pos}:{sample.id}")
                images.append(ims)
                masked.append(views[j if per_response else 0])
        # one prompt per draw; its G rollouts share the prompt (and, with papo.rollout, one prefill)
        prompts = [s.formatted_prompt() for _, s in draws]
        batch = self.policy.encode(prompts, images[::g])
        keys = rollout_keys(self.cfg.trainer.seed, torch.tensor([pos for pos, _ in draws]), g)
        # one noised copy per prompt, for NoisyRollout's sampling and DVRP's third view alike
        noised = self._noised(draws, images[::g]) if self.cfg.algorithm.noisy_rollout or self.needs["noised"] else None
        if self.cfg.algorithm.noisy_rollout:
            comp = self._noisy_rollout(prompts, batch, noised, keys)
        else:
            comp = self.sampler.generate(batch, self.params, n=g, keys=keys)
        self.sampler.release()  # the update needs that memory more than the next rollout does
        failpoint("rollout")
        texts = self.policy.decode(comp)
        scores = score_responses(texts, [s.answer for s in samples], [s.answer_type for s in samples],
                                 [s.meta for s in samples], reward=self.reward)
        for score in scores:  # a reward need only return "overall": it then stands for correctness too
            score.setdefault("accuracy", score["overall"])
        prompt_tokens = batch.inputs["attention_mask"].sum(-1).repeat_interleave(g)
        third_view = [view for view in noised for _ in range(g)] if self.needs["noised"] else None  # DVRP
        return Experience(samples, uids, images, masked, comp.ids, comp.mask, texts, scores, prompt_tokens, third_view)

    def _noisy_rollout(self, prompts: list[str], batch: PromptBatch, noised: list[list[Any]],
                       keys: torch.Tensor) -> Completions:
        """NoisyRollout: each group's first half sampled with the clean image, its second half with a noised one
        (one per prompt, its diffusion step annealed over training). Everything after sampling sees the clean
        image: the experience keeps it, so scoring and the update never see the noise."""
        g = self.cfg.rollout.n
        half = g // 2
        keys = keys.view(len(prompts), g)
        clean = self.sampler.generate(batch, self.params, n=half, keys=keys[:, :half].reshape(-1))
        # the engine has this step's weights already: a sharded policy need not gather them twice
        parts = [clean, self.sampler.generate(self.policy.encode(prompts, noised), self.params, n=half,
                                              keys=keys[:, half:].reshape(-1), weights=())]
        return interleave_groups(parts, [half, half], self.policy.pad_id)

    def _noised(self, draws: list[tuple[int, Sample]], images: list[list[Any]]) -> list[list[Any]]:
        """Each prompt's images after the diffusion noise of this step (``papo.data.noising``), keyed by (seed,
        sample, draw, image)."""
        a = self.cfg.algorithm
        k = noise_step_at(self.step_no + 1, self.cfg.trainer.max_steps, a.noise_step, a.noise_decay, a.noise_mid_step)
        return [[diffusion_noise(im, k, noise_rng(self.cfg.trainer.seed, sample.id, pos, i))
                 for i, im in enumerate(ims)] for (pos, sample), ims in zip(draws, images)]

    @property
    def round_size(self) -> int:
        """Prompts one generation round draws: DAPO's filter rounds may draw fewer than the batch and repeat
        (the config allows gen_batch_size only with the filter on)."""
        return self.cfg.trainer.gen_batch_size or self.cfg.trainer.rollout_batch_size

    def collect(self, timing: dict[str, float]) -> tuple[Experience, dict[str, float]]:
        """Steps 1-4: prompts -> rollouts -> rewards, with DAPO's filter-and-regenerate when enabled. The metrics
        describe every group generated, filtered or not: those all correct or all wrong carry no advantage."""
        a, want = self.cfg.algorithm, self.cfg.trainer.rollout_batch_size
        t0 = time.time()
        if not a.online_filter:
            exp = self.rollout(self.stream.take(want))
            timing["rollout_s"] = time.time() - t0
            return exp, _outcome_metrics([_group_outcomes(exp)])
        kept: list[Experience] = []
        # every round's outcomes and accuracies, not its experience: twenty rounds of images add up
        outcomes: list[GroupOutcomes] = []
        generated_accuracy: list[float] = []
        quota = want // self.ctx.world_size  # each rank fills its own share; all ranks run the same rounds
        groups = rounds = 0
        while self.ctx.any(groups < quota):
            if rounds >= a.max_filter_rounds:
                total = int(self.ctx.sum(groups)[0])
                if a.filter_fallback == "error":
                    raise RuntimeError(f"DAPO filter kept {total} of {want} prompt groups after {rounds} rounds "
                                       "(algorithm.max_filter_rounds); the task is too easy or too hard for this model "
                                       "(algorithm.filter_fallback=kept trains on the groups kept)")
                # every rank trains on as many groups as the rank that kept fewest: their updates must match
                quota = min(quota, -int(self.ctx.max(-groups)[0]))
                if quota == 0:
                    raise RuntimeError(f"DAPO filter kept {total} of {want} prompt groups after {rounds} rounds, "
                                       "too few for every rank to train on one; the task is too easy or too hard for this model")
                break
            exp = self.rollout(self.stream.take(self.round_size))
            outcomes.append(_group_outcomes(exp))
            generated_accuracy += [float(s["accuracy"]) for s in exp.scores]
            rounds += 1
            result = dapo_group_filter(torch.tensor([s[a.filter_key] for s in exp.scores]), exp.uids,
                                       a.filter_low, a.filter_high, a.keep_all_if_empty)
            keep = [i for i in range(exp.size) if result.keep[i]]
            kept.append(select(exp, keep))
            groups += result.kept_groups
        exp = concat(kept)
        exp = select(exp, list(range(quota * self.cfg.rollout.n)))  # truncate to exactly this rank's share
        timing["rollout_s"] = time.time() - t0
        return exp, {"filter_rounds": rounds, "filter_kept_groups": groups, "filter_trained_groups": quota,
                     **_outcome_metrics(outcomes),
                     "accuracy_before_filter": _finite_mean(generated_accuracy)}

    @torch.no_grad()
    def score_experience(self, exp: Experience, batches: MicroBatches, timing: dict[str, float]) -> LogProbs:
        """Step 5: old, masked and reference log-probs, each from a no-grad forward with the current weights,
        each only when something reads it (``needs``)."""
        T, device = self.cfg.rollout.temperature, self.policy.device
        # filled on the device and copied to the host once: a copy per pass would make the host wait for the GPU
        out = {name: torch.zeros(exp.ids.shape, device=device) for name in ("old", "masked", "ref", "noised") if self.needs[name]}
        first = set(batches.rows(0)) if self.old_from_update and batches.plan else set()
        clock = PassClock(device)
        self.policy.model.eval()
        with self.policy.compiled_passes(self.ref):
            self._score(batches, out, first, T, clock)
        self.policy.model.train()
        out = {name: logp.cpu() for name, logp in out.items()}
        clock.add_to(timing)
        logps = self.poison.logprobs(out)
        return LogProbs(old=logps.get("old"), masked=logps.get("masked"), ref=logps.get("ref"), noised=logps.get("noised"))

    def _score(self, batches: MicroBatches, out: dict[str, torch.Tensor], first: set[int], T: float,
               clock: PassClock) -> None:
        for mb in batches.scoring():
            rows = to_device(torch.tensor(mb.rows), self.policy.device)
            for name in out:
                if name == "old" and set(mb.rows) <= first:  # the first mini-batch's come from its update
                    continue
                adapter_off = self.policy.model.disable_adapter() if name == "ref" and self.lora else contextlib.nullcontext()
                with clock.measure(f"{name}_logp_s"), adapter_off:
                    images = {"masked": mb.masked, "noised": mb.noised}.get(name)
                    logp = self.policy.logprobs(mb.full, mb.ids, mb.mask, T, images=images,
                                                model=self.ref if name == "ref" else None)[0]
                    out[name][rows, : logp.shape[1]] = logp.float()

    def update(self, exp: Experience, batches: MicroBatches, logps: LogProbs, adv: torch.Tensor, gamma: float,
               timing: dict[str, float]) -> dict[str, float]:
        """Step 7: one optimizer step per mini-batch of prompts, gradients accumulated over micro-batches."""
        with self.policy.compiled_passes():  # the backward's recomputation runs the forward's compiled layers
            return self._update(exp, batches, logps, adv, gamma, timing)

    def _update(self, exp: Experience, batches: MicroBatches, logps: LogProbs, adv: torch.Tensor, gamma: float,
                timing: dict[str, float]) -> dict[str, float]:
        t0, c, T = time.time(), self.cfg, self.cfg.rollout.temperature
        self.policy.model.train()  # whoever called last: gradient checkpointing acts in train mode only
        correct = torch.tensor([s["accuracy"] for s in exp.scores]) > 0.5
        weights = kl_prcp_weights(correct, c.algorithm.kl_prcp_apply_mode, c.algorithm.incorrect_weight)
        exact = self.loss_cfg.entropy_estimator == "exact"
        sums: dict[str, float] = {}
        count = skipped = 0
        norms, causes = [], []
        for index in range(len(batches.plan)):
            micro_batches = batches.micro_batch_count(index)
            total_tokens = 0.0  # valid tokens of the mini-batch on every rank: only mini_batch weighting needs them
            if c.algorithm.token_mean_scope == "mini_batch":
                total_tokens = self.ctx.sum(float(exp.mask[batches.rows(index)].sum()))[0]
            self.optim.zero_grad(set_to_none=True)
            dep_range = self._dependency_range(exp, batches.rows(index), logps) if self.vppo else None
            for mb in batches.update_passes(index):  # one forward and backward per trainer.update_micro_batch_size sequences
                failpoint("update")
                rows, w, dev = mb.rows, mb.ids.shape[1], self.policy.device
                logp, ent = self.policy.logprobs(mb.full, mb.ids, mb.mask, T, with_entropy=exact)
                # before the step's first optimizer step pi_old is the policy itself: its log-probs, detached
                on_policy = logps.old is None or (index == 0 and self.old_from_update)
                old = logp.detach() if on_policy else to_device(logps.old[rows, :w], dev)
                masked_logp = None if logps.masked is None else to_device(logps.masked[rows, :w], dev)
                masked_ent = None
                if self.loss_cfg.masked_forward_in_update:  # papo_loss decides whether gradient flows through it
                    masked_logp, masked_ent = self.policy.logprobs(mb.full, mb.ids, mb.mask, T, images=mb.masked, with_entropy=exact)
                ref_logp = None if logps.ref is None else to_device(logps.ref[rows, :w], dev)
                noised_logp = None if logps.noised is None else to_device(logps.noised[rows, :w], dev)
                mask, adv_rows, kl_weights = to_device(mb.mask, dev), to_device(adv[rows], dev), to_device(weights[rows], dev)
                shaped = self.vppo or self.pgpo  # old is pi_old here either way: scored, or this forward's own
                dependency = token_dependency(old, to_device(logps.masked[rows, :w], dev)) if shaped else None
                loss = 0.0
                for g in batches.loss_groups(mb):  # each micro-batch its own token mean, as the authors weigh tokens
                    group_adv = adv_rows[g]
                    if self.vppo:  # the visually dependent tokens keep the advantage, scaled per response
                        group_adv = vppo_advantages(group_adv, dependency[g], mask[g], *dep_range,
                                                    c.algorithm.vppo_token_ratio, c.algorithm.vppo_scale_min)
                    elif self.pgpo:  # advantage moved towards the visually dependent tokens, sum kept
                        group_adv = pgpo_advantages(group_adv, dependency[g], mask[g], c.algorithm.pgpo_threshold,
                                                    c.algorithm.pgpo_boost)
                    if shaped:
                        sums["visual_dependency"] = sums.get("visual_dependency", 0.0) + masked_mean(dependency[g], mask[g]).detach()
                    part, metrics = papo_loss(
                        self.loss_cfg, logp[g], old[g], group_adv, mask[g], masked_log_probs=_rows(masked_logp, g),
                        ref_log_probs=_rows(ref_logp, g), kl_prcp_coef=gamma, kl_prcp_weights=kl_weights[g],
                        entropies=_rows(ent, g), masked_entropies=_rows(masked_ent, g),
                        noised_log_probs=_rows(noised_logp, g),
                    )
                    loss = loss + part * micro_batch_weight(c.algorithm.token_mean_scope, micro_batches,
                                                            float(mb.mask[g].sum()), total_tokens, self.ctx.world_size)
                    for k, v in metrics.items():  # kept on the device: a read here would stall the GPU before the backward
                        sums[k] = sums.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else v)
                    count += 1
                loss.backward()
            self.poison.gradients(self.policy.model.parameters())
            params = [p for p in self.policy.model.parameters() if p.grad is not None]
            total = torch.nn.utils.get_total_norm([p.grad for p in params])
            norm = total.full_tensor() if isinstance(total, DTensor) else total  # sharded: the norm over all ranks
            if not self.ctx.any(not torch.isfinite(norm)):  # every rank applies the update, or none does
                torch.nn.utils.clip_grads_with_norm_(params, c.optim.grad_clip, total)
                self.optim.step()
            else:  # a non-finite gradient never reaches the weights; the gradients are still unclipped, so say where
                skipped += 1
                where = "; ".join(f"rank {r}: {w}" if self.ctx.world_size > 1 else w
                                  for r, w in enumerate(self.ctx.gather(nonfinite_gradients(self.policy.model))) if w)
                causes.append(f"non-finite gradient norm in mini-batch {index}" + (f" ({where})" if where else ""))
                self.optim.zero_grad(set_to_none=True)
            norms.append(float(norm))
        self.sched.step()
        timing["update_s"] = time.time() - t0
        metrics = {k: float(v) / max(1, count) for k, v in sums.items()}
        metrics["grad_norm"] = sum(norms) / len(norms)
        metrics["skipped_updates"] = skipped
        metrics["skipped"] = "; ".join(causes)
        metrics["updates"] = len(norms)
        return metrics

    def _dependency_range(self, exp: Experience, rows: list[int], logps: LogProbs) -> tuple[float, float]:
        """VPPO's lo and hi: the lowest and highest mean visual dependency of a mini-batch's responses, over
        every rank's share."""
        mask = exp.mask[rows]
        dep = token_dependency(logps.old[rows], logps.masked[rows])
        lo, hi = dependency_range(mean_dependency(dep, mask), mask.bool().any(-1))
        neg_lo, hi = self.ctx.max(-lo, hi)
        return -neg_lo, hi

    def step(self) -> dict[str, Any]:
        """One step of the paper's algorithm; returns its metrics row."""
        timing: dict[str, float] = {}
        t0 = time.time()
        a = self.cfg.algorithm
        try:
            # 1-4. prompts and their masked images, G rollouts each, rewards (DAPO: filter and draw again)
            self.phase = "rollout"
            exp, extra = self.collect(timing)
            t = self.cfg.trainer
            per_update = t.mini_batch_size // self.ctx.world_size * self.cfg.rollout.n  # this rank's share
            batches = MicroBatches(exp, self.policy, t.micro_batch_size, per_update, t.scoring_micro_batch_size,
                                   t.update_micro_batch_size)
            # 5. old, masked and reference log-probs
            self.phase = "scoring"
            logps = self.score_experience(exp, batches, timing)
            rewards = self.poison.rewards(torch.tensor([float(s["overall"]) for s in exp.scores]))
            scores = rewards  # what advantages are computed from; "reward" in the metrics stays the task reward
            if a.kl_prcp_reward_coef > 0:  # variant: KL_prcp in the reward instead of (or besides) the loss
                bonus = perception_reward(logps.old, logps.masked, exp.mask, a.kl_prcp_reward_coef, a.kl_prcp_estimator)
                scores = rewards + bonus
                extra["kl_prcp_reward"] = float(bonus.mean())
            self.phase = "update"
            # log-probs the update computes itself (on-policy old ones) are checked through its gradient norm
            fault = nonfinite_inputs(scores, logps.named(), exp.mask)
            if self.ctx.any(bool(fault)):  # skip the whole step, on every rank: its advantages or ratios would be garbage
                causes = "; ".join(f"rank {r}: {c}" if self.ctx.world_size > 1 else c
                                   for r, c in enumerate(self.ctx.gather(fault)) if c)
                metrics = {"skipped_updates": 1, "updates": 0, "skipped": causes}
            else:
                # 6. group advantages; 7. clipped-surrogate + KL terms, mini-batch updates
                adv = group_advantages(scores, exp.uids, a.adv_estimator)
                gamma = kl_prcp_coef_at(self.step_no, self.cfg.trainer.max_steps, a.kl_prcp_coef, a.kl_prcp_schedule,
                                        anneal_ratio=a.kl_prcp_anneal_ratio)
                metrics = self.update(exp, batches, logps, adv, gamma, timing)
        except torch.OutOfMemoryError as err:
            self.optim.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise TrainingStopped(self._oom_message()) from err
        timing["encode_s"] = batches.seconds
        self.step_no += 1
        self.bad_steps = self.bad_steps + 1 if metrics["skipped_updates"] >= max(1, metrics["updates"]) else 0
        lengths = exp.mask.sum(-1).float()
        row = {
            "step": self.step_no,
            "reward": _finite_mean(rewards.tolist()),
            "accuracy": _finite_mean([float(s["accuracy"]) for s in exp.scores]),
            **({"format": _finite_mean([float(s["format"]) for s in exp.scores])} if all("format" in s for s in exp.scores) else {}),
            "response_length": float(lengths.mean()),
            # verl's response_length/clip_ratio: responses the token cap cut off (one kind of KL_prcp hacking
            # stops ending its responses, docs/RESULTS.md)
            "response_clip_ratio": float((lengths >= self.cfg.rollout.max_new_tokens).float().mean()),
            "lr": self.sched.get_last_lr()[0],
            **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items() if k != "updates"},
            **extra,
            **{k: round(v, 3) for k, v in timing.items()},
            "step_s": round(time.time() - t0, 3),
            "tokens": exp.tokens,
        }
        if self.policy.device.type == "cuda":
            row["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(self.policy.device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(self.policy.device)
        row = self._over_ranks(row)
        row["tokens_per_s"] = round(row["tokens"] / max(row["step_s"], 1e-9), 1)  # all ranks' tokens
        row["hacking_warning"] = self.monitor.observe(row)  # the same row on every rank: the same verdict
        self.last_experience = exp
        return row

    def _over_ranks(self, row: dict[str, Any]) -> dict[str, Any]:
        """Every rank's row made one: token and group counts summed, memory peaks the largest, the rest averaged
        (every rank holds an equal share of the step's sequences, so a mean of means is the mean)."""
        if self.ctx.world_size == 1:
            return row
        keys = sorted(k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step")
        summed = {"tokens", "filter_kept_groups", "filter_trained_groups"}
        sums = dict(zip(keys, self.ctx.sum(*(row[k] for k in keys))))
        peaks = dict(zip(keys, self.ctx.max(*(row[k] for k in keys))))
        out = dict(row)
        for k in keys:
            value = sums[k] if k in summed else peaks[k] if k == "gpu_peak_gib" else sums[k] / self.ctx.world_size
            out[k] = type(row[k])(value) if isinstance(row[k], int) else value
        return out

    def _oom_message(self) -> str:
        c = self.cfg
        size_key = "trainer.gen_batch_size" if c.trainer.gen_batch_size else "trainer.rollout_batch_size"
        update_size = max(c.trainer.update_micro_batch_size, c.trainer.micro_batch_size)  # sequences per update pass
        update_key = "trainer.update_micro_batch_size" if update_size > c.trainer.micro_batch_size else "trainer.micro_batch_size"
        lower = {
            "rollout": (f"{size_key} (now {self.round_size}; x rollout.n = {self.round_size * c.rollout.n} sequences are "
                        "sampled at once), "
                        f"rollout.max_new_tokens (now {c.rollout.max_new_tokens}) or data.max_pixels (now {c.data.max_pixels})"),
            "scoring": (f"trainer.scoring_micro_batch_size (now {c.trainer.scoring_micro_batch_size or c.trainer.micro_batch_size}), "
                        f"data.max_pixels (now {c.data.max_pixels}) or rollout.max_new_tokens (now {c.rollout.max_new_tokens})"),
        }.get(self.phase, f"{update_key} (now {update_size}), data.max_pixels (now "
                          f"{c.data.max_pixels}) or rollout.max_new_tokens (now {c.rollout.max_new_tokens})"
                          + ("" if checkpoint_mode(c.model.gradient_checkpointing) == "full"
                             else ", or set model.gradient_checkpointing=true"))
        last = latest_checkpoint(self.out / "checkpoints")
        where = f" on rank {self.ctx.rank} of {self.ctx.world_size}" if self.ctx.world_size > 1 else ""
        return (f"out of memory during the {self.phase} phase of step {self.step_no + 1}{where}. Lower {lower}. Nothing was "
                f"saved for this step; " + (f"resume from {last.name} with --resume." if last else "no checkpoint exists yet."))

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the weights (sharded runs keep the optimizer in ``dcp/`` instead)."""
        state = {"step": self.step_no, "data_pos": self.stream.pos, "scheduler": self.sched.state_dict(), "rng": rng_state(),
                 "monitor": self.monitor.state(), "bad_steps": self.bad_steps}
        return state if self.sharded else {**state, "optimizer": self.optim.state_dict()}

    def save(self) -> Path:
        """Every rank calls this; the main rank writes (sharded: each rank writes its shards); every rank gets
        the checkpoint's path."""
        root, keep = self.out / "checkpoints", self.cfg.trainer.keep_last
        if self.sharded:
            return save_sharded_checkpoint(root, self.step_no, self.policy.model, self.optim, self.state(), self.ctx.rank,
                                           self.ctx.barrier, keep)
        if not self.ctx.is_main:
            return root / f"step-{self.step_no}"
        return save_checkpoint(root, self.step_no, self.policy, self.state(), keep)

    def save_final(self, path: Path) -> None:
        """The trained model as a Hugging Face directory, written by the main rank (sharded: gathered first)."""
        state_dict = full_state_dict(self.policy.model) if self.sharded else None
        if self.ctx.is_main:
            self.policy.save(path, state_dict=state_dict)
        self.ctx.barrier()

    def restore(self, ckpt: Path) -> None:
        if is_sharded_checkpoint(ckpt):  # written by several processes: loads at this world size, one included
            state = load_sharded_checkpoint(ckpt, self.policy.model, self.optim, self.ctx.rank)
        elif self.sharded:
            raise UserError(f"{ckpt} was written by a single process; resume it with one process (or start a new run)")
        else:
            state = load_trainer_state(ckpt)
            # through from_pretrained: checkpoint key names are transformers' serialized names, not module paths
            saved = type(self.policy.model).from_pretrained(ckpt, dtype=next(self.policy.model.parameters()).dtype)
            self.policy.model.load_state_dict(saved.state_dict(), strict=True)
            self.optim.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"] if "rng" in state else {"cpu": state["torch_rng"]})  # "torch_rng": older checkpoints
        self.stream.pos, self.step_no = int(state["data_pos"]), int(state["step"])
        self.monitor.load(state.get("monitor", {}))
        self.bad_steps = int(state.get("bad_steps", 0))

def nonfinite_inputs(rewards: torch.Tensor, logps: dict[str, torch.Tensor], mask: torch.Tensor) -> str:
    """Why a step's loss inputs are unusable ("" if they are fine): rewards (N,), log-probs (N, R) under mask."""
    causes = []
    if bad := int((~torch.isfinite(rewards)).sum()):
        causes.append(f"non-finite reward ({bad} of {rewards.numel()})")
    valid = mask.bool()
    for name, values in logps.items():
        if bad := int((~torch.isfinite(values[:, : valid.shape[1]]) & valid[:, : values.shape[1]]).sum()):
            causes.append(f"non-finite {name} log-probs ({bad} tokens)")
    return "; ".join(causes)


def nonfinite_gradients(model: torch.nn.Module) -> str:
    """Which of this rank's gradients are not finite ("" if none): how many tensors, and the first few by name,
    so a skipped update points at the layer where the NaN or inf appeared."""
    grads = [(name, p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
             for name, p in model.named_parameters() if p.grad is not None]
    bad = [name for name, grad in grads if not bool(torch.isfinite(grad).all())]
    if not bad:
        return ""
    return f"not finite in {len(bad)} of {len(grads)} gradient tensors, first {', '.join(bad[:3])}"


def _rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def _group_outcomes(exp: Experience) -> GroupOutcomes:
    return group_outcomes(torch.tensor([float(s["accuracy"]) for s in exp.scores]), exp.uids)


def _outcome_metrics(counts: list[GroupOutcomes]) -> dict[str, float]:
    """Shares of the prompt groups generated this step whose responses were all correct or all wrong: GRPO's
    advantages are zero on them and DAPO's filter drops them, so their rise shows the step's signal thinning."""
    total = max(1, sum(c.groups for c in counts))
    return {"groups_all_correct": sum(c.all_correct for c in counts) / total,
            "groups_all_wrong": sum(c.all_wrong for c in counts) / total}


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
