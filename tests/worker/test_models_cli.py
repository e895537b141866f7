"""`pleura models verify/list`: the parity gate as an operator runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines.bundle import BUILTIN_DIR

PLEURA = str(Path(sys.executable).with_name("pleura"))


def pleura(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PLEURA_DATA_DIR": str(data_dir)}
    return subprocess.run([PLEURA, *args], capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_demo_passes_the_parity_gate(backend: str, tmp_path: Path) -> None:
    done = pleura("models", "verify", "demo", "--backend", backend, data_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "parity PASSED" in done.stdout and backend in done.stdout


def test_modified_onnx_fails_with_a_clear_message(tmp_path: Path) -> None:
    bundle = shutil.copytree(BUILTIN_DIR / "demo", tmp_path / "models" / "tampered")
    model = onnx.load(bundle / "encoder.onnx")
    weights = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(weights).copy()
    values.flat[: values.size // 10] *= 1.5
    weights.CopyFrom(numpy_helper.from_array(values, weights.name))
    onnx.save(model, bundle / "encoder.onnx")
    done = pleura("models", "verify", "tampered", "--backend", "onnxruntime", data_dir=tmp_path)
    assert done.returncode == 1
    assert "fails the parity gate" in done.stderr and "EXCEEDS tolerance" in done.stderr


def test_modified_golden_output_fails_on_every_backend(tmp_path: Path) -> None:
    bundle = shutil.copytree(BUILTIN_DIR / "demo", tmp_path / "models" / "tampered")
    with np.load(bundle / "golden.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["probabilities"] = arrays["probabilities"] + 0.01
    np.savez(bundle / "golden.npz", **arrays)
    done = pleura("models", "verify", "tampered", data_dir=tmp_path)
    assert done.returncode == 1
    assert "onnxruntime" in done.stderr and "torch" in done.stderr and "EXCEEDS tolerance" in done.stderr


def test_list_shows_builtin_and_installed(tmp_path: Path) -> None:
    shutil.copytree(BUILTIN_DIR / "demo", tmp_path / "models" / "copy")
    done = pleura("models", "list", "--json", data_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["name"], r["origin"]) for r in rows] == [("demo", "built-in"), ("demo", "installed")]
    assert rows[0]["findings"] == ["Cardiomegaly", "Effusion", "Atelectasis", "Abnormal"]
