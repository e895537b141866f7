"""Fold splitting and AUC/CI helpers of the demo cross-validation (synthetic data, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from engines.evaluation.folds import auc_summary, patient_folds
from engines.evaluation.metrics import auc, bootstrap_auc_ci


def _synthetic(n_patients: int = 120, seed: int = 1) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 4, n_patients)
    patients = [f"p{p}" for p, k in enumerate(per_patient) for _ in range(k)]
    strata = rng.random((len(patients), 3)) < [0.1, 0.2, 0.5]
    return patients, strata


def test_folds_are_disjoint_cover_everything_and_keep_patients_together() -> None:
    patients, strata = _synthetic()
    folds = patient_folds(patients, strata, 5, seed=0)
    assert len(folds) == 5
    joined = np.concatenate(folds)
    assert sorted(joined.tolist()) == list(range(len(patients)))  # disjoint and covering
    fold_of_patient: dict[str, int] = {}
    for k, fold in enumerate(folds):
        for i in fold:
            assert fold_of_patient.setdefault(patients[i], k) == k  # a patient lies in one fold
    sizes = [len({patients[i] for i in f}) for f in folds]
    assert max(sizes) - min(sizes) <= 1  # patients dealt evenly


def test_folds_are_stratified_and_seeded() -> None:
    patients = [str(i) for i in range(490)]
    rng = np.random.default_rng(3)
    strata = rng.random((490, 2)) < [0.09, 0.15]
    folds = patient_folds(patients, strata, 5, seed=0)
    for column in range(2):
        counts = [int(strata[f, column].sum()) for f in folds]
        assert max(counts) - min(counts) <= 2, counts
    again = patient_folds(patients, strata, 5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again, strict=True))
    other = patient_folds(patients, strata, 5, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(folds, other, strict=True))


def test_folds_reject_impossible_requests() -> None:
    with pytest.raises(ValueError):
        patient_folds(["a", "a", "b"], np.zeros((3, 1)), 3, seed=0)
    with pytest.raises(ValueError):
        patient_folds(["a", "b"], np.zeros((2, 1)), 1, seed=0)


def test_auc_and_bootstrap_ci() -> None:
    y = np.array([0, 0, 1, 1, 0, 1], bool)
    assert auc(y, np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])) == 1.0
    assert auc(y, -np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])) == 0.0
    assert auc(y, np.full(6, 0.5)) == 0.5  # ties count one half
    # 3 x 3 pairs: positive 0.25 beats negatives 0.2 and 0.1 but not 0.3 -> 8/9
    assert auc(y, np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.25])) == pytest.approx(8 / 9)
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.2
    scores = labels + rng.normal(0, 1.0, 400)
    value = auc(labels, scores)
    lo, hi = bootstrap_auc_ci(labels, scores, n=300, seed=0)
    assert lo < value < hi and hi - lo < 0.2
    summary = auc_summary(labels, scores, n_boot=300)
    assert summary["n"] == 400 and summary["n_positive"] == int(labels.sum())
    assert summary["auc"] == round(value, 4) and summary["auc_ci95"] == [round(lo, 4), round(hi, 4)]
