"""Serving embedding heads from a bundle manifest's ``heads`` list.

Each entry is ``{"name", "code": {value, scheme, meaning}, "head": <pleura.head/1 document>}``:
the engine reports ``name`` with probability ``sigmoid(embedding . weights + bias)`` after the
encoder's own findings, at the head's threshold, without a localization map; a head whose
``input`` is ``"unit_embedding"`` (trained on the ledger's archived, unit-length vectors) reads
the embedding scaled to unit length. A head is valid
only for the encoder it was trained on: ``head.bundle.encoder_sha256`` must equal the bundle's
:attr:`engines.bundle.Bundle.encoder_sha256`, else the bundle is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.heads.headfile import HEAD_SCHEMA


@dataclass(frozen=True)
class ServedHead:
    """One head of a bundle: the reported finding name and its logistic weights."""

    name: str
    weights: np.ndarray  # (D,) float64
    bias: float
    unit: bool  # the head reads the embedding scaled to unit length (``"input": "unit_embedding"``)


def check_heads(items: Any, encoder_sha256: str, embedding_dim: int) -> list[str]:
    """Problems with a manifest's ``heads`` list (empty when it is valid)."""
    if not isinstance(items, list):
        return ["heads must be a list"]
    problems = []
    for i, item in enumerate(items):
        head = item.get("head") if isinstance(item, dict) else None
        if not isinstance(head, dict) or head.get("schema") != HEAD_SCHEMA:
            problems.append(f"heads[{i}].head must be a {HEAD_SCHEMA} document")
            continue
        if not isinstance(item.get("name"), str) or not isinstance(item.get("code"), dict):
            problems.append(f"heads[{i}] needs a finding name and a code")
        if head.get("input") not in ("embedding", "unit_embedding"):
            problems.append(f"heads[{i}].head.input must be 'embedding' or 'unit_embedding'")
        if len(head.get("weights", [])) != embedding_dim:
            problems.append(f"heads[{i}] has {len(head.get('weights', []))} weights for embedding_dim {embedding_dim}")
        recorded = head.get("bundle", {}).get("encoder_sha256")
        if recorded != encoder_sha256:
            problems.append(f"heads[{i}] ({item.get('name')!r}) was trained on encoder {str(recorded)[:12]}, "
                            f"this bundle's encoder is {encoder_sha256[:12]}; retrain the head on this encoder")
    return problems


def served_heads(items: list[dict[str, Any]]) -> tuple[ServedHead, ...]:
    """The heads of a checked ``heads`` list, in order."""
    return tuple(ServedHead(item["name"], np.asarray(item["head"]["weights"], dtype=np.float64),
                            float(item["head"]["bias"]), item["head"]["input"] == "unit_embedding")
                 for item in items)


def apply_heads(heads: tuple[ServedHead, ...], embeddings: np.ndarray) -> np.ndarray:
    """(N, H) float32 probabilities of ``heads`` on (N, D) embeddings."""
    if not heads:
        return np.zeros((len(embeddings), 0), np.float32)
    x = embeddings.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms > 0, norms, 1.0)
    logits = np.stack([(unit if h.unit else x) @ h.weights + h.bias for h in heads], axis=1)
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
