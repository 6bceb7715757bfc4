"""Seconds spent in named passes of GPU work, read without a host sync after each pass.

A sync after every scoring pass (to time it, or to copy its log-probs to the host) lets the GPU idle while the
host prepares the next pass. ``PassClock`` brackets each pass with CUDA events instead and reads them once at
the end; on the CPU, where work runs as it is issued, it keeps wall time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class PassClock:
    def __init__(self, device: str | torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.spans: list[tuple[str, Any, Any]] = []  # (name, start, end): CUDA events, or wall-clock seconds

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.time()
            yield
            end = time.time()
        self.spans.append((name, start, end))

    def add_to(self, timing: dict[str, float]) -> None:
        """Add each name's seconds to ``timing``; on CUDA this waits for the measured work to finish."""
        for name, start, end in self.spans:
            if self.cuda:
                end.synchronize()
            seconds = start.elapsed_time(end) / 1000 if self.cuda else end - start
            timing[name] = timing.get(name, 0.0) + seconds
        self.spans.clear()
