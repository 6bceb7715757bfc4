import json
import math

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from papo.cli import main
from papo.data.synthetic import FAMILIES, SyntheticDataset
from papo.models.loading import load_processor
from papo.models.policy import Policy, default_model_dir
from papo.models.tiny import build_tiny
from papo.rollout.graded import generate_and_score, summarize
from papo.rollout.sampler import Sampler
from papo.rollout.sampling import SamplingParams


def test_papo_sft_writes_a_model_that_learned_something(tmp_path):
    out = tmp_path / "sft"
    assert main(["sft", "--task", "count+clock", "--model", "tiny", "--steps", "14", "--batch-size", "8", "--lr", "3e-3",
                 "--eval-per-task", "1", "--eval-k", "1", "--save-steps", "7", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "sft_metrics.jsonl").read_text().splitlines()]
    # a random init predicts ~uniformly over the 576-row vocabulary: cross-entropy ln(576) = 6.36
    assert rows[-1]["step"] == 14 and rows[-1]["loss"] < 0.75 * math.log(576)
    assert 0 <= rows[-1]["data_wait_share"] <= 1  # the share of the run spent waiting for the data loader
    result = json.loads((out / "sft_result.json").read_text())
    assert set(result["heldout"]["sampled_t1"]["per_task"]) == {"count", "clock"}
    assert Image.open(out / "sft_loss.png").size[0] > 100
    saved = AutoModelForImageTextToText.from_pretrained(out)
    start, _ = build_tiny("tiny", seed=0)  # the random init SFT started from (its seed is the default 0)
    trained = saved.state_dict()
    changed = [k for k, v in start.state_dict().items() if not torch.equal(v, trained[k])]
    assert saved.config.model_type == "qwen2_5_vl" and len(changed) > 0.9 * len(trained)
    assert (out / "step-7" / "model.safetensors").is_file() and (out / "step-7" / "sft_result.json").is_file()


def test_embedded_default_is_small_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = default_model_dir()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 20 * 1024 * 1024
    policy = Policy.from_pretrained(None)
    assert type(policy.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert sum(p.numel() for p in policy.model.parameters()) < 5e6


def test_embedded_default_follows_the_format_and_reads_images():
    torch.manual_seed(0)
    policy = Policy.from_pretrained(None)
    samples = list(SyntheticDataset("all", split="test", n=2 * len(FAMILIES), seed=5, size=224))
    summary = summarize(generate_and_score(Sampler(policy), samples, SamplingParams(64, greedy=True), k=1), 1)
    assert summary.format_rate >= 0.9
    # bar charts are read well after warm-start (held-out ~0.9): a blind model would score ~1/8
    bars = list(SyntheticDataset("bar_chart", split="test", n=12, seed=6, size=224))
    assert summarize(generate_and_score(Sampler(policy), bars, SamplingParams(64, greedy=True), k=1), 1).avg_at_k >= 0.5


def test_model_export_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["model", "export", "--out", str(tmp_path / "m")]) == 0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    processor = load_processor(str(tmp_path / "m"))
    default = Policy.from_pretrained(None)
    for a, b in zip(model.parameters(), default.model.parameters()):
        assert torch.equal(a, b)
    assert processor.tokenizer.chat_template == default.tokenizer.chat_template
    for name in ("config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (tmp_path / "m" / name).is_file()


def test_sft_shows_masked_and_blank_views_in_their_shares():
    import numpy as np
    import pytest

    from papo.data.synthetic import make_sample
    from papo.errors import UserError
    from papo.training.sft import SFTConfig, image_view, view_images

    cfg = SFTConfig(out="unused", masked_share=0.5, blank_share=0.25)
    views = [image_view(cfg, p) for p in range(4000)]
    assert views == [image_view(cfg, p) for p in range(4000)]  # keyed by (seed, position): the same every run
    shares = {v: views.count(v) / len(views) for v in ("full", "masked", "blank")}
    assert abs(shares["full"] - 0.25) < 0.03 and abs(shares["masked"] - 0.5) < 0.03 and abs(shares["blank"] - 0.25) < 0.03
    assert all(v == "full" for v in map(lambda p: image_view(SFTConfig(out="unused"), p), range(200)))

    sample = make_sample("count", "train", 0, 0, size=224)
    full = np.asarray(sample.load_images(None, None)[0])
    for view in ("full", "masked", "blank"):
        image = np.asarray(view_images(cfg, sample, views.index(view))[0])
        black = (image.reshape(16, 14, 16, 14, 3) == 0).all(axis=(1, 3, 4)).mean()  # 14x14 cells entirely black
        if view == "full":
            assert np.array_equal(image, full)
        elif view == "blank":
            assert not image.any()
        else:  # PAPO's mask: about 60% of the cells black, every other pixel untouched
            assert 0.45 < black < 0.75
            shown = image.any(-1)
            assert np.array_equal(image[shown], full[shown])
    for bad in ({"masked_share": 0.8, "blank_share": 0.3}, {"blank_share": -0.1}, {"mask_ratio": 0.0}):
        with pytest.raises(UserError):
            SFTConfig(out="unused", **bad)


def test_sft_heldout_check_keeps_the_training_knobs():
    from papo.training.sft import SFTConfig, _heldout

    cfg = SFTConfig(out="unused", data="synthetic:count+closest?explain=1&shortcut=60&split=train&n=9", eval_per_task=3,
                    max_new_tokens=128)
    samples = _heldout(cfg, ["count", "closest"])
    assert len(samples) == 6 and {s.meta["split"] for s in samples} == {"test"}
    plain = _heldout(SFTConfig(out="unused", data="synthetic:count+closest", eval_per_task=3), ["count", "closest"])
    # the same questions (the shortcut knob never acts on the test split), with explain=1's traces in words
    assert [s.id for s in plain] == [s.id for s in samples]
    assert [s.answer for s in plain] == [s.answer for s in samples]
    assert all(len(e.meta["solution"]) > 2 * len(p.meta["solution"]) for e, p in zip(samples, plain))


def test_sft_compute_dtype_is_checked_and_bf16_autocast_trains(tmp_path):
    import pytest

    from papo.errors import UserError
    from papo.training.sft import SFTConfig, run_sft

    with pytest.raises(UserError, match="compute_dtype"):
        SFTConfig(out="unused", compute_dtype="float8")
    result = run_sft(SFTConfig(out=str(tmp_path / "m"), model="tiny", data="synthetic:count", steps=3, batch_size=4,
                               eval_per_task=0, compute_dtype="bfloat16", workers=0))
    assert math.isfinite(result["final_loss"])
    assert "compute_dtype: bfloat16" in (tmp_path / "m" / "sft_config.yaml").read_text()


def _poison_steps(monkeypatch, bad_steps):
    """Makes the loss NaN (so the gradient is too) at the given 0-based steps of papo sft."""
    from papo.models.policy import Policy

    real, calls = Policy.logprobs, {"n": 0}

    def logprobs(self, *args, **kwargs):
        logp, entropy = real(self, *args, **kwargs)
        step, calls["n"] = calls["n"], calls["n"] + 1
        return (logp * float("nan") if step in bad_steps else logp), entropy

    monkeypatch.setattr(Policy, "logprobs", logprobs)


def test_sft_skips_an_update_whose_gradient_is_not_finite(tmp_path, monkeypatch):
    from papo.training.sft import SFTConfig, run_sft

    def run(name, bad_steps, steps):
        _poison_steps(monkeypatch, bad_steps)
        cfg = SFTConfig(out=str(tmp_path / name), model="tiny", data="synthetic:count", steps=steps, batch_size=2,
                        eval_per_task=0, log_every=1, workers=0, warmup_steps=1)
        result = run_sft(cfg)
        return result, [json.loads(line) for line in (tmp_path / name / "sft_metrics.jsonl").read_text().splitlines()]

    result, rows = run("skip", {1}, 3)
    assert result["skipped_steps"] == 1 and [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None  # strict JSON: NaN is written as null
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "skip" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the poisoned step never reached the weights


def test_sft_stops_with_a_clear_message_when_it_diverges(tmp_path, monkeypatch):
    from papo.errors import TrainingStopped
    from papo.training.sft import SFTConfig, run_sft

    _poison_steps(monkeypatch, set(range(2, 100)))
    cfg = SFTConfig(out=str(tmp_path / "d"), model="tiny", data="synthetic:count", steps=12, batch_size=2,
                    eval_per_task=0, log_every=4, workers=0, warmup_steps=1, max_bad_steps=3)
    with pytest.raises(TrainingStopped, match="3 steps in a row, up to step 5, had a non-finite gradient.*lower --lr"):
        run_sft(cfg)


def test_sft_stops_at_the_first_check_that_reaches_its_accuracy(tmp_path, monkeypatch):
    from papo.training import sft

    checks = iter([{"clock": 0.1, "count": 0.9}, {"clock": 0.4, "count": 0.9}])  # held-out accuracy at steps 2, 4

    real = sft.heldout_report

    def report(policy, samples, cfg):  # a real check, with the accuracy this test needs
        result = real(policy, samples, cfg)
        result["sampled_t1"]["per_task"].update(next(checks))
        return result

    monkeypatch.setattr(sft, "heldout_report", report)
    out = tmp_path / "s"
    assert main(["sft", "--task", "count+clock", "--model", "tiny", "--steps", "8", "--batch-size", "2",
                 "--eval-per-task", "1", "--eval-k", "1", "--save-steps", "2,4,6", "--stop-at", "clock=0.35",
                 "--out", str(out)]) == 0
    result = json.loads((out / "sft_result.json").read_text())
    assert result["steps"] == 4 and result["stopped_early"] and result["heldout"]["sampled_t1"]["per_task"]["clock"] == 0.4
    assert (out / "step-4").is_dir() and not (out / "step-6").exists()
    from safetensors.torch import load_file

    final, at_stop = load_file(out / "model.safetensors"), load_file(out / "step-4" / "model.safetensors")
    assert all(torch.equal(final[k], at_stop[k]) for k in final)  # the final model is the stopping check's
    # a family the checks do not cover, or a malformed pair, is named
    assert main(["sft", "--task", "count", "--model", "tiny", "--steps", "4", "--save-steps", "2",
                 "--stop-at", "clock=0.35", "--out", str(tmp_path / "u")]) == 2
    assert main(["sft", "--task", "count", "--steps", "4", "--save-steps", "2", "--stop-at", "clock",
                 "--out", str(tmp_path / "v")]) == 2
    assert main(["sft", "--task", "count", "--steps", "4", "--stop-at", "count=0.5", "--out", str(tmp_path / "w")]) == 2


def test_eager_eval_builds_the_check_engine_without_compiling(tmp_path, monkeypatch):
    from papo.training import sft

    built = []

    class Recording(Sampler):
        def __init__(self, policy, **kwargs):
            built.append(kwargs.get("compile", True))
            super().__init__(policy, **kwargs)

    monkeypatch.setattr(sft, "Sampler", Recording)
    args = ["sft", "--task", "count", "--model", "tiny", "--steps", "2", "--batch-size", "2", "--eval-per-task", "1",
            "--eval-k", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--eager-eval", "--out", str(tmp_path / "b")]) == 0
    assert built == [True, False]
