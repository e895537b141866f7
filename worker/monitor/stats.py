"""Diagnostic accuracy with 95% intervals (numpy only).

Proportions (sensitivity, specificity, PPV, NPV) carry Wilson score intervals; the AUC is the
Mann-Whitney statistic (a tie between a positive and a negative counts one half) with DeLong's
variance (DeLong, DeLong & Clarke-Pearson 1988, computed with midranks as Sun & Xu 2014) and a
normal interval clipped to [0, 1]. A figure whose denominator is empty is None, not a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

#: the 97.5th percentile of the standard normal: two-sided 95% intervals
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """A figure and its 95% interval; ``low``/``high`` are None where no interval can be given."""

    value: float
    low: float | None
    high: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def __str__(self) -> str:
        """``0.82 (0.70-0.90)``."""
        interval = f" ({self.low:.2f}-{self.high:.2f})" if self.low is not None and self.high is not None else ""
        return f"{self.value:.2f}{interval}"


def wilson(successes: int, n: int, z: float = Z95) -> Estimate | None:
    """``successes / n`` with its Wilson score interval; None when ``n`` is 0."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # p lies inside in exact arithmetic; clamp so that rounding never puts it outside
    return Estimate(p, max(0.0, min(p, float(centre - half))), min(1.0, max(p, float(centre + half))))


def confusion(truth: np.ndarray, called: np.ndarray) -> tuple[int, int, int, int]:
    """(true positives, false positives, true negatives, false negatives) of boolean arrays."""
    truth, called = np.asarray(truth, bool), np.asarray(called, bool)
    return (int(np.sum(truth & called)), int(np.sum(~truth & called)), int(np.sum(~truth & ~called)),
            int(np.sum(truth & ~called)))


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def auc(truth: np.ndarray, score: np.ndarray, z: float = Z95) -> Estimate | None:
    """The AUC with DeLong's 95% interval; None without both positives and negatives.

    The interval needs at least two positives and two negatives (else ``low``/``high`` are None).
    """
    truth, score = np.asarray(truth, bool), np.asarray(score, np.float64)
    positives, negatives = score[truth], score[~truth]
    m, n = len(positives), len(negatives)
    if m == 0 or n == 0:
        return None
    overall = _midranks(np.concatenate([positives, negatives]))
    # structural components: V10[i] = share of negatives below positive i (ties half), V01[j] likewise
    v10 = (overall[:m] - _midranks(positives)) / n
    v01 = 1.0 - (overall[m:] - _midranks(negatives)) / m
    value = float(v10.mean())
    if m < 2 or n < 2:
        return Estimate(value, None, None)
    se = float(np.sqrt(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n))
    return Estimate(value, max(0.0, value - z * se), min(1.0, value + z * se))


def figures(truth: np.ndarray, score: np.ndarray, called: np.ndarray, z: float = Z95) -> dict[str, Estimate | None]:
    """Sensitivity, specificity, PPV and NPV of the calls, and the AUC of the scores (intervals at ``z``)."""
    tp, fp, tn, fn = confusion(truth, called)
    return {"sensitivity": wilson(tp, tp + fn, z), "specificity": wilson(tn, tn + fp, z),
            "ppv": wilson(tp, tp + fp, z), "npv": wilson(tn, tn + fn, z), "auc": auc(truth, score, z)}


def bonferroni_z(comparisons: int, alpha: float = 0.05) -> float:
    """The two-sided normal quantile that keeps ``comparisons`` intervals together at level ``1 - alpha``."""
    return NormalDist().inv_cdf(1 - alpha / (2 * max(1, comparisons)))
