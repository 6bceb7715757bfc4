"""KL_prcp-hacking monitor: the collapse signs the PAPO authors document.

In a collapsing run KL_prcp rises sharply (their logged -KL_prcp falls from about -0.03 to -1.2), the
high-side clip fraction keeps climbing, and both the full-image and the masked-image entropies rise. The
monitor compares a recent window with the run's early baseline and warns when at least two signs agree.

The clip fraction is the authors' ``pg_clipfrac_higher`` (both clip sides), the metric their 5e-4 -> 7e-3
curve plots. Rows logged before papo had it carry only ``clipfrac_high`` (A > 0 side only); both windows then
read that key, so a baseline and a recent window are never measured differently.

KL_prcp counts as rising when it grows `kl_rise` times or by `kl_abs_rise` nats per token. The second test
matters when KL_prcp starts large: a small model never trained on masked images starts near 1.7, and the k3
estimator's clamp at 10 then caps any rise at about 6x (docs/RESULTS.md: a with-grad masked branch went
1.7 -> 9 while its masked-image answers turned into digit strings). With one update per step the clip
fraction stays 0, so that sign cannot fire and the other two must agree.
"""

from __future__ import annotations

from statistics import mean, median
from typing import Any


class HackingMonitor:
    def __init__(self, window: int = 10, kl_rise: float = 4.0, kl_floor: float = 0.05, clip_rise: float = 2.0,
                 entropy_rise: float = 1.3, kl_abs_rise: float = 2.0) -> None:
        self.window, self.kl_rise, self.kl_floor, self.clip_rise, self.entropy_rise = window, kl_rise, kl_floor, clip_rise, entropy_rise
        self.kl_abs_rise = kl_abs_rise
        self.history: list[dict[str, float]] = []

    def observe(self, row: dict[str, Any]) -> str:
        """Record a step; return a warning text when the collapse signs appear ("" otherwise)."""
        keys = ("kl_prcp", "pg_clipfrac_higher", "clipfrac_high", "entropy", "masked_entropy")
        self.history.append({k: float(row[k]) for k in keys if k in row})
        if len(self.history) < 2 * self.window:
            return ""
        base, recent = self.history[: self.window], self.history[-self.window :]

        def level(rows, key):
            values = [r[key] for r in rows if key in r]
            return (median(values) if rows is base else mean(values)) if values else None

        signs = []
        kl_b, kl_r = level(base, "kl_prcp"), level(recent, "kl_prcp")
        if kl_b is not None and kl_r is not None and kl_r > self.kl_floor and (
                kl_r > self.kl_rise * max(kl_b, 1e-6) or kl_r - kl_b > self.kl_abs_rise):
            signs.append(f"KL_prcp {kl_b:.3g} -> {kl_r:.3g}")
        clip = "pg_clipfrac_higher" if all("pg_clipfrac_higher" in r for r in base + recent) else "clipfrac_high"
        cf_b, cf_r = level(base, clip), level(recent, clip)
        if cf_b is not None and cf_r is not None and cf_r > 1e-3 and cf_r > self.clip_rise * max(cf_b, 1e-6):
            signs.append(f"clip fraction ({clip}) {cf_b:.3g} -> {cf_r:.3g}")
        ents = [(level(base, k), level(recent, k)) for k in ("entropy", "masked_entropy")]
        if all(b is not None and r is not None and r > self.entropy_rise * b for b, r in ents):
            signs.append("both entropies rising")
        return "possible KL_prcp hacking: " + "; ".join(signs) if len(signs) >= 2 else ""

    def state(self) -> dict[str, Any]:
        return {"history": self.history}

    def load(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
