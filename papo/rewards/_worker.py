"""A grading worker process (started by papo.rewards.pool; not for direct use).

Protocol, one JSON value per line: the worker writes ``"ready"`` once its imports are done, then for each request
``[kind, args]`` on stdin writes ``[true, value]`` or ``[false, reason]`` on stdout. It exits on EOF, so it dies
with the trainer even when the trainer is killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any


def _grade(pred: str, gold: str) -> list[Any]:
    from mathruler.grader import grade_answer

    from papo.rewards.guard import REFUSALS

    before = REFUSALS.refused
    correct = bool(grade_answer(pred, gold))
    return [correct, REFUSALS.refused - before]


def _sleep(seconds: float) -> bool:  # diagnostics: lets tests exercise the timeout path
    time.sleep(seconds)
    return True


def _alloc(mb: int) -> int:  # diagnostics: lets tests exercise the memory limit
    return len(bytearray(mb << 20))


JOBS: dict[str, Callable[..., Any]] = {"grade": _grade, "sleep": _sleep, "alloc": _alloc}


def _limit_memory(extra_mb: int) -> None:
    """Cap the address space at what the imports took plus ``extra_mb``: a runaway sympy gets MemoryError."""
    if extra_mb <= 0:
        return
    try:
        import resource

        with open("/proc/self/status") as f:
            vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        limit = (vm_kb << 10) + (extra_mb << 20)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, StopIteration, ValueError):
        pass  # not Linux: the timeout still bounds the worker


def main(argv: list[str]) -> None:
    memory_mb = int(argv[0]) if argv else 0
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol stream
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; we exit on EOF

    from papo.rewards.guard import install_sympy_guard

    install_sympy_guard(parse_expr_too=True)
    from papo.rewards.guard import _namespace

    _namespace()  # build it before the first job so it is not billed to that job's timeout
    _limit_memory(memory_mb)
    out.write(b'"ready"\n')
    for line in sys.stdin.buffer:
        try:
            kind, args = json.loads(line)
            reply = [True, JOBS[kind](*args)]
        except MemoryError:
            reply = [False, "memory"]
        except Exception as e:  # noqa: BLE001 - any failure is "not graded", never a crash
            reply = [False, type(e).__name__]
        out.write(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    main(sys.argv[1:])
