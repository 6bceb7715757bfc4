"""Hard time and memory bounds for mathruler's sympy work: a few persistent worker processes, one job each at a time.

Why this design:
- ``signal.alarm`` only works in the main thread; trainers grade from worker threads and Ray actors.
- ``multiprocessing`` cannot start children from daemonic processes (``multiprocessing.Pool`` workers), and its
  spawn/forkserver contexts re-import the caller's ``__main__``. Plain ``subprocess`` has neither problem.
- A job that overruns its timeout gets its worker killed (by its own handle) and replaced; nothing in the
  calling process ever waits longer than the timeout, whichever thread calls.
- Workers speak JSON lines, so the caller never unpickles anything from a process that handled untrusted text.
- Workers install papo.rewards.guard at start-up, and cap their own address space.

Only ``math`` answers come here; typed answers are graded inline (papo.rewards.verifiers).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PKG_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the papo package
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from papo.rewards._worker import main; main(sys.argv[2:])"
_PLAIN_INT = re.compile(r"-?\d{1,15}")
MAX_GOLD_CHARS = 16384  # a request must fit the pipe buffer so a worker still importing cannot block the caller


@dataclass(frozen=True)
class GraderConfig:
    workers: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    timeout: float = 5.0  # seconds per answer, once the worker is up
    startup_timeout: float = 60.0  # a fresh worker imports sympy first
    memory_mb: int = 1024  # address space a worker may add after its imports (Linux)
    mode: str = "pool" if os.name == "posix" else "inline"  # inline: this process, guard on, no hard timeout


class _Worker:
    def __init__(self, cfg: GraderConfig) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, _PKG_ROOT, str(cfg.memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
            start_new_session=True,  # keeps terminal Ctrl-C away; it exits on stdin EOF instead
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.fd = self.stdout.fileno()
        self.buf = b""
        self.ready = False

    def send(self, kind: str, args: list[Any]) -> None:
        self.stdin.write(json.dumps([kind, args]).encode() + b"\n")
        self.stdin.flush()

    def read_lines(self) -> list[bytes]:
        data = os.read(self.fd, 1 << 16)  # select() said readable: returns what is there
        if not data:
            raise EOFError
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return lines

    def kill(self) -> None:
        for f in (self.stdin, self.stdout):
            try:
                f.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def forget(self) -> None:
        """In a forked child: drop our copies of the pipes; the worker belongs to the parent."""
        for f in (self.stdin, self.stdout):
            try:
                f.close()
            except OSError:
                pass


class SympyPool:
    """Up to ``cfg.workers`` worker processes, shared by all threads of this process."""

    def __init__(self, cfg: GraderConfig) -> None:
        self.cfg = cfg
        self.stats: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._closed = False

    def warm_up(self) -> None:
        """Start every worker now (each takes about a second to import sympy) and wait until they are ready."""
        self.run([("sleep", [0])] * self.cfg.workers)

    def _checkout(self, block: bool) -> _Worker | None:
        with self._cond:
            while not self._idle and len(self._all) >= self.cfg.workers:
                if not block:
                    return None
                self._cond.wait()
            if self._closed:
                raise RuntimeError("the math grader pool was shut down")
            if self._idle:
                return self._idle.pop()
            w = _Worker(self.cfg)
            self._all.add(w)
            return w

    def _checkin(self, w: _Worker) -> None:
        with self._cond:
            self._idle.append(w)
            self._cond.notify()

    def _discard(self, w: _Worker, respawn: bool) -> None:
        w.kill()
        with self._cond:
            self._all.discard(w)
            if respawn and not self._closed:
                fresh = _Worker(self.cfg)  # starts importing now, while the caller carries on
                self._all.add(fresh)
                self._idle.append(fresh)
                self.stats["restarts"] += 1
            self._cond.notify()

    def run(self, jobs: Sequence[tuple[str, list[Any]]]) -> list[tuple[bool, Any]]:
        """``(True, value)`` or ``(False, reason)`` per job; reasons: timeout, died, or the worker's exception name."""
        results: list[tuple[bool, Any] | None] = [None] * len(jobs)
        todo = deque(range(len(jobs)))
        busy: dict[int, list[Any]] = {}  # fd -> [worker, job index, deadline]
        sel = selectors.DefaultSelector()

        retried: set[int] = set()

        def finish(fd: int, result: tuple[bool, Any], healthy: bool) -> None:
            w, i, _ = busy.pop(fd)
            sel.unregister(fd)
            if healthy:
                self._checkin(w)
                results[i] = result
                return
            died_starting = not w.ready and result[1] == "died"
            self._discard(w, respawn=not died_starting)
            if result[1] == "died" and i not in retried:
                retried.add(i)  # it may have died of something else (killed while idle); a job gets one retry
                todo.append(i)
            elif died_starting:
                raise RuntimeError("math grader workers exit while starting; their error is on stderr")
            else:
                results[i] = result

        try:
            while todo or busy:
                while todo:
                    w = self._checkout(block=not busy)
                    if w is None:
                        break
                    i = todo.popleft()
                    try:
                        w.send(*jobs[i])
                    except OSError:  # it had died while idle
                        self._discard(w, respawn=True)
                        if i in retried:
                            results[i] = (False, "died")
                        else:
                            retried.add(i)
                            todo.append(i)
                        continue
                    wait = self.cfg.timeout if w.ready else self.cfg.startup_timeout + self.cfg.timeout
                    busy[w.fd] = [w, i, time.monotonic() + wait]
                    sel.register(w.fd, selectors.EVENT_READ)
                if not busy:
                    continue
                timeout = max(0.0, min(entry[2] for entry in busy.values()) - time.monotonic())
                for key, _ in sel.select(timeout):
                    entry = busy[key.fd]
                    w = entry[0]
                    try:
                        lines = w.read_lines()
                    except (EOFError, OSError):
                        finish(key.fd, (False, "died"), healthy=False)
                        continue
                    for line in lines:
                        try:
                            msg = json.loads(line)
                        except ValueError:  # not our protocol: something wrote to the worker's stdout
                            finish(key.fd, (False, "died"), healthy=False)
                            break
                        if msg == "ready":
                            w.ready = True
                            entry[2] = time.monotonic() + self.cfg.timeout
                        else:
                            finish(key.fd, (bool(msg[0]), msg[1]), healthy=True)
                            break
                now = time.monotonic()
                for fd in [fd for fd, entry in busy.items() if entry[2] <= now]:
                    with self._cond:
                        self.stats["timeouts"] += 1
                    finish(fd, (False, "timeout"), healthy=False)
        finally:
            for fd in list(busy):  # interrupted (KeyboardInterrupt, error): do not hand back half-used workers
                self._discard(busy.pop(fd)[0], respawn=False)
            sel.close()
        with self._cond:
            self.stats["jobs"] += len(jobs)
        return [r if r is not None else (False, "lost") for r in results]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            workers, self._all, self._idle = list(self._all), set(), []
            self._cond.notify_all()
        for w in workers:
            w.kill()

    def forget(self) -> None:
        for w in list(self._all):
            w.forget()


# ---- process-wide pool and the math grading entry point ---------------------------------------------------
_lock = threading.Lock()
_config = GraderConfig()
_pool: SympyPool | None = None
STATS: Counter[str] = Counter()  # graded, refused (by the guard), timeouts, errors; for logging
_stats_lock = threading.Lock()


def _count(key: str, n: int = 1) -> None:
    with _stats_lock:  # Counter's += is a read-modify-write; trainers grade from several threads
        STATS[key] += n


def configure(**changes: Any) -> GraderConfig:
    """Change ``GraderConfig`` fields (workers, timeout, startup_timeout, memory_mb, mode); restarts the pool."""
    global _config
    with _lock:
        new = replace(_config, **changes)
        if new.mode not in ("pool", "inline"):
            raise ValueError(f"mode must be 'pool' or 'inline', not {new.mode!r}")
        if new.workers < 1 or new.timeout <= 0:
            raise ValueError(f"need workers >= 1 and timeout > 0, got {new.workers} and {new.timeout}")
        _config = new
    shutdown()
    return _config


def current_config() -> GraderConfig:
    return _config


def warm_up() -> None:
    """Start the math grading workers now rather than on the first math answer (about a second each, in parallel)."""
    if _config.mode == "pool":
        get_pool().warm_up()


def get_pool() -> SympyPool:
    global _pool
    with _lock:
        if _pool is None:
            _pool = SympyPool(_config)
        return _pool


def shutdown() -> None:
    """Stop the worker processes (they also exit by themselves when this process ends)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.close()


def _after_fork_in_child() -> None:
    global _pool, _lock
    _lock = threading.Lock()  # the parent may have held it while forking
    if _pool is not None:
        _pool.forget()
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(shutdown)


def grade_math_many(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """mathruler's ``grade_answer(pred, gold)`` for each pair, guarded and bounded in time and memory."""
    out: list[bool | None] = [None] * len(pairs)
    jobs: list[tuple[str, list[Any]]] = []
    where: list[int] = []
    for i, (pred, gold) in enumerate(pairs):
        if pred == gold:
            out[i] = True  # grade_answer(x, x) is True: its first test compares the same normalisation of both
        elif _PLAIN_INT.fullmatch(gold) and (pred == "None" or _PLAIN_INT.fullmatch(pred)):
            # grade_answer on two plain integers is int equality (both normalise to str(int(x)), and sympy only
            # sees a nonzero difference), and "None" never equals one; tests/test_rewards.py checks this
            out[i] = pred != "None" and int(pred) == int(gold)
        elif len(gold) > MAX_GOLD_CHARS:
            _count("errors")
            out[i] = False
        else:
            jobs.append(("grade", [pred, gold]))
            where.append(i)
    if jobs:
        replies = _grade_inline(jobs) if _config.mode == "inline" else get_pool().run(jobs)
        for i, (ok, value) in zip(where, replies):
            if ok:
                out[i] = bool(value[0])
                _count("refused", int(value[1]))
            else:
                _count("timeouts" if value == "timeout" else "errors")
                out[i] = False
    _count("graded", len(pairs))
    return [bool(x) for x in out]


def _grade_inline(jobs: Sequence[tuple[str, list[Any]]]) -> list[tuple[bool, Any]]:
    """The no-subprocess fallback: same guard (mathruler only), a SIGALRM timeout only in the main thread."""
    import signal

    from papo.rewards import _worker
    from papo.rewards.guard import install_sympy_guard

    install_sympy_guard(parse_expr_too=False)
    use_alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not use_alarm and "inline" not in STATS:
        log.warning("math grading inline without a hard timeout (not the main thread or no SIGALRM)")
    _count("inline")

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError("math grading timed out")

    previous = signal.signal(signal.SIGALRM, expire) if use_alarm else None
    replies: list[tuple[bool, Any]] = []
    try:
        for kind, args in jobs:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, _config.timeout)
            try:
                replies.append((True, _worker.JOBS[kind](*args)))
            except Exception as e:  # noqa: BLE001 - mathruler swallows most errors itself; the rest is "wrong"
                replies.append((False, "timeout" if isinstance(e, TimeoutError) else type(e).__name__))
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, previous)
    return replies
