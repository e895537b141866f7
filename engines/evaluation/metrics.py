"""Binary classification metrics: AUC with a bootstrap interval, ROC curve, Youden threshold (numpy only)."""

from __future__ import annotations

import numpy as np


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores`` with ties given their average rank."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half)."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative")
    ranks = _ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_auc_ci(
    labels: np.ndarray, scores: np.ndarray, n: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUC (resamples lacking a class are skipped)."""
    rng = np.random.default_rng(seed)
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].all() or not labels[idx].any():
            continue
        values.append(auc(labels[idx], scores[idx]))
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates for "positive if score >= threshold", thresholds descending."""
    labels = np.asarray(labels, dtype=bool)
    thresholds = np.unique(scores)[::-1]
    positive = np.asarray(scores)[None, :] >= thresholds[:, None]
    tpr = (positive & labels).sum(axis=1) / labels.sum()
    fpr = (positive & ~labels).sum(axis=1) / (~labels).sum()
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thresholds]


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, float]:
    """The threshold maximizing sensitivity + specificity - 1, with its sensitivity and specificity."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    best = int(np.argmax(tpr[1:] - fpr[1:])) + 1
    return float(thresholds[best]), float(tpr[best]), float(1.0 - fpr[best])
