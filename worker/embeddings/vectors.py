"""Embedding vectors as the archive keeps them: unit-length float32, as bytes or pgvector text."""

from __future__ import annotations

import numpy as np


def unit(vector: np.ndarray) -> np.ndarray:
    """``vector`` as float32 scaled to length 1 (a zero vector stays zero), so cosine = dot."""
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ValueError("embedding has non-finite values")
    norm = np.linalg.norm(v)
    return (v / norm if norm > 0 else v).astype(np.float32)


def from_bytes(data: bytes, dim: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32, count=dim)


def matrix(blobs: list[bytes], dim: int) -> np.ndarray:
    """(len(blobs), dim) float32 from stored vectors, in one copy."""
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)


def pgvector_literal(vector: np.ndarray) -> str:
    """pgvector's text input form, ``[x1,x2,...]``, exact for float32."""
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"
