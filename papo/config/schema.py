"""One typed config for ``papo train``: YAML presets plus ``--set section.key=value`` overrides.

Every key is validated before any model loads: unknown keys and bad values fail with a message naming them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from papo.algo import ADV_ESTIMATORS, APPLY_MODES, GAMMA_SCHEDULES, TOKEN_MEAN_SCOPES, LossConfig
from papo.data.masking import MaskingConfig
from papo.errors import ConfigError
from papo.models.checkpointing import MODES as CHECKPOINT_MODES
from papo.models.precision import Precision
from papo.rewards import REWARDS
from papo.rollout.sampler import ENGINES

PRESETS = ("grpo", "papo_g", "papo_g_7b", "papo_g_no_ref", "dapo", "papo_d", "vppo", "pgpo", "noisy_rollout", "dvrp")


@dataclass
class ModelSection:
    name: str | None = None  # None: the embedded default; else a local dir or hub id
    # master weights, gradients and optimizer states; bfloat16 is the authors' memory-lean scheme (papo.models.precision)
    param_dtype: str = "float32"
    compute_dtype: str = "auto"  # forward/backward matmuls and rollouts: auto = bfloat16 on CUDA, param_dtype elsewhere
    attn_implementation: str | None = None
    freeze_vision: bool = False
    # false, true (full: recompute each block in the backward) or selective (keep matmul and attention outputs)
    gradient_checkpointing: bool | str = False
    uncheckpointed_layers: int = 0  # with checkpointing: the last decoder layers keep their activations (memory for speed)
    lora_rank: int = 0
    padding_free: bool = True  # scoring and update forwards pack each micro-batch's sequences without padding
    # packed forwards hold one copy of a prompt that several rollouts share (exact; fewer tokens per pass)
    share_prompts: bool = True
    # scoring and update forwards through torch.compile'd transformer blocks and head (papo.models.compiled); auto:
    # on CUDA when every weight trains, in one process or sharded
    compile_layers: bool | str = "auto"


@dataclass
class DataSection:
    train: str = "synthetic:all?size=224"
    val: str = "synthetic:all?split=val&size=224&n=70"
    test: str = "synthetic:all?split=test&size=224&n=140"  # before/after table at the end of a run
    min_pixels: int | None = None  # PAPO's resize rule before the processor (official: 200704 / 1003520)
    max_pixels: int | None = None
    max_prompt_length: int = 4096


@dataclass
class RolloutSection:
    n: int = 8  # G rollouts per prompt (official 5)
    temperature: float = 1.0
    top_p: float = 1.0  # official rollouts use 0.99
    top_k: int = 0
    max_new_tokens: int = 48  # official 2048
    engine: str = "auto"  # auto: papo.rollout on CUDA for the models it supports, else transformers generate; papo | hf
    compile: bool = True  # papo.rollout on CUDA: torch.compile its prefill and decode (seconds to a minute, once); false: eager


@dataclass
class AlgorithmSection(LossConfig):
    """The loss keys are ``papo.algo.LossConfig``'s own fields (clip_low ... entropy_band_coef, declared there
    once), here with the GRPO presets' beta; the keys below configure advantages, KL_prcp scheduling and
    weighting, the masked image, DAPO's filter and the reward. Validated as a whole by ``TrainConfig.validate``."""

    kl_ref_coef: float = 0.01
    entropy_band: list[float] | None = None  # [h_min, h_max] (write-up: [0.1, 2.0]) with entropy_band_coef (0.01)
    kl_prcp_reward_coef: float = 0.0  # > 0: add coef * sum_t KL_prcp_t (old vs masked) to each response's reward
    adv_estimator: str = "grpo"
    # token-mean over each micro-batch (the authors') or over the whole mini-batch on every rank (papo.algo.micro_batch_weight)
    token_mean_scope: str = "micro_batch"
    # KL_prcp scheduling and weighting
    kl_prcp_schedule: str = "fixed"
    kl_prcp_anneal_ratio: float = 0.5
    kl_prcp_apply_mode: str = "all"
    incorrect_weight: float = 0.1
    # masked image
    masking_strategy: str = "random"
    mask_ratio: float = 0.6
    mask_patch_size: int = 14  # 0: follow the vision encoder's patch size (14 Qwen2.5-VL, 16 Qwen3-VL / ViT-16)
    mask_per_response: bool = False  # each rollout its own masked image (VPPO) instead of one per prompt (PAPO)
    # DAPO online filtering
    online_filter: bool = False
    filter_key: str = "accuracy"
    filter_low: float = 0.01
    filter_high: float = 0.99
    max_filter_rounds: int = 20  # the authors' max_try_make_batch
    # when max_filter_rounds leave the batch short: "error" (the authors', verl's) or "kept" (train on the groups
    # kept; a model whose groups mostly agree needs ever more rounds, docs/RESULTS.md seventh run)
    filter_fallback: str = "error"
    keep_all_if_empty: bool = False
    # reward: papo_math (0.9 accuracy + 0.1 format), math_only, or path/to/file.py:function (runs that file)
    reward: str = "papo_math"
    # VPPO (papo.algo.visual_dependency): the share of each response's tokens, by visual dependency, that keep
    # their advantage (0: off; the authors' 0.4), and the lowest trajectory advantage scale (the authors' 0.9)
    vppo_token_ratio: float = 0.0
    vppo_scale_min: float = 0.9
    # PGPO (papo.algo.visual_dependency): token advantages reshaped by visual dependency, below the threshold
    # scaled down, above it boosted up to 1 + boost, with each response's sum kept (0: off; 0.4 and 2.0)
    pgpo_threshold: float = 0.0
    pgpo_boost: float = 2.0
    # NoisyRollout (papo.data.noising): half of each group's rollouts sample from a noised image (scored and
    # updated with the clean one); the diffusion step anneals from noise_step with a sigmoid of slope
    # noise_decay that halves it at training step noise_mid_step (the authors' 500, 30, 40)
    noisy_rollout: bool = False
    noise_step: int = 500
    noise_decay: float = 30.0
    noise_mid_step: float = 40.0  # below 1: a fraction of trainer.max_steps (DVRP: 0.5, with noise_decay 10)

    def __post_init__(self) -> None:  # overrides arrive after construction: checked in TrainConfig.validate
        pass

    def loss_config(self) -> LossConfig:
        values = {f.name: getattr(self, f.name) for f in fields(LossConfig)}
        if values["entropy_band"] is not None:
            values["entropy_band"] = tuple(values["entropy_band"])
        return LossConfig(**values)

    def masking(self, encoder_patch_size: int = 14) -> MaskingConfig:
        patch = self.mask_patch_size or encoder_patch_size
        return MaskingConfig(strategy=self.masking_strategy, ratio=self.mask_ratio, patch_size=patch)


@dataclass
class OptimSection:
    lr: float = 1e-4  # the embedded tiny model; the official 3B/7B runs use 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 0
    kahan_summation: bool | None = None  # compensated AdamW updates; None: on exactly when model.param_dtype is 16-bit


@dataclass
class TrainerSection:
    max_steps: int = 100
    # seconds from the start of `papo train` (model loading included) after which training ends, before a step
    # as long as the longest of the last three would pass it; then checkpoint, held-out check, final/ and report
    # as at max_steps. For a job slot or a call with a time limit (leave room for those last writes); 0: no limit
    max_time_s: float = 0.0
    rollout_batch_size: int = 8  # prompts per step (official 384)
    # DAPO filter: prompts drawn per generation round, rounds repeating until rollout_batch_size groups are kept;
    # 0 = rollout_batch_size (official mini_rollout_batch_size 128, so a full batch needs at least 3 rounds)
    gen_batch_size: int = 0
    mini_batch_size: int = 8  # prompts per optimizer update (official 128: 3 updates per step)
    micro_batch_size: int = 32  # sequences per forward/backward (official 4 per GPU)
    # sequences per no-grad scoring forward (old / masked / reference log-probs), a multiple of micro_batch_size;
    # 0 = micro_batch_size (official micro_batch_size_per_device_for_experience 16)
    scoring_micro_batch_size: int = 0
    # sequences per forward/backward pass of the update, a multiple of micro_batch_size; 0 = micro_batch_size.
    # The loss still takes its token mean per micro_batch_size sequences: speed and memory change, the gradient does not
    update_micro_batch_size: int = 0
    seed: int = 0
    device: str = "auto"
    save_every: int = 20  # keep this key name: scripts rely on it
    keep_last: int = 2
    val_every: int = 0  # 0: no periodic validation
    val_k: int = 4
    log_samples_every: int = 10
    eval_before_after: bool = True
    eval_k: int = 4
    stop_on_hacking: bool = False
    max_bad_steps: int = 3  # stop after this many consecutive steps skipped for non-finite values
    log_kl_prcp: bool = False  # GRPO / DAPO: run the masked-image forward anyway, to log KL_prcp as a metric
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class TrainConfig:
    preset: str = "papo_g"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> TrainConfig:
        a, t, r = self.algorithm, self.trainer, self.rollout
        try:
            a.loss_config()
            a.masking()
        except ValueError as err:
            raise ConfigError(f"algorithm: {err}") from None
        try:  # "auto" compute resolves per device at load time; any choice there is valid for any param dtype
            precision = Precision.resolve(self.model.param_dtype, self.model.compute_dtype, "cpu")
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None
        if self.optim.kahan_summation and not precision.low_precision_params:
            raise ConfigError("optim.kahan_summation applies to 16-bit parameters only (model.param_dtype=bfloat16)")
        checks = [
            (a.adv_estimator in ADV_ESTIMATORS, f"algorithm.adv_estimator must be one of {ADV_ESTIMATORS}"),
            (a.token_mean_scope in TOKEN_MEAN_SCOPES, f"algorithm.token_mean_scope must be one of {', '.join(TOKEN_MEAN_SCOPES)}"),
            (a.token_mean_scope == "micro_batch" or a.loss_agg == "token-mean",
             "algorithm.token_mean_scope=mini_batch applies to algorithm.loss_agg=token-mean only"),
            (a.kl_prcp_schedule in GAMMA_SCHEDULES, f"algorithm.kl_prcp_schedule must be one of {GAMMA_SCHEDULES}"),
            (a.kl_prcp_apply_mode in APPLY_MODES, f"algorithm.kl_prcp_apply_mode must be one of {APPLY_MODES}"),
            (a.filter_key in ("accuracy", "overall", "format"), "algorithm.filter_key must be accuracy, overall or format"),
            (a.max_filter_rounds >= 1, "algorithm.max_filter_rounds must be >= 1"),
            (a.filter_fallback in ("error", "kept"), f"algorithm.filter_fallback must be error or kept, not {a.filter_fallback!r}"),
            (a.reward in REWARDS or ":" in a.reward, f"algorithm.reward must be one of {', '.join(REWARDS)} or path/to/file.py:function"),
            (t.max_bad_steps >= 1, "trainer.max_bad_steps must be >= 1"),
            (r.engine in ENGINES, f"rollout.engine must be one of {', '.join(ENGINES)}"),
            (a.kl_prcp_reward_coef >= 0, "algorithm.kl_prcp_reward_coef must be >= 0"),
            (a.mask_patch_size >= 0, "algorithm.mask_patch_size must be >= 0 (0: the encoder's patch size)"),
            (0.0 <= a.vppo_token_ratio <= 1.0, "algorithm.vppo_token_ratio must be in [0, 1] (0: VPPO off)"),
            (0.0 <= a.vppo_scale_min <= 1.0, "algorithm.vppo_scale_min must be in [0, 1]"),
            (0.0 <= a.pgpo_threshold < 1.0 and a.pgpo_boost >= 0, "algorithm.pgpo_threshold must be in [0, 1) (0: PGPO off) "
             "and algorithm.pgpo_boost >= 0"),
            (a.vppo_token_ratio == 0 or a.pgpo_threshold == 0,
             "algorithm.vppo_token_ratio and algorithm.pgpo_threshold both shape token advantages: choose one"),
            (not a.noisy_rollout or (self.rollout.n >= 2 and self.rollout.n % 2 == 0),
             f"algorithm.noisy_rollout samples half of each group from the noised image: rollout.n must be even, got {self.rollout.n}"),
            (0 <= a.noise_step < 1000, "algorithm.noise_step must be in [0, 1000)"),
            (a.noise_decay > 0 and a.noise_mid_step > 0,
             "algorithm.noise_decay and algorithm.noise_mid_step must be > 0 (a mid step below 1 is a fraction of the run)"),
            (r.n >= 2 or a.adv_estimator == "dr_grpo", "rollout.n must be >= 2 for group advantages"),
            (r.temperature > 0 and 0 < r.top_p <= 1 and r.max_new_tokens >= 1, "rollout: temperature > 0, top_p in (0, 1], max_new_tokens >= 1"),
            (t.max_steps >= 1 and t.rollout_batch_size >= 1 and t.micro_batch_size >= 1, "trainer sizes must be >= 1"),
            (t.micro_batch_size < 1 or (t.scoring_micro_batch_size >= 0 and t.scoring_micro_batch_size % t.micro_batch_size == 0),
             f"trainer.scoring_micro_batch_size (now {t.scoring_micro_batch_size}) must be 0 or a multiple of "
             f"trainer.micro_batch_size (now {t.micro_batch_size}): scoring merges whole update micro-batches"),
            (t.micro_batch_size < 1 or (t.update_micro_batch_size >= 0 and t.update_micro_batch_size % t.micro_batch_size == 0),
             f"trainer.update_micro_batch_size (now {t.update_micro_batch_size}) must be 0 or a multiple of "
             f"trainer.micro_batch_size (now {t.micro_batch_size}): an update pass holds whole micro-batches"),
            (self.model.gradient_checkpointing in (True, False, *CHECKPOINT_MODES),
             f"model.gradient_checkpointing must be true, false or one of {', '.join(CHECKPOINT_MODES)}"),
            (self.model.compile_layers in (True, False, "auto"), "model.compile_layers must be true, false or auto"),
            (self.model.uncheckpointed_layers >= 0, "model.uncheckpointed_layers must be >= 0"),
            (self.model.uncheckpointed_layers == 0 or self.model.gradient_checkpointing not in (False, "none"),
             "model.uncheckpointed_layers leaves layers out of gradient checkpointing: set model.gradient_checkpointing too"),
            (t.gen_batch_size >= 0, "trainer.gen_batch_size must be >= 0 (0: trainer.rollout_batch_size)"),
            (t.gen_batch_size == 0 or a.online_filter,
             "trainer.gen_batch_size sizes DAPO's filter rounds; it needs algorithm.online_filter=true"),
            (t.mini_batch_size >= 1 and t.rollout_batch_size % t.mini_batch_size == 0,
             "trainer.rollout_batch_size must be a multiple of trainer.mini_batch_size"),
            (t.save_every >= 0 and t.keep_last >= 1, "trainer.save_every >= 0 and trainer.keep_last >= 1"),
            (t.max_time_s >= 0, "trainer.max_time_s must be >= 0 (0: no time limit)"),
            (self.optim.lr > 0 and self.optim.grad_clip > 0, "optim.lr and optim.grad_clip must be > 0"),
            (set(t.report_to) <= {"tensorboard", "wandb", "none"}, "trainer.report_to: tensorboard, wandb or none"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Parse a YAML / command-line value into the field's declared type."""
    types = _types(annotation)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and type(None) in types):
        if type(None) in types:
            return None
        raise ConfigError(f"{key} may not be null")
    if isinstance(value, str) and str in types and bool in types and value.lower() in ("true", "false"):
        value = value.lower() == "true"  # a field that also takes names (model.gradient_checkpointing)
    elif isinstance(value, str) and str not in types:
        try:  # YAML 1.1 reads "1e-4" as a string; numbers in overrides should just work
            value = float(value) if float in types and not value.lstrip("+-").isdigit() else yaml.safe_load(value)
        except ValueError:
            value = yaml.safe_load(value)
    for t in types:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if t is list and isinstance(value, (list, str)):
            return [value] if isinstance(value, str) else list(value)
        if t is _FloatList and isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
    raise ConfigError(f"{key}: {value!r} is not a valid {' or '.join(getattr(t, '__name__', str(t)) for t in types)}")


class _FloatList(list):
    """Marks a ``list[float]`` field (e.g. entropy_band) for ``_coerce``."""


_FloatList.__name__ = "list of numbers"  # as error messages name it


def _types(annotation: str) -> list[type]:
    names = [a.strip() for a in str(annotation).replace("list[str]", "list").replace("list[float]", "list of numbers").split("|")]
    table = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None), "list": list, "list of numbers": _FloatList}
    return [table[n] for n in names]


def apply(cfg: TrainConfig, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    if key == "preset":
        return
    if key == "model.dtype":  # before the precision split: one dtype for weights and compute (saved runs hold it)
        for new in ("model.param_dtype", "model.compute_dtype"):
            apply(cfg, new, value)
        return
    target = getattr(cfg, section, None)
    if not dataclasses.is_dataclass(target) or not name:
        known = ", ".join(f.name for f in fields(cfg) if f.name != "preset")
        raise ConfigError(f"unknown config section in {key!r}; sections: {known}")
    by_name = {f.name: f for f in fields(target)}
    if name not in by_name:
        raise ConfigError(f"unknown config key {key!r}; {section} has: {', '.join(by_name)}")
    setattr(target, name, _coerce(value, by_name[name].type, key))


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Path(str(resources.files("papo.config") / "presets" / f"{name}.yaml"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_config(preset: str = "papo_g", file: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Preset YAML, then an optional user YAML (e.g. a saved config.yaml), then ``key=value`` overrides."""
    cfg = TrainConfig(preset=preset)
    layers = [yaml.safe_load(preset_path(preset).read_text()) or {}]
    if file:
        layers.append(yaml.safe_load(Path(file).read_text()) or {})
    for layer in layers:
        for key, value in flatten(layer).items():
            apply(cfg, key, value)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        apply(cfg, key.strip(), value.strip())
    return cfg.validate()
