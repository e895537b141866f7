"""Site heads: labelled image sets and their embeddings (:mod:`worker.heads.labelled`), and new bundle
versions carrying a trained or zero-shot head (:mod:`worker.heads.versions`)."""
