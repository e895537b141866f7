"""Zero-shot finding heads from precomputed text embeddings, for language-aligned encoders.

Each finding has a positive and a negative prompt embedding (unit vectors in the image-text
space; several prompts per side are averaged, then renormalized). With ``s`` the model's
logit scale and unit image vectors:

- ``clip``: logit = s * (cos(image, pos) - cos(image, neg)), so sigmoid(logit) is exactly the
  softmax over [pos, neg] of s * cosine (CLIP, Radford et al. 2021);
- ``elixr``: logit = s * (max over patch tokens of cos(token, pos) - max over patch tokens of
  cos(token, neg)) (ELIXR, Xu et al. 2023).

Maps, for both: s * (cos(token, pos) - cos(token, neg)) per patch token. The text tower is not
run at inference; :class:`ZeroShotHead` is the one implementation used by the torch backend
and exported into the ONNX graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

SCORINGS = ("clip", "elixr")


def prompt_embedding(vectors: Sequence[float] | Sequence[Sequence[float]] | np.ndarray, dim: int) -> np.ndarray:
    """One unit (dim,) float32 vector from one embedding or several (mean of unit vectors)."""
    array = np.asarray(vectors, dtype=np.float64)
    array = array[None] if array.ndim == 1 else array
    if array.ndim != 2 or array.shape[1] != dim or not array.shape[0]:
        raise ValueError(f"expected text embeddings of length {dim} (one or a list), got shape {array.shape}")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if not np.all(np.isfinite(array)) or np.any(norms == 0):
        raise ValueError("text embeddings must be finite and non-zero")
    mean = (array / norms).mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


class ZeroShotHead(nn.Module):
    """Positive/negative prompt scoring of unit image embeddings and unit patch tokens.

    Buffers ``positive`` and ``negative`` (F, E) hold unit prompt embeddings (see
    :func:`prompt_embedding`) and travel in the state dict.
    """

    positive: torch.Tensor
    negative: torch.Tensor

    def __init__(self, num_findings: int, embed_dim: int, scoring: str, logit_scale: float) -> None:
        super().__init__()
        if scoring not in SCORINGS:
            raise ValueError(f"unknown zero-shot scoring {scoring!r}; expected one of {', '.join(SCORINGS)}")
        self.scoring = scoring
        self.logit_scale = float(logit_scale)
        self.register_buffer("positive", torch.zeros(num_findings, embed_dim))
        self.register_buffer("negative", torch.zeros(num_findings, embed_dim))

    def forward(self, embedding: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, F) and per-token scores (N, L, F) from unit (N, E) and (N, L, E) vectors."""
        positive = patches @ self.positive.T
        negative = patches @ self.negative.T
        token_scores = self.logit_scale * (positive - negative)
        if self.scoring == "clip":
            logits = self.logit_scale * (embedding @ (self.positive - self.negative).T)
        else:
            logits = self.logit_scale * (positive.amax(dim=1) - negative.amax(dim=1))
        return logits, token_scores
