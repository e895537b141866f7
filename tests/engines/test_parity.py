"""Backends agree with each other and with the reference; the parity gate refuses tampering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines import Bundle, Engine, ParityError, load, load_bundle
from engines.backends import auto_order
from engines.parity import golden
from engines.pins import pin


def test_onnxruntime_and_torch_agree_on_golden_inputs(demo: Bundle, ort_engine: Engine, torch_engine: Engine) -> None:
    inputs, reference = golden(demo)
    a, b = ort_engine.infer(inputs), torch_engine.infer(inputs)
    for key in ("embeddings", "probabilities", "maps"):
        assert np.max(np.abs(getattr(a, key) - getattr(b, key))) < 1e-4, key
        assert np.max(np.abs(getattr(a, key) - reference[key])) < 1e-4, key
    # golden inputs exercise the letterbox: several shapes, none already square at input size
    assert len({x.shape for x in inputs}) == len(inputs) >= 4


def test_gate_reports_what_it_checked(ort_engine: Engine, torch_engine: Engine) -> None:
    for engine in (ort_engine, torch_engine):
        assert engine.parity is not None and engine.parity.passed
        assert engine.parity.backend == engine.backend and engine.parity.precision == "fp32"
        assert set(engine.parity.max_abs_diff) == {"embeddings", "probabilities", "maps"}
    assert ort_engine.backend == "onnxruntime:CPUExecutionProvider"
    assert torch_engine.backend == "torch:cpu"


def test_tampered_reference_is_refused(demo_copy: Path) -> None:
    path = demo_copy / "golden.npz"
    with np.load(path) as data:
        arrays = dict(data)
    arrays["probabilities"] = np.clip(arrays["probabilities"] + 0.05, 0, 1)
    np.savez_compressed(path, **arrays)
    pin(demo_copy)  # re-pinned: the parity gate is the line behind the pins
    with pytest.raises(ParityError) as info:
        load(load_bundle(demo_copy), backend="onnxruntime")
    message = str(info.value)
    assert "onnxruntime:CPUExecutionProvider" in message
    assert "probabilities max abs diff 0.05 EXCEEDS tolerance 0.0001" in message
    assert "must not be used" in message


def test_tampered_onnx_weights_are_refused(demo_copy: Path) -> None:
    path = demo_copy / "encoder.onnx"
    model = onnx.load(str(path))
    weights = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * 1.01, weights.name))
    onnx.save(model, str(path))
    pin(demo_copy)
    with pytest.raises(ParityError, match="onnxruntime:CPUExecutionProvider.*EXCEEDS tolerance"):
        load(demo_copy, backend="onnxruntime")
    assert load(demo_copy, backend="torch").parity.passed  # torch weights untouched


def test_auto_picks_a_backend_and_names_it(demo: Bundle) -> None:
    engine = load("demo")
    assert engine.backend.split(":")[0] == auto_order()[0]
    assert engine.bundle.sha256 == demo.sha256 and engine.parity.passed


def test_auto_falls_back_when_first_backend_fails(demo_copy: Path) -> None:
    path = demo_copy / "encoder.onnx"
    model = onnx.load(str(path))
    weights = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * 1.01, weights.name))
    onnx.save(model, str(path))
    pin(demo_copy)
    if auto_order()[0] != "onnxruntime":
        pytest.skip("auto prefers torch on this machine")
    assert load(demo_copy).backend == "torch:cpu"


def test_unknown_backend(demo: Bundle) -> None:
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        load(demo, backend="tensorflow")
