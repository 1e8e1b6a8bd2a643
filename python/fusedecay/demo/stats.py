"""Seed statistics: a mean with a 95 % interval per measure, and verdicts that need the intervals to separate.

Every optimizer runs the same seeds (model init and batch order), so each measure has one value per seed.
The interval is Student's t interval of the mean, mean ± t(0.975, n−1)·s/√n with s the sample standard
deviation over seeds: with 3 seeds t = 4.30, so the interval is about ±2.5 s — wide on purpose. A verdict
is "agrees" or "disagrees" only when the two optimizers' intervals do not overlap (non-overlap of two 95 %
intervals is a stricter test than a 5 % two-sample test), otherwise "tie". One seed gives no interval, so
every comparison of one-seed runs is a "tie".

Beside the verdict, ``paired_verdict`` applies the same rule to the per-seed differences against zero: the runs
of one seed share their initialisation and batches, so seed-to-seed variation that moves both optimizers alike
cancels there. A "tie" whose paired verdict is "agrees" reads: the candidate was better on the seeds, by less
than the seeds differ from each other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

# t(0.975, df) for df = 1..30 (two-sided 95 %); beyond 30 the normal quantile 1.96 is within 4 %.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)

VERDICTS = ("agrees", "disagrees", "tie", "not tested")


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Interval:
    """Mean over seeds and its 95 % t interval [lo, hi]; n = number of seeds (lo = hi = mean when n = 1)."""
    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2

    def fmt(self, spec: str = ".4f", scale: float = 1.0, unit: str = "") -> str:
        m = f"{self.mean * scale:{spec}}{unit}"
        return m if self.n < 2 else f"{m} ± {self.half * scale:{spec.lstrip('+')}}{unit}"


def interval(values: Sequence[float]) -> Interval:
    """Mean and 95 % t interval of ``values`` (one per seed)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("interval() needs at least one value")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1 or not all(math.isfinite(x) for x in xs):
        return Interval(mean, mean, mean, 1 if n == 1 else n)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def separated(a: Interval, b: Interval) -> int:
    """+1 if a lies entirely above b, −1 if entirely below, 0 if they overlap (or either has one seed)."""
    if a.n < 2 or b.n < 2:
        return 0
    if a.lo > b.hi:
        return 1
    if a.hi < b.lo:
        return -1
    return 0


def verdict(candidate: Interval, baseline: Interval, better: str) -> str:
    """"agrees" if the candidate's interval lies entirely on the ``better`` side ("lower" or "higher") of the
    baseline's, "disagrees" if entirely on the other side, "tie" if they overlap."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    side = separated(candidate, baseline)
    if side == 0:
        return "tie"
    return "agrees" if (side < 0) == (better == "lower") else "disagrees"


def paired_verdict(baseline: Sequence[float], candidate: Sequence[float], better: str) -> str:
    """The same rule applied to the per-seed differences candidate − baseline against zero (the runs of one
    seed share init and batches, so this is the sharper test; it is reported beside the verdict, not as it)."""
    d = interval([c - b for b, c in zip(baseline, candidate)])
    return verdict(d, Interval(0.0, 0.0, 0.0, d.n), better)


def best_index(per_setting: Sequence[Sequence[float]], better: str = "lower") -> int:
    """Index of the setting (e.g. a λ of the grid) whose mean over seeds is best; the first one on exact ties.
    Non-finite means (a diverged run) are never chosen unless every setting is non-finite."""
    if not per_setting:
        raise ValueError("best_index() needs at least one setting")
    sign = 1.0 if better == "lower" else -1.0
    means: List[float] = []
    for vals in per_setting:
        m = sum(vals) / len(vals)
        means.append(sign * m if math.isfinite(m) else math.inf)
    return min(range(len(means)), key=means.__getitem__)
