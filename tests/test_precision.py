"""Precision: fp32 master weights with bf16 compute, bf16 weights with Kahan-compensated AdamW, and the config
names that choose them. CPU autocast runs the same bf16 matmuls the CUDA default runs."""

import pytest
import torch
from model_fixtures import small_cfg, tiny_policy
from PIL import Image

from papo.config.schema import ConfigError, load_config
from papo.data.synthetic import make_sample
from papo.models.precision import Precision, store_for_compute
from papo.training.optim import build_optimizer
from papo.training.trainer import Trainer

MIXED = ["model.param_dtype=float32", "model.compute_dtype=bfloat16"]


def test_defaults_resolve_per_device():
    cfg = load_config("papo_g")
    assert (cfg.model.param_dtype, cfg.model.compute_dtype, cfg.optim.kahan_summation) == ("float32", "auto", None)
    assert Precision.resolve("float32", "auto", "cuda") == Precision(torch.float32, torch.bfloat16)
    assert Precision.resolve("float32", "auto", "cpu") == Precision(torch.float32, torch.float32)
    assert Precision.resolve("bfloat16", "auto", "cuda") == Precision(torch.bfloat16, torch.bfloat16)


def test_config_rejects_what_cannot_train_and_maps_the_old_key():
    with pytest.raises(ConfigError, match="wider than param_dtype"):
        load_config("papo_g", overrides=["model.param_dtype=bfloat16", "model.compute_dtype=float32"])
    with pytest.raises(ConfigError, match="loss scaling"):
        load_config("papo_g", overrides=["model.compute_dtype=float16"])
    with pytest.raises(ConfigError, match="16-bit parameters only"):
        load_config("papo_g", overrides=["optim.kahan_summation=true"])
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_config("papo_g", overrides=["model.param_dtype=fp8"])
    old = load_config("papo_g", overrides=["model.dtype=bfloat16"])  # run directories saved before the split
    assert (old.model.param_dtype, old.model.compute_dtype) == ("bfloat16", "bfloat16")


def test_optimizer_follows_the_parameter_dtype():
    p32, p16 = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    assert type(build_optimizer([p32], 1e-6, 0.01, Precision())).__module__.startswith("torch.optim")
    kahan = build_optimizer([p16], 1e-6, 0.01, Precision(torch.bfloat16, torch.bfloat16))
    assert type(kahan).__module__.startswith("optimi") and kahan.defaults["kahan_sum"] is True
    assert (kahan.defaults["beta1"], kahan.defaults["beta2"], kahan.defaults["eps"]) == (0.9, 0.999, 1e-8)  # the authors' AdamW
    plain = build_optimizer([p16], 1e-6, 0.01, Precision(torch.bfloat16, torch.bfloat16), kahan_summation=False)
    assert type(plain).__module__.startswith("torch.optim")


def _moved_share(overrides, tmp_path) -> float:
    """One real training step at the authors' lr 1e-6: the share of weight elements whose stored value changed,
    among those with a gradient above AdamW's eps (1e-8; below it AdamW itself shrinks the step, e.g. for the
    LM-head rows of tokens the batch never makes likely)."""
    torch.manual_seed(0)
    # trainer.seed=1: the first rollout groups score unequally, so GRPO's gradient is not zero
    trainer = Trainer(small_cfg("grpo", ["optim.lr=1e-6", "trainer.seed=1", *overrides]), tmp_path, "cpu")
    params = [p for p in trainer.policy.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    trainer.step()
    touched = moved = 0
    for p, b in zip(params, before):
        if p.grad is None:
            continue
        signal = p.grad.abs() > 1e-8
        touched += int(signal.sum())
        moved += int((signal & (p.detach() != b)).sum())
    assert touched > 10_000
    return moved / touched


def test_default_precision_moves_the_master_weights_at_lr_1e_6(tmp_path):
    assert _moved_share(MIXED, tmp_path / "mixed") >= 0.99
    # what this guards against: bf16 weights with plain AdamW drop most updates of this size
    assert _moved_share(["model.param_dtype=bfloat16", "optim.kahan_summation=false"], tmp_path / "bf16") < 0.2


def _adamw_trajectory(dtype, kahan, steps=100, lr=1e-6, n=100_000):
    """(start, stored weights, stored + Kahan compensation) after ``steps`` AdamW updates of gradients that share
    a direction (a learning signal) plus noise."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(n, generator=gen) * 0.02
    signal = torch.randn(n, generator=gen)
    p = torch.nn.Parameter(start.to(dtype, copy=True))
    opt = build_optimizer([p], lr, 0.01, Precision(dtype, dtype), kahan_summation=kahan)
    for _ in range(steps):
        p.grad = (signal + 0.5 * torch.randn(n, generator=gen)).to(dtype)
        opt.step()
    comp = opt.state[p].get("kahan_comp") if kahan else None
    stored = p.detach().float()
    return start.to(dtype).float(), stored, stored + (comp.float() if comp is not None else 0)


def test_kahan_bf16_adamw_tracks_fp32_adamw_over_100_steps():
    start, fp32, _ = _adamw_trajectory(torch.float32, False)
    intended = fp32 - start
    start16, stored, effective = _adamw_trajectory(torch.bfloat16, True)

    def progress(x):  # share of the fp32 run's displacement made, along its direction
        return float(((x - start16) * intended).sum() / (intended * intended).sum())

    # tolerance: the stored bf16 weights make >= 90% of fp32's progress (the rest waits in the compensation
    # buffer, below bf16's resolution), and weights + compensation are within 3% of fp32's displacement (bf16
    # moments are the only remaining difference)
    assert progress(stored) >= 0.9
    assert float((effective - start16 - intended).norm() / intended.norm()) < 0.03
    _, plain, _ = _adamw_trajectory(torch.bfloat16, False)
    assert progress(plain) < 0.1  # without compensation almost nothing happens


def _nll_curve(precision: Precision, steps: int = 10, lr: float = 1e-3) -> list[float]:
    """Token NLL of fixed image-grounded completions over ``steps`` AdamW updates of the tiny model, trained with
    ``precision`` through the trainer's own pieces (Policy.logprobs under autocast, build_optimizer)."""
    policy = tiny_policy()
    policy.model.to(precision.param_dtype)
    policy.precision = precision
    images = [[Image.new("RGB", (56, 56), (40 * i, 200 - 30 * i, 90))] for i in range(4)]
    prompts = [make_sample("count", "train", 0, i, size=56).formatted_prompt() for i in range(4)]
    batch = policy.encode(prompts, images)
    ids, mask = policy.tokenize_completions([f"I see {i} red squares, so the answer is {i}." for i in range(4)])
    opt = build_optimizer(policy.model.parameters(), lr, 0.01, precision)
    losses = []
    for _ in range(steps):
        logp, _ = policy.logprobs(batch, ids, mask)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bf16_loss_curve_follows_fp32():
    fp32 = _nll_curve(Precision())
    assert fp32[-1] < 0.6 * fp32[0], f"the fp32 loss should fall: {fp32}"
    for precision in (Precision(torch.float32, torch.bfloat16), Precision(torch.bfloat16, torch.bfloat16)):
        curve = _nll_curve(precision)
        gap = max(abs(a - b) / b for a, b in zip(curve, fp32))
        assert gap < 0.02, f"{precision.describe()}: {curve} strays from fp32 {fp32} (worst {gap:.1%})"


def test_store_for_compute_lowers_matmul_weights_only():
    """Linear and convolution weights and biases go to the compute dtype; a weight tied to an embedding stays
    (an embedding lookup is not cast by autocast), and a weight two matmuls share stays one tensor."""
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10, bias=False),
                                 "a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 4), "conv": torch.nn.Conv3d(1, 2, 2),
                                 "norm": torch.nn.LayerNorm(4)})
    model["head"].weight = model["emb"].weight
    model["b"].weight = model["a"].weight
    store_for_compute(model, Precision(torch.float32, torch.bfloat16))
    assert model["head"].weight is model["emb"].weight and model["emb"].weight.dtype == torch.float32
    assert model["a"].weight is model["b"].weight and model["a"].weight.dtype == torch.bfloat16
    assert model["a"].bias.dtype == model["conv"].weight.dtype == model["conv"].bias.dtype == torch.bfloat16
    assert model["norm"].weight.dtype == torch.float32
    unchanged = torch.nn.Linear(4, 4)
    assert store_for_compute(unchanged, Precision()).weight.dtype == torch.float32  # nothing to do unmixed


def test_reference_model_keeps_autocast_values_and_gives_the_policys_logprobs(tmp_path):
    """Under fp32 weights and bf16 compute the frozen reference stores its matmul weights in bf16, the values
    autocast casts the policy's to: before any update its log-probs equal the policy's bitwise."""
    trainer = Trainer(small_cfg("papo_g", MIXED), tmp_path, "cpu")
    ref = trainer.ref.model
    linears = [m for m in ref.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(p.dtype == torch.float32 for name, p in ref.named_parameters() if "norm" in name)
    policy = trainer.policy
    sample = make_sample("count", "train", 0, 0, size=224)
    batch = policy.encode([sample.formatted_prompt()] * 2, [sample.load_images(None, None)] * 2)
    vocab = policy.model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ours, _ = policy.logprobs(batch, ids, mask)
    theirs, _ = policy.logprobs(batch, ids, mask, model=trainer.ref)
    assert torch.equal(ours, theirs)
