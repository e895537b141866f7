"""Head math on synthetic data: logistic fit, patient-level CV, thresholds, learning curve."""

from __future__ import annotations

import numpy as np
import pytest

from engines.evaluation.metrics import auc
from engines.heads import cross_validate, fit_logistic, learning_curve, operating_point


def _data(n: int, separation: float, seed: int = 0, per_patient: int = 3):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    x = rng.normal(size=(n, 20))
    x[:, 0] += separation * y
    patients = [f"p{i // per_patient}" for i in range(n)]
    return x * 0.05 + 3.0, y, patients  # off-centre, small-scale features: standardisation must cope


def test_separable_data_gives_auc_near_one() -> None:
    x, y, patients = _data(300, separation=8.0)
    cv = cross_validate(x, y, patients, k=5)
    assert cv.summary(y, n_boot=200)["auc"] > 0.99
    assert auc(y, fit_logistic(x, y).probabilities(x)) > 0.99


def test_unrelated_labels_give_auc_near_half() -> None:
    x, y, patients = _data(600, separation=0.0)
    summary = cross_validate(x, y, patients, k=5).summary(y, n_boot=300)
    assert 0.4 < summary["auc"] < 0.6
    assert summary["auc_ci95"][0] < 0.5 < summary["auc_ci95"][1]


def test_fit_matches_the_optimality_condition_and_folds_standardisation_into_weights() -> None:
    x, y, _ = _data(200, separation=1.5)
    head = fit_logistic(x, y, l2=2.0)
    # at the optimum, the gradient of sum(log-loss) + l2/2 |w_std|^2 vanishes in standardised coordinates
    mean, scale = x.mean(axis=0), x.std(axis=0)
    w_std = head.weights * scale
    grad = ((x - mean) / scale).T @ (head.probabilities(x) - y) + 2.0 * w_std
    assert np.abs(grad).max() < 1e-5
    assert abs(np.sum(head.probabilities(x) - y)) < 1e-5  # unpenalised bias: mean probability = prevalence
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(x, np.zeros(len(x)))


def test_folds_share_no_patient_and_cover_every_image_once() -> None:
    x, y, patients = _data(150, separation=2.0, per_patient=4)
    cv = cross_validate(x, y, patients, k=5, seed=3)
    seen = np.concatenate(cv.folds)
    assert sorted(seen.tolist()) == list(range(len(y)))
    fold_patients = [{patients[i] for i in f} for f in cv.folds]
    for a in range(len(fold_patients)):
        for b in range(a + 1, len(fold_patients)):
            assert not fold_patients[a] & fold_patients[b]
    assert not np.isnan(cv.scores).any()


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_meets_the_target_sensitivity(target: float) -> None:
    x, y, patients = _data(300, separation=1.0)
    scores = fit_logistic(x, y).probabilities(x)
    point = operating_point(y, scores, sensitivity=target)
    predicted = scores >= point.threshold
    assert predicted[y].mean() >= target
    assert point.sensitivity == pytest.approx(predicted[y].mean())
    assert point.specificity == pytest.approx((~predicted[~y]).mean())
    # the highest such threshold: the next higher score loses sensitivity below the target
    higher = scores[scores > point.threshold]
    if len(higher):
        assert (scores[y] >= higher.min()).mean() < target


def test_threshold_meets_the_target_specificity() -> None:
    x, y, _ = _data(300, separation=1.0)
    scores = fit_logistic(x, y).probabilities(x)
    point = operating_point(y, scores, specificity=0.9)
    predicted = scores >= point.threshold
    assert (~predicted[~y]).mean() >= 0.9
    lower = scores[scores < point.threshold]
    assert (scores[~y] < lower.max()).mean() < 0.9
    with pytest.raises(ValueError, match="exactly one"):
        operating_point(y, scores)


def test_learning_curve_rises_with_labelled_examples() -> None:
    x, y, patients = _data(400, separation=1.2)
    curve = learning_curve(x, y, patients, sizes=[10, 40, 10**9], repeats=6, k=4, seed=1)
    points = curve["points"]
    assert [p["n_requested"] for p in points] == [10, 40, 10**9]
    assert points[0]["draws"] == 4 * 6 and points[-1]["draws"] == 4  # "all" is drawn once per split
    assert points[0]["n_labelled_mean"] == pytest.approx(10, abs=3)  # whole patients of 3 images
    assert points[0]["auc_mean"] < points[-1]["auc_mean"]
    assert points[-1]["auc_mean"] > 0.75
    for p in points:
        assert p["auc_p2_5"] <= p["auc_mean"] <= p["auc_p97_5"]
