import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from papo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_papo_mask_writes_same_size_masked_copy(tmp_path, capsys):
    src = tmp_path / "scene.png"
    Image.new("RGB", (280, 140), (200, 10, 10)).save(src)
    assert main(["mask", str(src), "--out", str(tmp_path / "out"), "--ratio", "0.6", "--seed", "1"]) == 0
    masked = Image.open(tmp_path / "out" / "scene.masked.png")
    assert masked.size == (280, 140)
    black = (np.asarray(masked) == 0).all(-1).mean()
    assert 0.4 < black < 0.8
    assert "black pixels" in capsys.readouterr().out


def test_papo_mask_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["mask", str(tmp_path / "nope.png"), "--out", str(tmp_path)]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "papo", "--help"], capture_output=True, text=True, check=True)
    assert "mask" in out.stdout


def test_demo_example_runs_and_learns(tmp_path):
    """The `make demo` job at a reduced size: GRPO and PAPO both improve held-out accuracy."""
    out = tmp_path / "demo"
    subprocess.run([sys.executable, str(ROOT / "examples" / "perception_bandit.py"), "--steps", "150",
                    "--eval-every", "150", "--out", str(out)], check=True, capture_output=True)
    import json

    rows = json.loads((out / "metrics.json").read_text())
    for method in {r["method"] for r in rows}:
        first, last = [r for r in rows if r["method"] == method]
        assert last["accuracy"] > first["accuracy"] + 0.2, (method, first, last)
    assert (out / "masking.png").exists()


def test_the_make_demo_command_is_a_valid_clock_run():
    """`make demo`'s arguments parse as `papo train` arguments into a config whose train, val and test data are
    the clock family (600 held-out questions)."""
    import shlex

    from papo.cli import build_parser
    from papo.config.schema import load_config
    from papo.data.loaders import load_samples

    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(line for line in makefile.splitlines() if line.startswith("DEMO_ARGS :="))
    args = build_parser().parse_args(["train", *shlex.split(line.split(":=", 1)[1])])
    cfg = load_config(args.preset, overrides=[*args.set, f"data.train={args.data}", f"trainer.max_steps={args.max_steps}"])
    assert (cfg.preset, cfg.model.name, cfg.trainer.max_steps) == ("papo_g", None, 300)
    test = load_samples(cfg.data.test).samples
    assert len(test) == 600 and {s.id.split("-")[0] for s in test} == {"clock"}, {s.id for s in test[:3]}
    assert {s.id.split("-")[0] for s in load_samples(cfg.data.train, limit=20).samples} == {"clock"}


def test_the_readme_paper_scale_command_is_a_valid_config():
    """The README's real-model command parses, and on CUDA means fp32 master weights with bf16 compute."""
    import re
    import shlex
    from pathlib import Path

    import torch

    from papo.config.schema import load_config
    from papo.models.precision import Precision

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"^papo train --preset papo_g --model Qwen/Qwen2\.5-VL-3B-Instruct.*?--device cuda$", readme, re.MULTILINE | re.DOTALL)
    assert command, "README.md lost its paper-scale papo train command"
    args = shlex.split(command.group(0).replace("\\\n", " "))
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert not any(s.startswith("model.dtype=") for s in sets), "use model.param_dtype / model.compute_dtype"
    cfg = load_config(args[args.index("--preset") + 1], overrides=sets)
    assert (cfg.optim.lr, cfg.rollout.n, cfg.rollout.top_p, cfg.rollout.max_new_tokens) == (1e-6, 5, 0.99, 2048)
    assert (cfg.trainer.rollout_batch_size, cfg.trainer.mini_batch_size, cfg.trainer.micro_batch_size) == (384, 128, 4)
    assert (cfg.data.min_pixels, cfg.data.max_pixels) == (200704, 1003520)
    assert Precision.resolve(cfg.model.param_dtype, cfg.model.compute_dtype, "cuda") == Precision(torch.float32, torch.bfloat16)


def test_a_missing_model_dir_and_a_corrupt_parquet_file_are_named(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "no" / "such" / "dir"), "--max-steps", "1", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "no/such/dir" in err and "not found" in err and "Repo id" not in err
    bad = tmp_path / "train.parquet"
    bad.write_bytes(b"this is not parquet")
    assert main(["train", "--data", str(bad), "--max-steps", "1", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not a readable parquet file" in err


def test_internal_errors_keep_their_traceback_and_user_errors_get_one_line(monkeypatch, capsys):
    import pytest

    import papo.training.loop

    def broken(*args, **kwargs):
        raise ValueError("an internal bug, not the user's input")

    monkeypatch.setattr(papo.training.loop, "train_from_args", broken)
    with pytest.raises(ValueError, match="internal bug"):  # not swallowed into exit code 2
        main(["train", "--max-steps", "1"])
    monkeypatch.undo()
    assert main(["train", "--set", "rollout.top_p=2"]) == 2  # a config value: one line naming the key
    err = capsys.readouterr().err
    assert err.startswith("papo train: error: rollout:") and "Traceback" not in err
    assert main(["mask", "x.png", "--out", "o", "--ratio", "2"]) == 2
    assert "ratio must be in [0, 1]" in capsys.readouterr().err
