"""Backends behind one interface (:class:`Backend`), and the order ``auto`` tries them in."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from engines.backends.base import Backend, BackendUnavailable, RawOutputs
from engines.bundle import Bundle

KINDS = ("tensorrt", "onnxruntime", "torch")

__all__ = ["KINDS", "Backend", "BackendUnavailable", "RawOutputs", "auto_order", "create", "skipped_by_auto"]


def create(kind: str, bundle: Bundle) -> Backend:
    """A backend of ``kind`` (one of :data:`KINDS`) loaded with ``bundle``."""
    if kind == "tensorrt":
        from engines.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(bundle)
    if kind == "onnxruntime":
        from engines.backends.ort import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle)
    if kind == "torch":
        from engines.backends.pytorch import TorchBackend

        return TorchBackend(bundle)
    raise ValueError(f"unknown backend {kind!r}; choose 'auto' or one of {', '.join(KINDS)}")


def auto_order(bundle: Bundle | None = None) -> list[str]:
    """Backends ``auto`` tries, fastest first: TensorRT, then GPU backends, then ONNX Runtime on CPU.

    TensorRT comes first when it can run here (see :func:`skipped_by_auto`). Then torch on CUDA
    if the bundle allows fp16 (it then runs in fp16), else ONNX Runtime, which is preferred on
    equal hardware (graph-optimized); torch goes before it only if it reaches a GPU that ONNX
    Runtime cannot.
    """
    order = [] if "tensorrt" in skipped_by_auto() else ["tensorrt"]
    torch_cuda, ort_cuda = _torch_has_cuda(), _ort_has_cuda()
    fp16 = bundle is not None and "fp16" in bundle.manifest["parity"]["tolerance"]
    if torch_cuda and (fp16 or not ort_cuda):
        return [*order, "torch", "onnxruntime"]
    return [*order, "onnxruntime", "torch"]


def skipped_by_auto() -> dict[str, str]:
    """Backends ``auto`` does not try here, with the reason (TensorRT without its library or a GPU)."""
    from engines.backends.tensorrt import unavailable_reason

    reason = unavailable_reason()
    return {"tensorrt": reason} if reason else {}


def _ort_has_cuda() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _torch_has_cuda() -> bool:
    """Whether torch reaches a CUDA device; a CPU-only build is told from its version file, without the
    2 s of importing torch on a small CPU host (``pleura serve`` starts up to recover work at once)."""
    spec = importlib.util.find_spec("torch")
    if spec is None:
        return False
    for folder in spec.submodule_search_locations or []:
        version = Path(folder) / "version.py"
        if version.is_file() and re.search(r"^cuda\s*(:\s*[^=]+)?=\s*None\s*$", version.read_text(), re.M):
            return False
    import torch

    return torch.cuda.is_available()
