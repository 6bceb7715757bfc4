"""Command-line entry point: ``papo <command> ...``.

Each command lives in a small ``_cmd_*`` function; heavy imports happen inside it so ``papo --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from papo import __version__


def _cmd_mask(args: argparse.Namespace) -> int:
    import numpy as np

    from papo.images import to_rgb
    from papo.masking import MaskingConfig, corrupt_images

    cfg = MaskingConfig(strategy=args.strategy, ratio=args.ratio, patch_size=args.patch_size, noise_std=args.noise_std)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(args.images):
        original = to_rgb(path, source=str(path))
        (masked,) = corrupt_images([original], cfg, seed=args.seed, sample_id=Path(path).name, draw=args.draw)
        target = out / f"{Path(path).stem}.masked.png"
        masked.save(target)
        black = (np.asarray(masked) == 0).all(-1).mean()
        print(f"{path} -> {target}  ({original.width}x{original.height}, black pixels {black:.1%})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="papo", description="Perception-Aware Policy Optimization for VLMs")
    parser.add_argument("--version", action="version", version=f"papo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mask", help="write PAPO-masked copies of images (to inspect the masked branch)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--strategy", default="random", help="random (official) | full | noise")
    p.add_argument("--ratio", type=float, default=0.6, help="per-cell black probability (official 0.6)")
    p.add_argument("--patch-size", type=int, default=14, help="cell size in pixels (official 14)")
    p.add_argument("--noise-std", type=float, default=0.6, help="std of the noise strategy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draw", type=int, default=0, help="draw index: a new mask for the same image and seed")
    p.set_defaults(func=_cmd_mask)

    from papo.data.commands import register as register_data

    register_data(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: a clear message, no traceback
        print(f"papo {args.command}: error: {err}", file=sys.stderr)
        return 2
