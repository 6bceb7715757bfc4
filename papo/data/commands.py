"""``papo data generate | preview | check``."""

from __future__ import annotations

import argparse
from pathlib import Path

from papo.errors import UserError


def _knobs(pairs: list[str]) -> dict[str, int]:
    knobs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise UserError(f"--knob expects KEY=INTEGER, got {pair!r}")
        knobs[key] = int(value)
    return knobs


def _generate(args: argparse.Namespace) -> int:
    from rich.progress import track

    from papo.data.formats import write_papo_eval, write_papo_train
    from papo.data.synthetic import SyntheticDataset

    ds = SyntheticDataset(args.task, split=args.split, n=args.n, seed=args.seed, size=args.size, **_knobs(args.knob))
    writer = write_papo_train if args.format == "papo-train" else write_papo_eval
    path = writer(track(ds, description=f"generating {ds.n} {'+'.join(ds.tasks)} samples"), Path(args.out))
    print(f"wrote {ds!r} as {args.format} to {path}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from papo.data.masking import MaskingConfig
    from papo.data.preview import contact_sheet

    if args.data:
        from papo.data.loaders import load_samples

        result = load_samples(args.data, limit=args.n)
        print(result.report.summary())
        samples = result.samples
    else:
        from papo.data.synthetic import SyntheticDataset

        samples = list(SyntheticDataset(args.task, split=args.split, n=args.n, seed=args.seed, size=args.size))
    masking = MaskingConfig(ratio=args.mask_ratio, patch_size=args.patch_size) if args.mask_ratio > 0 else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(samples, masking, seed=args.seed).save(out)
    print(f"wrote a contact sheet of {len(samples)} samples to {out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from papo.data.loaders import load_samples

    result = load_samples(args.data, split=args.split, strict=args.strict, limit=args.limit)
    print(result.report.summary())
    tasks: dict[str, int] = {}
    for s in result.samples:
        tasks[s.task or "-"] = tasks.get(s.task or "-", 0) + 1
    print("rows per task: " + ", ".join(f"{t}={n}" for t, n in sorted(tasks.items())))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="generate, preview and check datasets")
    cmds = data.add_subparsers(dest="data_command", required=True)

    def synthetic_args(p: argparse.ArgumentParser, n: int) -> None:
        p.add_argument("--task", default="all", help="a synthetic family, several joined by '+', or 'all'")
        p.add_argument("--n", type=int, default=n, help="number of samples")
        p.add_argument("--split", default="train", choices=["train", "val", "test"])
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--size", type=int, default=448, help="image side in pixels (a multiple of 28)")

    p = cmds.add_parser("generate", help="write a synthetic split in the PAPO train or PAPO-Eval format")
    synthetic_args(p, 1000)
    p.add_argument("--format", default="papo-train", choices=["papo-train", "papo-eval"],
                   help="papo-train: DIR/data.parquet; papo-eval: DIR/data.json + DIR/images/")
    p.add_argument("--knob", action="append", default=[], metavar="KEY=VALUE", help="difficulty knob, e.g. grid=8")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_generate)

    p = cmds.add_parser("preview", help="a contact sheet of samples with their masked images")
    synthetic_args(p, 16)
    p.add_argument("--data", help="preview this dataset (path or hub id) instead of a synthetic task")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="0 shows no masked copy")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=_preview)

    p = cmds.add_parser("check", help="load a dataset and report kept and skipped rows")
    p.add_argument("data", help="file, directory, hub id or synthetic:SPEC")
    p.add_argument("--split", default=None)
    p.add_argument("--strict", action="store_true", help="fail on the first bad row, naming it")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=_check)
