"""Writing bundles from a torch module (``engines.importers.writer``)."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import engines
from engines.architectures import build
from engines.importers.writer import FILES, synthetic_inputs, write_bundle

ARCH = {"name": "cam_cnn", "widths": [8, 16, 16]}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    manifest = copy.deepcopy(engines.load_bundle("demo").manifest)
    for key in ("files", "training", "evaluation"):
        del manifest[key]
    manifest.update(name="tiny", architecture=ARCH, outputs={**manifest["outputs"], "embedding_dim": 16})
    manifest["outputs"]["map"] = {**manifest["outputs"]["map"], "feature_stride": 4}
    torch.manual_seed(0)
    model = build(ARCH, num_findings=len(manifest["findings"])).eval()
    out = tmp_path_factory.mktemp("writer") / "tiny"
    assert write_bundle(out, model=model, manifest=manifest) == out
    return out, model


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_written_bundle_passes_parity_gate(written: tuple[Path, torch.nn.Module], backend: str) -> None:
    engine = engines.load(written[0], backend)
    assert engine.parity is not None and engine.parity.passed


def test_files_hashes_and_golden_inputs(written: tuple[Path, torch.nn.Module]) -> None:
    out, model = written
    bundle = engines.load_bundle(out)
    assert bundle.manifest["files"] == FILES
    assert set(bundle.manifest["pins"]) == set(FILES.values()) and bundle.pinned
    for name, digest in bundle.manifest["pins"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    with np.load(bundle.file("golden")) as golden:
        for i, image in enumerate(synthetic_inputs()):
            np.testing.assert_array_equal(golden[f"input_{i}"], image)
        assert golden["probabilities"].shape == (3, len(bundle.findings))
    state = torch.load(bundle.file("torch_state_dict"), weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    card = bundle.file("model_card").read_text()
    assert "# tiny 0.1.0" in card and "Not validated here" in card and "Cardiomegaly" in card


def test_synthetic_inputs_are_seeded_non_patient_arrays() -> None:
    first, second = synthetic_inputs(3), synthetic_inputs(3)
    assert [a.shape for a in first] == [(97, 211), (64, 64), (300, 120)]
    assert all(
        np.array_equal(a, b) and a.dtype == np.float32 and 0 <= a.min() <= a.max() <= 1
        for a, b in zip(first, second, strict=True)
    )
