"""A clean stop on a scheduler's signal: the step under way finishes, a checkpoint is saved, and the run exits
so that ``papo train --resume`` continues it with nothing lost.

SIGTERM is what ``timeout``, Kubernetes, ``docker stop`` and Slurm's ``scancel`` send before they kill; SIGUSR1 is
the warning Slurm sends ahead of a time limit with ``--signal=USR1@<seconds>``. SIGINT keeps Python's
``KeyboardInterrupt``, an immediate stop. Repeated signals change nothing: a process can receive one SIGTERM
sent to its process group and another from a parent that passes it on.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from papo.errors import TrainingStopped
from papo.training.distributed import DistContext

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupted(TrainingStopped):
    """The run stopped on a signal after saving a checkpoint; ``signum`` is the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopOnSignal:
    """Within ``with StopOnSignal() as stop:`` the signals set a flag instead of ending the process; the training
    loop asks ``stop.requested(ctx)`` between steps. Outside the main thread (where Python cannot install
    handlers) it does nothing."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum

    def requested(self, ctx: DistContext) -> int | None:
        """The signal any rank has received (each rank asks after the same step, so all stop at the same step,
        where a sharded checkpoint needs every rank), or None."""
        if ctx.world_size == 1:
            return self.received
        return int(ctx.max(self.received or 0)[0]) or None
