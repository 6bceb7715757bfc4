"""avg@k and pass@k over groups of k responses per question."""

from __future__ import annotations

from collections.abc import Sequence

from papo.errors import UserError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from n samples with c correct: 1 - C(n-c, k) / C(n, k),
    computed as 1 - prod_{i=n-c+1..n} (1 - k / i) to stay exact for large n."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise UserError(f"pass@{k} needs at least k samples per question, got n={n}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def avg_and_pass_at_k(groups: Sequence[Sequence[float]], k: int) -> tuple[float, float]:
    """(avg@k, pass@k): avg@k is the mean over questions of each question's mean correctness (PAPO's metric);
    pass@k is the unbiased estimator from each question's n >= k samples."""
    if not groups:
        return 0.0, 0.0
    avg = sum(sum(g) / len(g) for g in groups) / len(groups)
    passk = sum(pass_at_k(len(g), int(round(sum(g))), k) for g in groups) / len(groups)
    return avg, passk
