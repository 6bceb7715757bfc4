"""What papo never does with untrusted input: unpickle it, execute it, or hand it to a shell."""

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from papo.models.policy import Policy, default_model_dir
from papo.rewards import score_responses
from papo.training.checkpoint import load_trainer_state

PACKAGE = Path(__file__).resolve().parents[1] / "papo"


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_poisoned_trainer_state_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(marker)}, tmp_path / "trainer_state.pt", pickle_protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_trainer_state(tmp_path)
    assert not marker.exists()


def test_a_pickled_model_file_is_refused_unexecuted(tmp_path):
    for f in default_model_dir().iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.x": _Payload(marker)}, f, protocol=2)
    with pytest.raises(Exception, match="Weights only load failed"):
        Policy.from_pretrained(str(tmp_path))
    assert not marker.exists()


def test_dataset_fields_never_choose_the_reward_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.py").write_text("open('pwned', 'w').close()\ndef reward(*a, **k):\n    return {'overall': 1.0}\n")
    meta = {"reward": "evil.py:reward", "reward_fn": "evil.py:reward", "answer_type": "evil.py:reward"}
    scores = score_responses(["\\boxed{1}"], ["1"], ["math"], [meta])
    assert scores[0]["accuracy"] == 1.0 and not (tmp_path / "pwned").exists()
    score_responses(["\\boxed{1}"], ["1"], reward="evil.py:reward")  # named by the user: runs, as documented
    assert (tmp_path / "pwned").exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else "?"
            yield name, node


def test_the_package_has_no_eval_shell_or_unsafe_deserialisation():
    found = []
    for path in PACKAGE.rglob("*.py"):
        for name, node in _calls(ast.parse(path.read_text(), str(path))):
            kwargs = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}"
            if name in ("eval", "exec", "compile", "os.system", "os.popen", "pickle.load", "pickle.loads", "yaml.load",
                        "yaml.unsafe_load", "marshal.loads"):
                found.append(where)
            if name.startswith("subprocess.") and isinstance(kwargs.get("shell"), ast.Constant) and kwargs["shell"].value:
                found.append(where + " shell=True")
            if name == "torch.load" and not (isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True):
                found.append(where + " without weights_only=True")
            if "trust_remote_code" in kwargs:
                found.append(where + " trust_remote_code")
    assert found == []
