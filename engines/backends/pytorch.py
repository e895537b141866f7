"""PyTorch backend: the architecture rebuilt from the manifest with the bundle's state dict.

On CUDA it runs in fp16 when the bundle states an fp16 parity tolerance (a bundle allows a
precision only by saying how close that precision must come to the reference), else fp32.
"""

from __future__ import annotations

import pickle

import numpy as np

from engines.backends.base import BackendUnavailable, RawOutputs
from engines.bundle import Bundle, BundleError


class TorchBackend:
    """Runs the bundle's ``files.torch_state_dict`` on CUDA if available, else on the CPU."""

    def __init__(self, bundle: Bundle, device: str | None = None) -> None:
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailable("torch is not installed") from exc
        from engines.architectures import build

        if "torch_state_dict" not in bundle.manifest["files"]:
            raise BackendUnavailable(f"bundle {bundle.name!r} ships no torch_state_dict")
        self._torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        fp16 = self.device.type == "cuda" and "fp16" in bundle.manifest["parity"]["tolerance"]
        self.precision = "fp16" if fp16 else "fp32"
        self._dtype = torch.float16 if fp16 else torch.float32
        model = build(bundle.manifest["architecture"], num_findings=len(bundle.findings))
        path = bundle.file("torch_state_dict")
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as exc:
            raise BundleError(f"{path}: not a state dict for {bundle.manifest['architecture']} ({exc})") from exc
        self._model = model.eval().to(self.device, self._dtype)
        self.name = f"torch:{self.device.type}" + (":fp16" if fp16 else "")

    def run(self, batch: np.ndarray) -> RawOutputs:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, self._dtype)
            embedding, logits, cam = (t.float().cpu().numpy() for t in self._model(x))
        return RawOutputs(embedding=embedding, logits=logits, cam=cam)
