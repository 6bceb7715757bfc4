"""What every sampler takes and returns: ``SamplingParams`` in, ``Completions`` out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from papo.errors import UserError


@dataclass
class SamplingParams:
    max_new_tokens: int = 2048
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (vLLM's -1); PAPO-Eval inherits LLaMA-Factory's top_k=50, set it to reproduce that
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise UserError(f"temperature must be > 0 when sampling, got {self.temperature} (use greedy=True)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completions:
    ids: Tensor  # (B, R) right-padded with pad_id
    mask: Tensor  # (B, R) 1 up to and including the first EOS
    finished: Tensor  # (B,) bool: ended with EOS (False: cut at max_new_tokens)

    @property
    def lengths(self) -> Tensor:  # (B,)
        return self.mask.sum(-1)

    def token_lists(self) -> list[list[int]]:
        return [row[: int(n)].tolist() for row, n in zip(self.ids, self.lengths)]


def interleave_groups(parts: list[Completions], per_group: list[int], pad_id: int) -> Completions:
    """Completions of the same prompts from several generate calls, prompt by prompt: part k gives
    ``per_group[k]`` consecutive rows to each prompt's group, in part order."""
    groups = parts[0].ids.shape[0] // per_group[0]
    width = max(p.ids.shape[1] for p in parts)
    rows = [(k, b * n + j) for b in range(groups) for k, n in enumerate(per_group) for j in range(n)]

    def take(field: str, fill: int) -> Tensor:
        padded = [torch.nn.functional.pad(getattr(p, field), (0, width - p.ids.shape[1]), value=fill) for p in parts]
        return torch.stack([padded[k][r] for k, r in rows])

    return Completions(take("ids", pad_id), take("mask", 0), torch.stack([parts[k].finished[r] for k, r in rows]))


def trim_after_eos(tokens: Tensor, eos_ids: list[int], pad_id: int) -> Completions:
    """Cut (B, L) generated tokens after their first EOS (kept), padding the rest."""
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= tokens == e
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after).long()
    ids = torch.where(after, torch.full_like(tokens, pad_id), tokens)
    return Completions(ids, mask, is_eos.any(-1))
