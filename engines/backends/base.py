"""The one interface every backend implements: a normalized batch in, raw model outputs out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

#: The output tensors of every model graph (ONNX, TensorRT, torch), in this order.
OUTPUT_NAMES = ("embedding", "logits", "cam")


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (library missing, no device)."""


@dataclass(frozen=True)
class RawOutputs:
    """What a model returns for a batch, as float32 arrays (see :mod:`engines.architectures`)."""

    embedding: np.ndarray  # (N, D)
    logits: np.ndarray  # (N, F)
    cam: np.ndarray  # (N, F, h, w)


class Backend(Protocol):
    """A loaded model on one runtime and device."""

    #: What runs, e.g. ``"onnxruntime:CPUExecutionProvider"`` or ``"torch:cuda:fp16"``.
    name: str
    #: ``"fp32"`` or ``"fp16"``: picks the parity tolerance.
    precision: str

    def run(self, batch: np.ndarray) -> RawOutputs:
        """Outputs for an (N, 1, H, W) float32 batch already preprocessed."""
        ...
