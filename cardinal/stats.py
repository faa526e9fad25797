"""Seeds as replicates: means with 95% intervals, differences and ratios between models, and verdicts.

Every interval is a Student t interval (quantiles from ``scipy.stats.t``). A verdict is only given when
both sides have at least two seeds, because one run says nothing about the spread between runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
SIGNIFICANT = "significant at 95%"
NOT_DISTINGUISHABLE = "not distinguishable at 95%"
ONE_SEED = "one seed: no verdict"


@dataclass(frozen=True)
class Estimate:
    """Mean of one metric over seeds; ``std`` and ``ci95`` (the interval's half-width) need n >= 2."""

    mean: float
    std: float
    ci95: float
    n: int


@dataclass(frozen=True)
class Interval:
    """A difference (or ratio) between two models with its 95% interval; low/high are NaN below 2 seeds."""

    estimate: float
    low: float
    high: float
    method: str  # "paired", "Welch" or "" when no interval could be formed
    n_a: int
    n_b: int
    null: float = 0.0  # the value meaning "no difference": 0 for a gap, 1 for a ratio

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    @property
    def verdict(self) -> str:
        if not self.has_interval:
            return ONE_SEED
        return NOT_DISTINGUISHABLE if self.low <= self.null <= self.high else SIGNIFICANT


def _clean(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    return array[~np.isnan(array)]


def t_half_width(std: float, n: int, df: float) -> float:
    """Half-width of the two-sided 95% Student t interval of a mean with standard error std / sqrt(n)."""
    if n < 2 or math.isnan(std) or math.isnan(df):
        return math.nan
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df) * std / math.sqrt(n))


def estimate(values: Sequence[float]) -> Estimate:
    """Mean, sample standard deviation and 95% half-width of the mean; NaN values are ignored."""
    array = _clean(values)
    n = len(array)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    std = float(array.std(ddof=1)) if n > 1 else math.nan
    return Estimate(float(array.mean()), std, t_half_width(std, n, n - 1), n)


def welch_interval(a: Sequence[float], b: Sequence[float]) -> Interval:
    """mean(a) - mean(b) with Welch's t interval (unequal variances, Welch-Satterthwaite degrees of freedom).

    With fewer than two values on either side there is no spread to judge by: low and high are NaN.
    """
    a, b = _clean(a), _clean(b)
    gap = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return Interval(gap, math.nan, math.nan, "", len(a), len(b))
    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(var_a + var_b)
    if se == 0:  # no spread at all: the difference is exact
        return Interval(gap, gap, gap, "Welch", len(a), len(b))
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df) * se)
    return Interval(gap, gap - half, gap + half, "Welch", len(a), len(b))


def paired_interval(a: Sequence[float], b: Sequence[float]) -> Interval:
    """mean(a - b) over matched pairs (same seed on both sides) with the paired t interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need the same length, got {len(a)} and {len(b)}")
    differences = _clean(a - b)
    summary = estimate(differences)
    n = summary.n
    if n < 2:
        return Interval(summary.mean, math.nan, math.nan, "", n, n)
    return Interval(summary.mean, summary.mean - summary.ci95, summary.mean + summary.ci95, "paired", n, n)


def gap_interval(a: Sequence[float], b: Sequence[float], seeds_a: Sequence | None = None,
                 seeds_b: Sequence | None = None) -> Interval:
    """The difference a - b: paired by seed when both sides ran the same seeds (n >= 2), else Welch."""
    if seeds_a is not None and seeds_b is not None and len(seeds_a) >= 2 and sorted(seeds_a) == sorted(seeds_b):
        by_seed_b = dict(zip(seeds_b, b))
        return paired_interval(list(a), [by_seed_b[seed] for seed in seeds_a])
    return welch_interval(a, b)


def ratio_interval(a: Sequence[float], b: Sequence[float]) -> Interval:
    """Ratio of speeds a / b: the ratio of geometric means with a Welch interval on the logs, exponentiated.

    Speeds are positive and multiplicative (a model "runs at 0.8x"), so the interval is formed where
    differences are symmetric, on log(img/s) per run, and mapped back; it is then asymmetric around the
    ratio and never crosses zero. With one run on either side only the ratio is given.
    """
    a, b = _clean(a), _clean(b)
    if len(a) == 0 or len(b) == 0 or (a <= 0).any() or (b <= 0).any():
        return Interval(math.nan, math.nan, math.nan, "", len(a), len(b), null=1.0)
    logs = welch_interval(np.log(a), np.log(b))
    return Interval(math.exp(logs.estimate), math.exp(logs.low), math.exp(logs.high), logs.method,
                    logs.n_a, logs.n_b, null=1.0)


def too_wide(low: float, high: float, lowest: float, highest: float) -> bool:
    """An interval reaching past what the quantity can be (a mean accuracy outside 0..100 %, a gap beyond
    ±100 points, a speed at or below 0) only says the seeds are too few or too spread to tell anything."""
    return not (math.isnan(low) or math.isnan(high)) and (low < lowest or high > highest)


def ratio_too_wide(interval: Interval, digits: int = 2) -> bool:
    """A ratio interval that reaches 0 once rounded, or is wider than the ratio itself, means nothing."""
    if not interval.has_interval:
        return False
    return round(interval.low, digits) <= 0 or interval.high - interval.low > interval.estimate
