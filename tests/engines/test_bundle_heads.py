"""Bundles with embedding heads: loaded after the encoder's findings, served, and refused when
trained on another encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engines import Bundle, BundleError, load, load_bundle
from engines.heads import HEAD_SCHEMA
from engines.parity import golden
from engines.pins import pin


def _add_head(path: Path, demo: Bundle, encoder_sha256: str, weights: np.ndarray, bias: float) -> None:
    """Give the bundle copy at ``path`` one unit-embedding head and golden probabilities to match."""
    manifest = json.loads((path / "manifest.json").read_text())
    head = {"schema": HEAD_SCHEMA, "finding": "Effusion", "input": "unit_embedding",
            "embedding_dim": len(weights), "weights": weights.tolist(), "bias": bias, "threshold": 0.4,
            "bundle": {"name": demo.name, "version": demo.version, "model_sha256": demo.model_sha256,
                       "encoder_sha256": encoder_sha256}}
    manifest["heads"] = [{"name": "Effusion (head)", "code": {"value": "60046008", "scheme": "SCT",
                                                              "meaning": "Pleural effusion"}, "head": head}]
    manifest["version"] = "0.1.0+head.Effusion.1"
    (path / "manifest.json").write_text(json.dumps(manifest))
    inputs, ref = golden(demo)
    unit = ref["embeddings"] / np.linalg.norm(ref["embeddings"], axis=1, keepdims=True)
    column = 1 / (1 + np.exp(-(unit.astype(np.float64) @ weights + bias)))
    ref["probabilities"] = np.concatenate([ref["probabilities"], column[:, None].astype(np.float32)], axis=1)
    np.savez(path / "golden.npz", **{f"input_{i}": x for i, x in enumerate(inputs)}, **ref)
    pin(path)


def test_head_is_served_after_the_encoder_findings(demo: Bundle, demo_copy: Path) -> None:
    rng = np.random.default_rng(0)
    weights, bias = rng.normal(size=demo.manifest["outputs"]["embedding_dim"]) * 3, -0.2
    _add_head(demo_copy, demo, demo.encoder_sha256, weights, bias)
    bundle = load_bundle(demo_copy)
    assert bundle.encoder_sha256 == demo.encoder_sha256 and bundle.model_sha256 != demo.model_sha256
    assert bundle.findings == demo.findings
    assert [f.name for f in bundle.head_findings] == ["Effusion (head)"]
    assert bundle.head_findings[0].threshold == 0.4 and bundle.head_findings[0].code_value == "60046008"

    engine = load(bundle, backend="onnxruntime")  # the parity gate covers the head's column too
    inputs, _ = golden(demo)
    out = engine.infer(inputs)
    n = len(demo.findings)
    assert out.findings == (*(f.name for f in demo.findings), "Effusion (head)")
    assert out.probabilities.shape == (len(inputs), n + 1) and out.maps.shape[1] == n
    unit = out.embeddings / np.linalg.norm(out.embeddings, axis=1, keepdims=True)
    expected = 1 / (1 + np.exp(-(unit.astype(np.float64) @ weights + bias)))
    np.testing.assert_allclose(out.probabilities[:, n], expected, atol=1e-5)
    assert len(set(np.round(out.probabilities[:, n], 4))) > 1  # varies with the image
    assert out.heatmap(0, n) is None and out.heatmap(0, 0) is not None


def test_head_of_another_encoder_is_refused(demo: Bundle, demo_copy: Path) -> None:
    weights = np.zeros(demo.manifest["outputs"]["embedding_dim"])
    _add_head(demo_copy, demo, "0" * 64, weights, 0.0)
    with pytest.raises(BundleError, match="retrain the head on this encoder"):
        load_bundle(demo_copy)


def test_changed_encoder_weights_change_the_encoder_identity(demo: Bundle, demo_copy: Path) -> None:
    weights = np.zeros(demo.manifest["outputs"]["embedding_dim"])
    _add_head(demo_copy, demo, demo.encoder_sha256, weights, 0.0)
    onnx = demo_copy / demo.manifest["files"]["onnx"]
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    pin(demo_copy)
    with pytest.raises(BundleError, match="was trained on encoder"):
        load_bundle(demo_copy)
