"""Patient-level cross-validation of a logistic head and its learning curve."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engines.evaluation.folds import auc_summary, patient_folds
from engines.evaluation.metrics import auc
from engines.heads.logistic import fit_logistic


@dataclass(frozen=True)
class CrossValidation:
    """Out-of-fold probabilities (each image scored by the fold model that did not see its patient)."""

    scores: np.ndarray  # (N,) float64
    folds: list[np.ndarray]  # image indices per fold
    fold_aucs: list[float | None]  # None where a fold lacks a class

    def summary(self, labels: np.ndarray, seed: int = 0, n_boot: int = 2000) -> dict:
        """Pooled out-of-fold AUC with its bootstrap 95% CI, plus the per-fold AUCs."""
        return {**auc_summary(labels, self.scores, seed=seed, n_boot=n_boot),
                "folds": len(self.folds), "fold_sizes": [len(f) for f in self.folds],
                "fold_aucs": [None if a is None else round(a, 4) for a in self.fold_aucs]}


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.any() and not y.all())


def cross_validate(x: np.ndarray, y: np.ndarray, patients: Sequence[str], k: int = 5, seed: int = 0,
                   l2: float = 1.0) -> CrossValidation:
    """Stratified patient-level ``k``-fold cross-validation (:func:`engines.evaluation.folds.patient_folds`)."""
    y = np.asarray(y, dtype=bool)
    folds = patient_folds(patients, y[:, None], k, seed)
    scores = np.full(len(y), np.nan)
    fold_aucs: list[float | None] = []
    for test in folds:
        train = np.setdiff1d(np.arange(len(y)), test)
        if not _both_classes(y[train]):
            raise ValueError("a training part lacks a class: too few positives or negatives for this many folds")
        scores[test] = fit_logistic(x[train], y[train], l2).probabilities(x[test])
        fold_aucs.append(auc(y[test], scores[test]) if _both_classes(y[test]) else None)
    return CrossValidation(scores, folds, fold_aucs)


def _draw(pool: np.ndarray, patients: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator,
          tries: int = 100) -> np.ndarray | None:
    """Whole patients of ``pool`` in random order until ``n`` images; redrawn until both classes appear."""
    names, inverse = np.unique(patients[pool], return_inverse=True)
    for _ in range(tries):
        chosen: list[int] = []
        for g in rng.permutation(len(names)):
            if len(chosen) >= n:
                break
            chosen.extend(pool[inverse == g].tolist())
        picked = np.array(sorted(chosen))
        if _both_classes(y[picked]):
            return picked
    return None


def learning_curve(x: np.ndarray, y: np.ndarray, patients: Sequence[str], sizes: Sequence[int],
                   repeats: int = 20, k: int = 5, seed: int = 0, l2: float = 1.0,
                   splits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """Test AUC against the number of labelled training images.

    ``splits`` are (training pool, test) index pairs; by default the stratified patient-level
    ``k`` folds (test = one fold, pool = the others). For each size and split, ``repeats``
    random draws of whole patients from the pool (conditioned on holding both classes) train a
    head scored on the split's test part; a size at or above the pool size is drawn once (the
    whole pool). Reports the mean, standard deviation and 2.5/97.5 percentiles over all draws.
    """
    y = np.asarray(y, dtype=bool)
    patients = np.asarray([str(p) for p in patients])
    if splits is None:
        folds = patient_folds(patients, y[:, None], k, seed)
        splits = [(np.setdiff1d(np.arange(len(y)), f), f) for f in folds]
    rng = np.random.default_rng(seed)
    points = []
    for n in sizes:
        values, used = [], []
        for pool, test in splits:
            if not _both_classes(y[test]):
                continue
            for _ in range(1 if n >= len(pool) else repeats):
                picked = pool if n >= len(pool) else _draw(pool, patients, y, n, rng)
                if picked is None:
                    continue
                head = fit_logistic(x[picked], y[picked], l2)
                values.append(auc(y[test], head.probabilities(x[test])))
                used.append(len(picked))
        if not values:
            continue
        v = np.array(values)
        lo, hi = np.quantile(v, [0.025, 0.975])
        points.append({"n_requested": int(n), "n_labelled_mean": round(float(np.mean(used)), 1),
                       "draws": len(v), "auc_mean": round(float(v.mean()), 4), "auc_std": round(float(v.std()), 4),
                       "auc_p2_5": round(float(lo), 4), "auc_p97_5": round(float(hi), 4)})
    return {
        "method": ("per size and split: random draws of whole patients from the training pool, conditioned on "
                   "both classes, L2 logistic regression, AUC on the split's held-out patients; mean, std and "
                   "2.5/97.5 percentiles over all draws"),
        "splits": len(splits), "repeats": repeats, "l2": l2, "seed": seed,
        "n_positive": int(y.sum()), "n": len(y), "points": points,
    }
