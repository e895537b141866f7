"""TensorRT backend: the bundle's ONNX graph compiled to a plan for this GPU, cached on disk.

Written against the TensorRT 10 Python API (named I/O tensors, ``execute_async_v3``). The plan
is built with an optimization profile for batch ``1..max_batch`` at the bundle's input size,
in fp16 when the manifest states an fp16 parity tolerance (else fp32), and cached under
:mod:`engines.plan_cache`. Buffers are torch CUDA tensors, so torch with CUDA is required too.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engines import plan_cache
from engines.backends.base import OUTPUT_NAMES, BackendUnavailable, RawOutputs
from engines.backends.ort import INPUT_NAME
from engines.bundle import Bundle, BundleError

log = logging.getLogger(__name__)

NOT_INSTALLED = "TensorRT is not installed (pip package 'tensorrt' with its CUDA libraries; only on NVIDIA GPUs)"
WORKSPACE_BYTES = 2 << 30


def precision_for(manifest: dict[str, Any]) -> str:
    """``"fp16"`` if the bundle states an fp16 parity tolerance (it allows fp16), else ``"fp32"``."""
    return "fp16" if "fp16" in manifest["parity"]["tolerance"] else "fp32"


def profile_shapes(manifest: dict[str, Any], max_batch: int, opt_batch: int | None = None) -> tuple[
    plan_cache.Shape, plan_cache.Shape, plan_cache.Shape
]:
    """(min, opt, max) input shapes: batch 1 / ``opt_batch`` (default ``max_batch // 2``) / ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    opt = opt_batch if opt_batch is not None else max(1, max_batch // 2)
    if not 1 <= opt <= max_batch:
        raise ValueError(f"opt_batch must lie in 1..{max_batch}, got {opt}")
    spec = manifest["input"]
    chw = (int(spec["channels"]), *(int(v) for v in spec["size"]))
    return (1, *chw), (opt, *chw), (max_batch, *chw)


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (library or GPU missing), or None if it may."""
    if importlib.util.find_spec("tensorrt") is None:
        return NOT_INSTALLED
    if importlib.util.find_spec("torch") is None:
        return "TensorRT needs torch with CUDA for its device buffers; torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False (TensorRT runs only on NVIDIA GPUs)"
    return None


def plan_key(bundle: Bundle, trt_version: str, gpu_name: str, capability: tuple[int, int], max_batch: int) -> (
    plan_cache.PlanKey
):
    """The cache key of ``bundle``'s plan for this TensorRT version, GPU and profile."""
    low, opt, high = profile_shapes(bundle.manifest, max_batch)
    return plan_cache.PlanKey(
        bundle_sha256=bundle.sha256,
        tensorrt_version=trt_version,
        gpu_name=gpu_name,
        compute_capability=f"{capability[0]}.{capability[1]}",
        precision=precision_for(bundle.manifest),
        min_shape=low,
        opt_shape=opt,
        max_shape=high,
    )


class TensorRTBackend:
    """Runs ``files.onnx`` as a TensorRT plan on the current CUDA device."""

    def __init__(
        self,
        bundle: Bundle,
        max_batch: int = 32,
        cache_root: Path | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        reason = unavailable_reason()
        if reason:
            raise BackendUnavailable(reason)
        try:
            import tensorrt as trt
        except ImportError as exc:  # present but its CUDA libraries are not
            raise BackendUnavailable(f"{NOT_INSTALLED}: import failed ({exc})") from exc
        import torch

        self._trt, self._torch = trt, torch
        self.max_batch = max_batch
        self.precision = precision_for(bundle.manifest)
        device = torch.cuda.current_device()
        key = plan_key(
            bundle, trt.__version__, torch.cuda.get_device_name(device),
            torch.cuda.get_device_capability(device), max_batch,
        )
        self._logger = trt.Logger(trt.Logger.WARNING)
        plan = plan_cache.read(key, cache_root)
        self.plan_from_cache = plan is not None
        if plan is None:
            say = progress or log.info
            say(f"building TensorRT {trt.__version__} plan ({self.precision}, batch 1..{max_batch}) "
                f"for {key.gpu_name}; this takes a while once per GPU and bundle")
            plan = self._build(bundle, key)
            plan_cache.write(key, plan, cache_root)
            say(f"TensorRT plan cached at {plan_cache.plan_path(key, cache_root)}")
        #: The plan file this backend runs (see :attr:`engines.runtime.Engine.artifact`).
        self.artifact = plan_cache.plan_path(key, cache_root)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise BundleError(f"{self.artifact}: TensorRT cannot deserialize this plan; delete it to rebuild")
        self._context = self._engine.create_execution_context()
        self.name = f"tensorrt:{key.gpu_name}:{self.precision}"

    def _build(self, bundle: Bundle, key: plan_cache.PlanKey) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # deprecated no-op in TRT 10
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        path = bundle.file("onnx")
        if not parser.parse(path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BundleError(f"{path}: TensorRT's ONNX parser rejects it ({errors})")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if key.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, key.min_shape, key.opt_shape, key.max_shape)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BundleError(f"{path}: TensorRT could not build a plan (see the TensorRT log above)")
        return bytes(serialized)

    def run(self, batch: np.ndarray) -> RawOutputs:
        parts = [self._run(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        return RawOutputs(*(np.concatenate(arrays) for arrays in zip(*parts, strict=True)))

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        torch, ctx = self._torch, self._context
        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).cuda()
        ctx.set_input_shape(INPUT_NAME, tuple(x.shape))
        ctx.set_tensor_address(INPUT_NAME, x.data_ptr())
        outputs = {}
        for name in OUTPUT_NAMES:
            outputs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=torch.float32, device=x.device)
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        stream.synchronize()
        return tuple(outputs[name].cpu().numpy() for name in OUTPUT_NAMES)
