"""ONNX Runtime backend: the bundle's ONNX graph, on the CUDA execution provider if present."""

from __future__ import annotations

import numpy as np

from engines.backends.base import OUTPUT_NAMES, BackendUnavailable, RawOutputs
from engines.bundle import Bundle, BundleError

INPUT_NAME = "image"


class OnnxRuntimeBackend:
    """Runs ``files.onnx`` with ONNX Runtime (CUDA EP when available, else CPU), in fp32."""

    precision = "fp32"

    def __init__(self, bundle: Bundle) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("onnxruntime is not installed") from exc
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = bundle.file("onnx")
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise BundleError(f"{path}: ONNX Runtime cannot load it ({exc})") from exc
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= set(outputs):
            raise BundleError(
                f"{path}: graph has inputs {inputs} and outputs {outputs}; "
                f"expected input {INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}"
            )
        self.name = f"onnxruntime:{self._session.get_providers()[0]}"

    def run(self, batch: np.ndarray) -> RawOutputs:
        embedding, logits, cam = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        return RawOutputs(embedding=embedding, logits=logits, cam=cam)
