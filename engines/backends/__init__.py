"""Backends behind one interface (:class:`Backend`), and the order ``auto`` tries them in."""

from __future__ import annotations

import importlib.util

from engines.backends.base import Backend, BackendUnavailable, RawOutputs
from engines.bundle import Bundle

KINDS = ("onnxruntime", "torch")

__all__ = ["KINDS", "Backend", "BackendUnavailable", "RawOutputs", "auto_order", "create"]


def create(kind: str, bundle: Bundle) -> Backend:
    """A backend of ``kind`` (one of :data:`KINDS`) loaded with ``bundle``."""
    if kind == "onnxruntime":
        from engines.backends.ort import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle)
    if kind == "torch":
        from engines.backends.pytorch import TorchBackend

        return TorchBackend(bundle)
    raise ValueError(f"unknown backend {kind!r}; choose 'auto' or one of {', '.join(KINDS)}")


def auto_order() -> list[str]:
    """Backends in the order ``auto`` tries them: a GPU first, and ONNX Runtime before torch.

    ONNX Runtime (graph-optimized) is preferred on equal hardware; torch goes first only if it
    can reach a GPU that ONNX Runtime cannot.
    """
    if _ort_has_cuda() or not _torch_has_cuda():
        return ["onnxruntime", "torch"]
    return ["torch", "onnxruntime"]


def _ort_has_cuda() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _torch_has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()
