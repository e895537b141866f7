"""Operating thresholds chosen for a stated sensitivity or specificity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engines.evaluation.metrics import roc_curve


@dataclass(frozen=True)
class OperatingPoint:
    """"Positive if score >= threshold", with the sensitivity and specificity it achieves."""

    threshold: float
    sensitivity: float
    specificity: float
    rule: str

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "sensitivity": round(self.sensitivity, 4),
                "specificity": round(self.specificity, 4), "rule": self.rule}


def operating_point(labels: np.ndarray, scores: np.ndarray, sensitivity: float | None = None,
                    specificity: float | None = None) -> OperatingPoint:
    """The threshold on ``scores`` meeting exactly one target.

    For a target sensitivity: the highest threshold whose sensitivity is at least the target
    (the best specificity that keeps it). For a target specificity: the lowest threshold whose
    specificity is at least the target (the best sensitivity that keeps it).
    """
    if (sensitivity is None) == (specificity is None):
        raise ValueError("give exactly one of sensitivity and specificity")
    target = sensitivity if sensitivity is not None else specificity
    if not 0.0 < float(target) <= 1.0:  # type: ignore[arg-type]
        raise ValueError("the target must be in (0, 1]")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # drop the (inf) no-positive point
    if sensitivity is not None:
        best = int(np.flatnonzero(tpr >= sensitivity - 1e-12)[0])
        rule = f"highest threshold with sensitivity >= {sensitivity}"
    else:
        meets = np.flatnonzero(1.0 - fpr >= specificity - 1e-12)
        if len(meets) == 0:
            raise ValueError(f"no threshold reaches specificity {specificity}: the top score is shared by negatives")
        best = int(meets[-1])
        rule = f"lowest threshold with specificity >= {specificity}"
    return OperatingPoint(float(thresholds[best]), float(tpr[best]), float(1.0 - fpr[best]), rule)
