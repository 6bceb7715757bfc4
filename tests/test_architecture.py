"""papo's packages import only downward (docs/architecture.md): a lower layer never imports a higher one, and
packages of one layer do not import each other (the entry points of the top layer aside)."""

import ast
from pathlib import Path

import papo

LAYERS = [  # low to high
    {"papo.errors", "papo.jsonl"},
    {"papo.algo"},
    {"papo.rewards", "papo.data"},
    {"papo.models"},
    {"papo.rollout"},
    {"papo.config"},
    {"papo.training"},
    {"papo.evaluation"},
    {"papo.api", "papo.cli", "papo.__main__", "papo"},
]
ROOT = Path(papo.__file__).parent


def unit_of(module: str) -> str:
    """The layered unit a module belongs to: its top-level package or module under papo."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def layer_of(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"{unit} is in no layer: add it to docs/architecture.md and LAYERS")


def papo_imports(path: Path) -> set[str]:
    """Every papo module a file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "papo":
            if node.module != "papo":
                found.add(node.module)
            else:  # from papo import x: the submodule x, or the package's own namespace
                found |= {f"papo.{a.name}" if _is_submodule(a.name) else "papo" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "papo"}
    return found


def _is_submodule(name: str) -> bool:
    return (ROOT / f"{name}.py").is_file() or (ROOT / name / "__init__.py").is_file()


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_package_imports_only_downward():
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = module_name(path)
        here = unit_of(mod)
        for target in papo_imports(path):
            there = unit_of(target)
            if there == here or mod == "papo":
                continue
            entry_points = layer_of(here) == len(LAYERS) - 1  # the CLI, its __main__ and the API may call each other
            if layer_of(there) > layer_of(here) or (layer_of(there) == layer_of(here) and not entry_points):
                violations.append(f"{mod} (layer {layer_of(here)}) imports {target} (layer {layer_of(there)})")
    assert not violations, "\n".join(violations)


def test_the_checker_sees_upward_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from papo.training.trainer import Trainer\nimport papo.rollout.engine\n")
    assert papo_imports(bad) == {"papo.training.trainer", "papo.rollout.engine"}
    assert layer_of(unit_of("papo.training.trainer")) > layer_of(unit_of("papo.models.policy"))
