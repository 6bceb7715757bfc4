import json
import math

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
