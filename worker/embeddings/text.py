"""Text to a query vector, for bundles with a text side (:mod:`engines.text`)."""

from __future__ import annotations

import numpy as np

from engines import Bundle, BundleError
from engines.text import text_encoder
from worker.embeddings.search import SearchError


class NoTextEncoder(SearchError):
    pass


def text_vector(bundle: Bundle, query: str) -> np.ndarray:
    """The unit query vector for ``query``, or :class:`NoTextEncoder` saying why there is none."""
    if not query.strip():
        raise SearchError("--text must not be empty")
    try:
        return text_encoder(bundle).encode([query])[0]
    except BundleError as exc:
        raise NoTextEncoder(str(exc)) from exc
