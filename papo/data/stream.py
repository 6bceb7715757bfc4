"""``PromptStream``: training prompts in a reproducible order, resumable from one integer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from papo.data.loaders import filter_by_prompt_length, load_samples
from papo.data.sample import Sample
from papo.data.synthetic import SPEC_PREFIX, dataset_from_spec


class PromptStream:
    """Training prompts in a reproducible order; ``pos`` is saved in checkpoints (no data skipped or repeated).

    A dataset is reshuffled every epoch, as the authors' loader does, with the permutation of epoch e a pure
    function of (seed, e): ``pos`` alone fixes where a resumed run continues. Epoch 0 keeps the permutation
    earlier versions used for every epoch, so their checkpoints resume unchanged within it. A synthetic spec is
    an endless stream of fresh samples and needs no shuffle.
    """

    def __init__(self, spec: Any, seed: int, split: str = "train", count_tokens=None, max_prompt_length: int = 0) -> None:
        """``spec``: a data spec string, or rows in memory (a ``datasets.Dataset``, a list of dicts)."""
        self.endless = isinstance(spec, str) and spec.startswith(SPEC_PREFIX)
        if self.endless:
            self.data = dataset_from_spec(spec, split=split, n=10**9, seed=seed)
        else:
            self.data = load_samples(spec, split=split).samples
            if count_tokens is not None and max_prompt_length > 0:  # PAPO's filter_overlong_prompts
                self.data, report = filter_by_prompt_length(self.data, count_tokens, max_prompt_length)
                if report.skipped:
                    print(report.summary())
            if not self.data:
                raise ValueError(f"{spec}: no usable training rows")
        self.seed, self.pos = seed, 0
        self._epoch, self._order = -1, []

    def order(self, epoch: int) -> list[int]:
        """Dataset indices in the order epoch ``epoch`` visits them."""
        if epoch != self._epoch:
            key = self.seed if epoch == 0 else int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0])
            self._order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(key)).tolist()
            self._epoch = epoch
        return self._order

    def take(self, n: int) -> list[tuple[int, Sample]]:
        out = []
        for _ in range(n):
            i = self.pos if self.endless else self.order(self.pos // len(self.data))[self.pos % len(self.data)]
            out.append((self.pos, self.data[i]))
            self.pos += 1
        return out
