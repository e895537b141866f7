"""Text to a query vector, for bundles that declare a text encoder in their manifest.

A bundle declares ``"text_encoder": {"kind": KIND, ...}``; :data:`TEXT_ENCODERS` maps each
kind Pleura can run to a function ``(bundle, text) -> (D,) vector`` in the bundle's image
embedding space. Bundles without one (the demo bundle) cannot be searched by text.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engines import Bundle
from worker.embeddings.search import SearchError
from worker.embeddings.vectors import unit

TEXT_ENCODERS: dict[str, Callable[[Bundle, str], np.ndarray]] = {}


class NoTextEncoder(SearchError):
    pass


def text_vector(bundle: Bundle, query: str) -> np.ndarray:
    """The unit query vector for ``query``, or :class:`NoTextEncoder` saying why there is none."""
    spec = bundle.manifest.get("text_encoder")
    if not spec:
        raise NoTextEncoder(f"bundle {bundle.name} {bundle.version} has no text encoder, so it cannot be "
                            "searched by text; use --like UID, or a bundle with a language-aligned text side")
    kind = spec.get("kind")
    encoder = TEXT_ENCODERS.get(kind)
    if encoder is None:
        raise NoTextEncoder(f"bundle {bundle.name} {bundle.version} declares a text encoder of kind {kind!r}, "
                            f"which this Pleura cannot run (known kinds: {', '.join(TEXT_ENCODERS) or 'none'})")
    return unit(encoder(bundle, query))
