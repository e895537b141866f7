"""Patient-level cross-validation folds and the AUC summary each fold's scores are reported with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engines.evaluation.metrics import auc, bootstrap_auc_ci


def patient_folds(patients: Sequence[str], strata: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Stratified patient-level k-fold split: the sorted image indices of each of ``k`` folds.

    ``patients`` gives each image's patient, ``strata`` (N, S) each image's binary stratum
    labels. All images of a patient go to the same fold; a patient's stratum is the union of
    its images' labels. Patients are shuffled (seeded), ordered by stratum and dealt to the
    folds in turn, so each stratum is spread as evenly as the counts allow.
    """
    patients = [str(p) for p in patients]
    strata = np.asarray(strata, dtype=bool).reshape(len(patients), -1)
    if k < 2:
        raise ValueError("need at least 2 folds")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        groups.setdefault(p, []).append(i)
    if len(groups) < k:
        raise ValueError(f"{len(groups)} patients cannot fill {k} folds")
    names = list(groups)
    keys = np.array([strata[groups[p]].any(axis=0) @ (2 ** np.arange(strata.shape[1])) for p in names])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    order = order[np.argsort(keys[order], kind="stable")]
    offset = int(rng.integers(k))
    folds: list[list[int]] = [[] for _ in range(k)]
    for position, g in enumerate(order):
        folds[(position + offset) % k].extend(groups[names[g]])
    return [np.array(sorted(f), dtype=np.int64) for f in folds]


def auc_summary(labels: np.ndarray, scores: np.ndarray, seed: int = 0, n_boot: int = 2000) -> dict[str, Any]:
    """AUC with its percentile-bootstrap 95% CI and the class counts."""
    y = np.asarray(labels, dtype=bool)
    lo, hi = bootstrap_auc_ci(y, scores, n=n_boot, seed=seed)
    return {
        "n_positive": int(y.sum()),
        "n": len(y),
        "auc": round(auc(y, scores), 4),
        "auc_ci95": [round(lo, 4), round(hi, 4)],
    }
