"""Data-efficient heads on a bundle's embeddings: logistic regression, patient-level
cross-validation, operating thresholds, learning curves and head files (numpy only;
plots need matplotlib)."""

from engines.heads.crossval import CrossValidation, cross_validate, learning_curve
from engines.heads.headfile import HEAD_SCHEMA, head_document, head_probabilities, read_head
from engines.heads.logistic import LogisticHead, fit_logistic
from engines.heads.threshold import OperatingPoint, operating_point

__all__ = [
    "HEAD_SCHEMA",
    "CrossValidation",
    "LogisticHead",
    "OperatingPoint",
    "cross_validate",
    "fit_logistic",
    "head_document",
    "head_probabilities",
    "learning_curve",
    "operating_point",
    "read_head",
]
