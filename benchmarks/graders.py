"""Per-sample cost of papo.rewards on CPU, next to plain in-process mathruler (no sandbox) for the math workloads.

    .venv/bin/python benchmarks/graders.py [--n 2000] [--workers 4]

Responses are ~3 KB (a thinking block plus a boxed answer), half right, half wrong. "batch" is one
score_responses call (what the trainer does); "single" is one papo_math call per response.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from mathruler.grader import extract_boxed_content, grade_answer

import papo.rewards as R

FILLER = "Let me look at the image carefully and reason step by step about what it shows. " * 36  # ~3 KB


def make(kind: str, n: int, rng: random.Random) -> tuple[list[str], list[str], list[str], list[dict]]:
    responses, golds, metas = [], [], []
    for i in range(n):
        if kind in ("int", "math-int"):
            gold = str(rng.randint(0, 200))
            pred = gold if i % 2 else str(int(gold) + 1)
        elif kind == "word":
            vocab = ["red", "green", "blue", "yellow", "purple"]
            gold, pred = rng.choice(vocab), rng.choice(vocab)
        elif kind == "choice":
            gold, pred = rng.choice("ABCD"), f"({rng.choice('ABCD')})"
        elif kind == "math-frac":
            a, b = rng.randint(1, 30), rng.randint(2, 30)
            gold = f"\\frac{{{a}}}{{{b}}}"
            pred = f"{a / b:.6g}" if i % 2 else f"\\frac{{{a + 1}}}{{{b}}}"
        else:  # math-mixed: the shapes ViRL39K-style golds take
            gold, pred = rng.choice([("2\\sqrt{3}", "\\sqrt{12}"), ("\\frac{1}{2}", "0.5"), ("138^\\circ", "138"),
                                     ("x^2+1", "1+x^2"), ("(1, 2)", "(1,2)"), ("12", "12 cm"), ("\\pi", "3.14")])
        responses.append(f"<think>{FILLER}</think> The answer is \\boxed{{{pred}}}.")
        golds.append(gold)
        metas.append({"vocabulary": ["red", "green", "blue", "yellow", "purple"]} if kind == "word" else {})
    types = {"int": "int", "word": "word", "choice": "choice"}.get(kind, "math")
    return responses, golds, [types] * n, metas


def per_sample_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    if args.workers:
        R.configure(workers=args.workers)
    start = time.perf_counter()
    R.warm_up()
    print(f"worker start-up (all {R.current_config().workers}, in parallel): {time.perf_counter() - start:.2f} s")
    rng = random.Random(0)
    print(f"{'workload':<12} {'batch us':>10} {'single us':>10} {'mathruler us':>13}")
    for kind in ("int", "word", "choice", "math-int", "math-frac", "math-mixed"):
        r, g, t, m = make(kind, args.n, rng)
        batch = per_sample_us(lambda: R.score_responses(r, g, t, m), args.n)
        single = per_sample_us(lambda: [R.papo_math(*x) for x in zip(r, g, t, m)], args.n)
        plain = "" if not kind.startswith("math") else \
            f"{per_sample_us(lambda: [grade_answer(extract_boxed_content(x), y) for x, y in zip(r, g)], args.n):13.0f}"
        print(f"{kind:<12} {batch:10.0f} {single:10.0f} {plain}")
    huge = "<think>" + "a " * 500_000 + "</think>\\boxed{3}"
    print(f"1 MB response (int): {per_sample_us(lambda: R.papo_math(huge, '3', 'int'), 1) / 1000:.1f} ms")
    print("grader stats:", dict(R.STATS))


if __name__ == "__main__":
    main()
