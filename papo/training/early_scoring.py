"""Step 5 during step 2: scoring the responses that have ended while the rollout's last rows still decode.

A rollout batch ends in a tail: most responses have ended, a few run on towards the length cap, and a decode
step of a few rows reads the weights but leaves the GPU's arithmetic idle. ``EarlyScorer`` takes the rows
that have ended (``RolloutEngine.generate``'s ``on_finished``) and runs the step's no-grad passes over them
(old, masked, reference, noised log-probs) in a worker thread, on a CUDA stream of its own, while the main
thread keeps decoding: the compute-bound passes fill the GPU beside the bandwidth-bound decode.

The passes are the trainer's own (``score``) over the same sequences, grouped by when they ended instead of by
row; rows not scored when the rollout ends are scored after it, as without this. Decisions that need the
whole batch (rewards, DAPO's filter, advantages) still wait for the rollout to end. One process only: under
FSDP every pass is a collective, and ranks would reach them in different orders.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from papo.errors import ConfigError
from papo.rollout.sampling import Completions
from papo.training.experience import EarlyScore, MicroBatch, merge_micro_batches

SWITCH_INTERVAL_S = 2e-4  # the decode loop takes the GIL a few times per step: it must not wait 5 ms for it


def use_early_scoring(setting: bool | str, device: str | torch.device, world_size: int, uses_engine: bool,
                      noisy_rollout: bool, passes: bool) -> bool:
    """``trainer.early_scoring``: true, false, or "auto": on for one CUDA process sampling with papo's engine
    (on the CPU the worker would take the decode's cores). Nothing to do when a step runs no scoring pass.
    Raises ``ConfigError`` where it cannot run."""
    if setting is True:
        why = ("several processes (every pass of a sharded model is a collective)" if world_size > 1
               else "rollout.engine=hf (only papo's engine hands over rows as they end)" if not uses_engine
               else "NoisyRollout (two rollouts per group)" if noisy_rollout else "")
        if why:
            raise ConfigError(f"trainer.early_scoring=true cannot run with {why}; set it to auto or false")
    if setting == "auto":
        setting = torch.device(device).type == "cuda" and world_size == 1 and uses_engine and not noisy_rollout
    return bool(setting) and passes


class EarlyScorer:
    """``encode(rows, ids, mask)``: the ``MicroBatch`` of output rows ``rows`` with completions (b, R);
    ``score(name, mb)``: pass ``name``'s (b, R') log-probs; ``passes(row)``: the passes a row needs;
    ``batch_size``: sequences per pass; ``stream``: the CUDA stream the passes run on (None: the worker's
    default); ``keep_encodings``: hand each row's encoding on for the later passes.

    Use as a context manager around the rollout; ``results(n)`` then gives every row's ``EarlyScore`` (None
    for a row not scored) and raises what the worker raised."""

    def __init__(self, encode: Callable[[list[int], torch.Tensor, torch.Tensor], MicroBatch],
                 score: Callable[[str, MicroBatch], torch.Tensor], passes: Callable[[int], list[str]],
                 batch_size: int, pad_id: int, stream: torch.cuda.Stream | None = None,
                 keep_encodings: bool = True) -> None:
        self.encode, self.score, self.passes = encode, score, passes
        self.batch_size, self.pad_id, self.keep, self.stream = max(1, batch_size), pad_id, keep_encodings, stream
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (row, ids (1, R), mask (1, R))
        self.done: dict[int, EarlyScore] = {}
        self.error: BaseException | None = None
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._switch = sys.getswitchinterval()

    def __enter__(self) -> EarlyScorer:
        sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL_S))
        # the worker sees the caller's context: the compiled-passes region, entered before the rollout
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._work,),
                                        name="papo-early-scoring", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        sys.setswitchinterval(self._switch)
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def submit(self, rows: list[int], completions: Completions) -> None:
        """``on_finished``: queue rows that have ended (called by the decode loop; returns at once)."""
        with self._wake:
            for i, row in enumerate(rows):
                self.pending.append((row, completions.ids[i : i + 1], completions.mask[i : i + 1]))
            self._wake.notify()

    def results(self, rows: int) -> list[EarlyScore | None]:
        if self.error is not None:
            raise self.error
        out: list[EarlyScore | None] = [None] * rows
        for row, early in self.done.items():  # after __exit__: the passes are complete, one copy each
            out[row] = early._replace(logps={name: v.float().cpu() for name, v in early.logps.items()})
        return out

    # ------------------------------------------------------------------ the worker thread

    def _work(self) -> None:
        try:
            with torch.no_grad(), torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext():
                for batch in self._batches():
                    self._score(batch)
        except BaseException as err:  # re-raised by results(): the rollout itself goes on to its end
            self.error = err

    def _batches(self) -> Iterator[list[tuple[int, torch.Tensor, torch.Tensor]]]:
        """Full passes of ended rows, in the order they ended, until the rollout ends (what is left then is
        scored after it, with the rest)."""
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closing or len(self.pending) >= self.batch_size)
                if self._closing:
                    return
                batch, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
            yield batch

    def _score(self, batch: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        singles = [self.encode([row], ids, mask) for row, ids, mask in batch]
        mb = singles[0] if len(singles) == 1 else merge_micro_batches(singles, self.pad_id)
        logps: dict[int, dict[str, torch.Tensor]] = {row: {} for row, _, _ in batch}
        names = dict.fromkeys(name for row, _, _ in batch for name in self.passes(row))
        for name in names:  # a pass some rows of the batch need is run for all of them
            out = self.score(name, mb)  # left on the GPU: a copy here would wait for the pass
            for i, (row, _, mask) in enumerate(batch):
                logps[row][name] = out[i, : int(mask.sum())]
        for single, (row, _, _) in zip(singles, batch):
            self.done[row] = EarlyScore(logps[row], single if self.keep else None)
