"""Failpoints: named places in the training loop where tests and ``scripts/crash_test.py`` inject faults.

Off unless configured, and then a dict lookup per call. Configure with the environment (read once, so a
child ``papo train`` process inherits it) or with ``configure()`` in-process:

    PAPO_FAILPOINTS="checkpoint.state=kill@2; rewards=nan@1-3; update=oom@1"

``name=action@hits``: the action fires on the given hits of that failpoint in this process (``@2``: the second
hit; ``@1-3``: hits one to three; ``@*``: every hit). A ``rankN:`` prefix limits a rule to the process of
that rank under torchrun (``rank1:update=oom@1``: one worker fails, the others do not). Actions:

  kill    SIGKILL this process (what a crash, an OOM-killer or a preemption does)
  enospc  raise OSError(ENOSPC), as a full disk does mid-write
  oom     raise torch.OutOfMemoryError, as CUDA does
  nan     make one element of the value at that point NaN (rewards, logprobs, grad), through ``Poison``,
          the trainer's hook object
  stall   sleep STALL_S seconds, as a slow checkpoint write does: longer than torchrun's default 30-s grace
          for its ranks after a stop signal
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from papo.errors import UserError

ENV = "PAPO_FAILPOINTS"
ACTIONS = ("kill", "enospc", "oom", "nan", "stall")
STALL_S = 40

# every failpoint the package defines, where it sits
POINTS = {
    "rollout": "after sampling, before rewards",
    "rewards": "rewards of a step (nan: one reward becomes NaN)",
    "logprobs": "step 5's log-probs (nan: one of the first computed, old, masked or reference, becomes NaN)",
    "update": "each micro-batch forward/backward",
    "grad": "after a mini-batch's backward (nan: one gradient becomes NaN)",
    "checkpoint.model": "checkpoint written: model files only",
    "checkpoint.state": "checkpoint written: model and optimizer state, not yet renamed",
    "checkpoint.rename": "checkpoint renamed into place, older ones not yet pruned",
    "metrics": "before a step's metrics line is written",
}


@dataclass
class _Rule:
    action: str
    first: int
    last: int  # inclusive; -1: no end


_rules: dict[str, _Rule] = {}
_hits: dict[str, int] = {}


def parse(spec: str) -> dict[str, _Rule]:
    rules = {}
    this_rank = int(os.environ.get("RANK", "0"))
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        rule, rank = part, None
        if part.startswith("rank"):
            digits, colon, rule = part[4:].partition(":")
            if not colon or not digits.strip().isdigit():
                raise UserError(f"{ENV}: bad rank prefix in {part!r} (want rankN:name=action@hits)")
            rank, rule = int(digits), rule.strip()
        name, eq, rest = rule.partition("=")
        action, at, hits = rest.partition("@")
        name, action, hits = name.strip(), action.strip(), hits.strip() or "1"
        if not eq or name not in POINTS:
            raise UserError(f"{ENV}: unknown failpoint in {part!r}; known: {', '.join(POINTS)}")
        if action not in ACTIONS:
            raise UserError(f"{ENV}: unknown action in {part!r}; choose one of {', '.join(ACTIONS)}")
        try:
            if hits == "*":
                first, last = 1, -1
            else:
                lo, _, hi = hits.partition("-")
                first, last = int(lo), int(hi or lo)
        except ValueError:
            raise UserError(f"{ENV}: bad hit count in {part!r} (want @N, @N-M or @*)") from None
        if rank is None or rank == this_rank:  # every rule is checked; another rank's is not armed here
            rules[name] = _Rule(action, first, last)
    return rules


def configure(spec: str | None) -> None:
    """Replace the active failpoints (``None`` or "" turns them all off) and reset hit counts."""
    global _rules
    _rules = parse(spec or "")
    _hits.clear()


def failpoint(name: str) -> str | None:
    """Count a hit of ``name``; perform its action if it fires. Returns "nan" for the caller to act on."""
    rule = _rules.get(name)
    if rule is None:
        return None
    _hits[name] = n = _hits.get(name, 0) + 1
    if n < rule.first or (rule.last != -1 and n > rule.last):
        return None
    if rule.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if rule.action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<failpoint {name}>")
    if rule.action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at failpoint {name})")
    if rule.action == "stall":
        time.sleep(STALL_S)
    return rule.action


class Poison:
    """The trainer's values that the "nan" action corrupts, each through one hook: the loop hands a value over
    and gets it back unchanged unless that failpoint fires (then one element is NaN, as a real overflow makes it).
    The loop never writes into its own tensors for a fault."""

    @staticmethod
    def rewards(rewards: Any) -> Any:  # (N,) float tensor
        if failpoint("rewards") == "nan":
            rewards = rewards.clone()
            rewards[0] = float("nan")
        return rewards

    @staticmethod
    def logprobs(logps: dict[str, Any]) -> dict[str, Any]:  # name -> (N, R) log-probs of a step, in order
        if failpoint("logprobs") == "nan" and logps:
            name = next(iter(logps))
            logps = {**logps, name: logps[name].clone()}
            logps[name][0, 0] = float("nan")
        return logps

    @staticmethod
    def gradients(parameters: Any) -> None:  # after backward, before the norm: the first gradient gets a NaN
        if failpoint("grad") == "nan":
            next(p for p in parameters if p.grad is not None).grad.view(-1)[0] = float("nan")


configure(os.environ.get(ENV))
