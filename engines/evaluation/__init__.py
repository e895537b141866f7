"""Evaluating a model on labelled images: ROC and AUC (:mod:`engines.evaluation.metrics`) and
patient-level cross-validation folds (:mod:`engines.evaluation.folds`)."""
