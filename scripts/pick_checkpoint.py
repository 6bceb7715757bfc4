"""Summarise the held-out checks of a `papo sft --save-steps ...` run and pack the best checkpoint.

Criterion (room for RL): most families with sampled T=1 accuracy inside [0.2, 0.8], format followed on at
least 80% of responses, then the highest mean accuracy, or with ``--target A`` the mean accuracy nearest A
(a start that RL can still move: a later training leg raises it further). ``--families a,b`` judges by those
families alone (the ones RL will train on; a warm start may have learnt others beside them).

    python scripts/pick_checkpoint.py RUN_DIR RESULTS_DIR               # ranks, and packs the best as best.tar.gz
    python scripts/pick_checkpoint.py RUN_DIR RESULTS_DIR --no-pack     # ranks only
    python scripts/pick_checkpoint.py RUN_DIR RESULTS_DIR --bf16        # packs with bf16 weights (half the bytes)
    python scripts/pick_checkpoint.py RUN_DIR RESULTS_DIR --target 0.35 # the mean accuracy nearest 0.35 breaks ties
    python scripts/pick_checkpoint.py RUN_DIR RESULTS_DIR --families clock --target 0.4
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path


def key(report: dict, target: float | None = None, families: list[str] | None = None) -> tuple:
    s = report["sampled_t1"]
    judged = s["per_task"] if families is None else {f: s["per_task"][f] for f in families}
    mean = s["avg_at_k"] if families is None else sum(judged.values()) / len(judged)
    last = mean if target is None else -abs(mean - target)
    return (sum(0.2 <= a <= 0.8 for a in judged.values()), s["format_rate"] >= 0.8, last)


def main(run: Path, results: Path, target: float | None = None, families: list[str] | None = None) -> None:
    results.mkdir(parents=True, exist_ok=True)
    found = {}
    for path in sorted(run.glob("step-*/sft_result.json")) + [run / "sft_result.json"]:
        if path.exists() and "heldout" in (data := json.loads(path.read_text())):
            found[path.parent.name if path.parent != run else "final"] = data["heldout"]
    if families and (missing := [f for f in families if any(f not in r["sampled_t1"]["per_task"] for r in found.values())]):
        raise SystemExit(f"{run}: no held-out check of family {missing[0]!r} (checked: "
                         f"{', '.join(sorted({t for r in found.values() for t in r['sampled_t1']['per_task']}))})")
    ranking = sorted(found, key=lambda n: key(found[n], target, families), reverse=True)
    (results / "checkpoints.json").write_text(json.dumps({"ranking": ranking, "heldout": found}, indent=1))
    for name in ranking:
        s = found[name]["sampled_t1"]
        print(f"{name:>10}  avg {s['avg_at_k']:.3f}  format {s['format_rate']:.2f}  " + "  ".join(f"{t} {a:.2f}" for t, a in s["per_task"].items()))
    if ranking and "--no-pack" not in sys.argv:
        best = run if ranking[0] == "final" else run / ranking[0]
        with tarfile.open(results / "best.tar.gz", "w:gz") as tar:
            tar.add(best, arcname="model", filter=lambda ti: None if "/step-" in ti.name or ti.name.endswith(".safetensors") else ti)
            for weights in best.glob("*.safetensors"):
                if "--bf16" in sys.argv:  # papo loads weights into its configured dtype (float32 by default)
                    import torch
                    from safetensors.torch import load_file, save_file

                    half = results / weights.name
                    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(weights).items()}, half)
                    tar.add(half, arcname=f"model/{weights.name}")
                    half.unlink()
                else:
                    tar.add(weights, arcname=f"model/{weights.name}")
        print("packed", best)


if __name__ == "__main__":
    target = float(sys.argv[sys.argv.index("--target") + 1]) if "--target" in sys.argv else None
    families = sys.argv[sys.argv.index("--families") + 1].replace("+", ",").split(",") if "--families" in sys.argv else None
    main(Path(sys.argv[1]), Path(sys.argv[2]), target, families)
