"""``engines.build``: prebuild an engine through the parity gate, warm it up, report progress."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from engines import Bundle, ParityError
from engines.build import _forwarded, build
from engines.pins import pin


def test_build_loads_gates_and_warms_up(demo: Bundle) -> None:
    messages: list[str] = []
    report = build(demo, backend="onnxruntime", progress=messages.append, warmup_batches=(1, 3))
    assert report.backend.startswith("onnxruntime:")
    assert (report.bundle, report.version, report.bundle_sha256) == (demo.name, demo.version, demo.sha256)
    assert report.parity.passed and report.precision == "fp32"
    assert report.artifact is None  # no plan file outside TensorRT
    assert set(report.warmup_ms) == {1, 3} and all(ms > 0 for ms in report.warmup_ms.values())
    assert "parity gate" in messages[0] and messages[-1].startswith("warm-up 2/2: batch 3")
    text = report.describe()
    assert "parity PASSED" in text and "requested" in text and report.backend in text


def test_build_by_name_with_auto_says_why(demo: Bundle) -> None:
    report = build("demo", warmup_batches=(1,))
    assert "parity gate" in report.selection_reason
    assert report.bundle_sha256 == demo.sha256


def test_build_refuses_a_bundle_that_fails_parity(demo_copy: Path) -> None:
    golden = demo_copy / "golden.npz"
    with np.load(golden) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["probabilities"] = arrays["probabilities"] + 0.1
    np.savez(golden, **arrays)
    pin(demo_copy)
    with pytest.raises(ParityError, match="fails the parity gate"):
        build(demo_copy, backend="onnxruntime", warmup_batches=(1,))


def test_tensorrt_plan_progress_reaches_the_callback() -> None:
    messages: list[str] = []
    with _forwarded(messages.append):
        logging.getLogger("engines.backends.tensorrt").info("building TensorRT plan")
    logging.getLogger("engines.backends.tensorrt").info("not forwarded any more")
    assert messages == ["building TensorRT plan"]
