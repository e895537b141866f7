"""Head files: a trained head as JSON, tied to the bundle whose embeddings it reads.

The document is self-contained so a bundle manifest can later carry it verbatim, e.g. as an
entry of a ``heads`` list (or as a finding with ``"head": {...}``): ``weights``/``bias`` apply
to the bundle's ``outputs.embedding`` exactly as the engine returns it, ``threshold`` is the
operating point, and ``bundle.encoder_sha256`` pins the encoder the weights are valid for
(:attr:`engines.bundle.Bundle.encoder_sha256`; a bundle carrying the head is refused otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from engines.heads.logistic import LogisticHead

HEAD_SCHEMA = "pleura.head/1"


def head_document(finding: str, head: LogisticHead, threshold: dict[str, Any], bundle: dict[str, str],
                  training: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready head: finding, model, operating point, encoder identity and training summary.

    ``bundle`` holds ``name``, ``version``, ``model_sha256`` and ``encoder_sha256`` of the encoder bundle.
    """
    return {
        "schema": HEAD_SCHEMA,
        "finding": finding,
        "model": "logistic_regression",
        "input": "embedding",
        "embedding_dim": len(head.weights),
        "weights": [float(w) for w in head.weights],
        "bias": float(head.bias),
        "probability": "sigmoid(embedding . weights + bias)",
        "threshold": float(threshold["threshold"]),
        "threshold_rule": threshold["rule"],
        "bundle": {key: bundle[key] for key in ("name", "version", "model_sha256", "encoder_sha256")},
        "training": training,
    }


def read_head(path: Path) -> dict[str, Any]:
    """Load and check a head file."""
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != HEAD_SCHEMA:
        raise ValueError(f"{path}: not a {HEAD_SCHEMA} head file")
    if len(doc["weights"]) != doc["embedding_dim"]:
        raise ValueError(f"{path}: {len(doc['weights'])} weights for embedding_dim {doc['embedding_dim']}")
    return doc


def head_probabilities(doc: dict[str, Any], embeddings: np.ndarray) -> np.ndarray:
    """The head's probabilities for (N, D) embeddings of its bundle."""
    return LogisticHead(np.asarray(doc["weights"], dtype=np.float64), float(doc["bias"])).probabilities(embeddings)
