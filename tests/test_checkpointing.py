import pytest
import torch
from model_fixtures import mixed_batch, small_cfg, tiny_policy
from torch.utils._python_dispatch import TorchDispatchMode

from papo.config.schema import ConfigError
from papo.models.checkpointing import checkpoint_mode, set_checkpointing


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _backward(mode, uncheckpointed=0):
    """Gradients of one packed forward and backward under ``mode``, and the ops the backward ran."""
    torch.manual_seed(0)
    policy = tiny_policy()
    set_checkpointing(policy.model, mode, uncheckpointed)
    policy.model.train()
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    ids = torch.randint(5, 200, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    logp, _ = policy.logprobs(batch, ids, mask, 1.0)
    loss = -(logp * mask).sum() / mask.sum()
    with OpCounter() as ops:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return grads, ops.counts


def test_checkpointing_modes_give_the_same_gradients_and_selective_recomputes_no_matmul():
    """Full checkpointing recomputes each block's matrix multiplies in the backward; selective keeps them (and
    attention) and recomputes only element-wise ops; every mode gives the same gradients."""
    runs = {mode: _backward(mode) for mode in ("none", "full", "selective")}
    grads = runs["none"][0]
    for mode in ("full", "selective"):
        assert runs[mode][0].keys() == grads.keys()
        for name, g in runs[mode][0].items():
            assert torch.allclose(g, grads[name], atol=1e-6, rtol=1e-5), (mode, name)
    mm = {mode: counts.get("mm", 0) + counts.get("addmm", 0) for mode, (_, counts) in runs.items()}
    assert mm["full"] > mm["none"] == mm["selective"]  # the recomputed forward's matmuls
    rsqrt = {mode: counts.get("rsqrt", 0) for mode, (_, counts) in runs.items()}
    assert rsqrt["none"] < rsqrt["selective"] == rsqrt["full"]  # RMSNorm: recomputed, not kept


def test_uncheckpointed_layers_keep_their_activations():
    """The last decoder layers stay out of checkpointing: the backward recomputes only the others' matmuls."""
    layers = len(tiny_policy().model.get_decoder().layers)
    mm = {}
    for kept in (0, 1, layers):
        grads, counts = _backward("full", kept)
        mm[kept] = counts.get("mm", 0) + counts.get("addmm", 0)
        if kept == 0:
            base = grads
        for name, g in grads.items():
            assert torch.allclose(g, base[name], atol=1e-6, rtol=1e-5), (kept, name)
    per_layer = (mm[0] - mm[layers]) / layers  # a decoder layer's recomputed matmuls
    assert per_layer > 0 and mm[1] == mm[0] - per_layer
    none = _backward("none")[1]
    assert mm[layers] > none.get("mm", 0) + none.get("addmm", 0)  # vision blocks still recompute
    model = tiny_policy().model
    set_checkpointing(model, "full", 1)
    assert [layer.gradient_checkpointing for layer in model.get_decoder().layers] == [True] * (layers - 1) + [False]
    with pytest.raises(ConfigError, match="at most the model's"):
        set_checkpointing(model, "full", layers + 1)
    with pytest.raises(ConfigError, match="model.uncheckpointed_layers"):
        small_cfg("papo_g", ["model.uncheckpointed_layers=-1"])
    with pytest.raises(ConfigError, match="set model.gradient_checkpointing too"):
        small_cfg("papo_g", ["model.uncheckpointed_layers=2"])


def test_checkpoint_mode_values():
    assert [checkpoint_mode(v) for v in (True, False, "selective", "full", "none")] == ["full", "none", "selective", "full", "none"]
    with pytest.raises(ValueError, match="must be true, false or one of none, full, selective"):
        checkpoint_mode("some")
    assert small_cfg("papo_g", ["model.gradient_checkpointing=selective"]).model.gradient_checkpointing == "selective"
    assert small_cfg("papo_g", ["model.gradient_checkpointing=true"]).model.gradient_checkpointing is True
    with pytest.raises(ConfigError, match="model.gradient_checkpointing must be true, false or one of none, full, selective"):
        small_cfg("papo_g", ["model.gradient_checkpointing=layers"])
