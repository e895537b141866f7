"""TensorRT backend: plan cache keys and paths, precision and profile, availability and ``auto``.

The real build/run/parity test needs the ``tensorrt`` package and an NVIDIA GPU; it is skipped
with the reason when either is missing. Everything around it is tested here without them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path

import pytest

from engines import BackendUnavailable, Bundle, BundleError, backends, load, plan_cache
from engines.backends import tensorrt

KEY = plan_cache.PlanKey(
    bundle_sha256="ab" * 32,
    tensorrt_version="10.7.0",
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    precision="fp16",
    min_shape=(1, 1, 128, 128),
    opt_shape=(16, 1, 128, 128),
    max_shape=(32, 1, 128, 128),
)


def test_plan_key_is_stable_and_changes_with_every_component() -> None:
    assert KEY.digest() == dataclasses.replace(KEY).digest()
    changes = {
        "bundle_sha256": "cd" * 32,
        "tensorrt_version": "10.8.0",
        "gpu_name": "NVIDIA L4",
        "compute_capability": "8.9",
        "precision": "fp32",
        "min_shape": (2, 1, 128, 128),
        "opt_shape": (8, 1, 128, 128),
        "max_shape": (64, 1, 128, 128),
    }
    assert set(changes) == {f.name for f in dataclasses.fields(KEY)}
    digests = {dataclasses.replace(KEY, **{name: value}).digest() for name, value in changes.items()}
    assert len(digests) == len(changes) and KEY.digest() not in digests


def test_plan_key_from_bundle(demo: Bundle) -> None:
    key = tensorrt.plan_key(demo, "10.7.0", "NVIDIA L4", (8, 9), max_batch=32)
    assert key.bundle_sha256 == demo.sha256
    assert key.compute_capability == "8.9"
    assert key.precision == "fp16"
    assert (key.min_shape, key.opt_shape, key.max_shape) == ((1, 1, 128, 128), (16, 1, 128, 128), (32, 1, 128, 128))


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PLEURA_TRT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert plan_cache.cache_dir() == tmp_path / "xdg" / "pleura" / "trt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert plan_cache.cache_dir() == Path.home() / ".cache" / "pleura" / "trt"
    monkeypatch.setenv("PLEURA_TRT_CACHE", str(tmp_path / "plans"))
    assert plan_cache.cache_dir() == tmp_path / "plans"
    assert plan_cache.plan_path(KEY) == tmp_path / "plans" / f"{KEY.digest()}.plan"


def test_plan_write_is_atomic_and_read_back(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    assert plan_cache.read(KEY, root) is None
    path = plan_cache.write(KEY, b"serialized plan", root)
    assert path == plan_cache.plan_path(KEY, root)
    assert plan_cache.read(KEY, root) == b"serialized plan"
    assert '"gpu_name": "NVIDIA H100 80GB HBM3"' in path.with_suffix(".json").read_text()
    assert sorted(p.name for p in root.iterdir()) == sorted([path.name, path.with_suffix(".json").name])
    assert plan_cache.read(dataclasses.replace(KEY, precision="fp32"), root) is None


def test_precision_follows_the_manifest_tolerances(demo: Bundle) -> None:
    assert tensorrt.precision_for(demo.manifest) == "fp16"
    tolerance = {"fp32": demo.manifest["parity"]["tolerance"]["fp32"]}
    assert tensorrt.precision_for({**demo.manifest, "parity": {"tolerance": tolerance}}) == "fp32"


def test_profile_shapes(demo: Bundle) -> None:
    assert tensorrt.profile_shapes(demo.manifest, 8, 4) == ((1, 1, 128, 128), (4, 1, 128, 128), (8, 1, 128, 128))
    assert tensorrt.profile_shapes(demo.manifest, 1)[1] == (1, 1, 128, 128)
    with pytest.raises(ValueError, match="max_batch"):
        tensorrt.profile_shapes(demo.manifest, 0)
    with pytest.raises(ValueError, match="opt_batch"):
        tensorrt.profile_shapes(demo.manifest, 8, 9)


def _pretend(monkeypatch: pytest.MonkeyPatch, tensorrt_installed: bool) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        if name == "tensorrt":
            return object() if tensorrt_installed else None
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_clear_error_without_tensorrt(demo: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend(monkeypatch, tensorrt_installed=False)
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed \(pip package 'tensorrt'"):
        backends.create("tensorrt", demo)


def test_clear_error_without_gpu(demo: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    _pretend(monkeypatch, tensorrt_installed=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        backends.create("tensorrt", demo)


def test_auto_skips_tensorrt_with_a_logged_reason(
    demo: Bundle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _pretend(monkeypatch, tensorrt_installed=False)
    assert "tensorrt" not in backends.auto_order(demo)
    with caplog.at_level(logging.INFO, logger="engines.runtime"):
        engine = load(demo)
    assert "tensorrt skipped: TensorRT is not installed" in caplog.text
    assert "tensorrt skipped: TensorRT is not installed" in engine.selection_reason
    assert engine.backend in caplog.text


def test_auto_order_puts_the_fastest_first(demo: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_only = {k: v for k, v in demo.manifest["parity"]["tolerance"].items() if k == "fp32"}
    fp32_bundle = dataclasses.replace(demo, manifest={**demo.manifest, "parity": {"tolerance": cpu_only}})
    monkeypatch.setattr(tensorrt, "unavailable_reason", lambda: None)
    for torch_cuda, ort_cuda, bundle, expected in [
        (True, True, demo, ["tensorrt", "torch", "onnxruntime"]),  # torch fp16 on the GPU
        (True, True, fp32_bundle, ["tensorrt", "onnxruntime", "torch"]),
        (True, False, fp32_bundle, ["tensorrt", "torch", "onnxruntime"]),
        (False, False, demo, ["tensorrt", "onnxruntime", "torch"]),
    ]:
        monkeypatch.setattr(backends, "_torch_has_cuda", lambda v=torch_cuda: v)
        monkeypatch.setattr(backends, "_ort_has_cuda", lambda v=ort_cuda: v)
        assert backends.auto_order(bundle) == expected


def test_tensorrt_build_run_and_parity(demo: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = tensorrt.unavailable_reason()
    if reason:
        pytest.skip(f"real TensorRT build/run/parity needs TensorRT and an NVIDIA GPU: {reason}")
    monkeypatch.setenv("PLEURA_TRT_CACHE", str(tmp_path))
    engine = load(demo, backend="tensorrt")  # builds the plan, then the parity gate
    assert engine.parity is not None and engine.parity.passed
    assert engine.artifact is not None and engine.artifact.is_file()
    again = load(demo, backend="tensorrt")
    assert again.artifact == engine.artifact
    assert again._backend.plan_from_cache  # type: ignore[attr-defined]


class _FakeTensorRT:
    """Just enough of the TensorRT 10 Python API to drive the build-and-cache path without a GPU."""

    __version__ = "10.0-fake"

    def __init__(self) -> None:
        self.builds: list[dict[str, object]] = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                pass

        class Config:
            def __init__(self) -> None:
                self.record: dict[str, object] = {"flags": []}
                fake.builds.append(self.record)

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                self.record["workspace"] = size

            def set_flag(self, flag: str) -> None:
                self.record["flags"].append(flag)  # type: ignore[union-attr]

            def add_optimization_profile(self, profile: dict[str, object]) -> None:
                self.record["profile"] = profile

        class Profile(dict):
            def set_shape(self, name: str, *shapes: tuple[int, ...]) -> None:
                self[name] = shapes

        class Builder:
            def __init__(self, logger: Logger) -> None:
                pass

            def create_network(self, flags: int) -> object:
                return object()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: object, config: Config) -> bytes:
                return b"fake plan"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network: object, logger: Logger) -> None:
                pass

            def parse(self, data: bytes) -> bool:
                return data.startswith(b"\x08")  # an ONNX ModelProto starts with ir_version, field 1

        class Engine:
            def create_execution_context(self) -> object:
                return object()

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                pass

            def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
                return Engine() if plan == b"fake plan" else None

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime
        self.NetworkDefinitionCreationFlag = type("Flags", (), {})  # TRT 10: no EXPLICIT_BATCH needed
        self.MemoryPoolType = type("Pools", (), {"WORKSPACE": "workspace"})
        self.BuilderFlag = type("BuilderFlags", (), {"FP16": "fp16"})


def test_plan_is_built_once_with_fp16_and_profile_then_cached(
    demo: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    import torch

    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tensorrt, "unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    messages: list[str] = []
    first = tensorrt.TensorRTBackend(demo, max_batch=8, cache_root=tmp_path, progress=messages.append)
    assert not first.plan_from_cache and first.precision == "fp16" and first.name == "tensorrt:Fake GPU:fp16"
    [build] = fake.builds
    assert build["flags"] == ["fp16"]
    assert build["profile"] == {"image": ((1, 1, 128, 128), (4, 1, 128, 128), (8, 1, 128, 128))}
    assert first.artifact.read_bytes() == b"fake plan" and first.artifact.parent == tmp_path
    assert "building TensorRT 10.0-fake plan (fp16, batch 1..8) for Fake GPU" in messages[0]
    second = tensorrt.TensorRTBackend(demo, max_batch=8, cache_root=tmp_path)
    assert second.plan_from_cache and second.artifact == first.artifact and len(fake.builds) == 1
    tensorrt.TensorRTBackend(demo, max_batch=16, cache_root=tmp_path)  # another profile: another plan
    assert len(fake.builds) == 2 and len(list(tmp_path.glob("*.plan"))) == 2
    first.artifact.write_bytes(b"corrupt")
    with pytest.raises(BundleError, match="cannot deserialize this plan; delete it to rebuild"):
        tensorrt.TensorRTBackend(demo, max_batch=8, cache_root=tmp_path)
