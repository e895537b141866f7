"""DINOv2 importer: a tiny random-weight ``transformers.Dinov2Model`` saved as upstream files.

The checkpoint is written with ``save_pretrained`` (``config.json`` + ``model.safetensors``,
Hugging Face key names) beside a ``preprocessor_config.json`` asking for a larger input than
the config's image size, so the position embeddings are interpolated. The imported bundle must
pass the parity gate on both backends and match the ``transformers`` forward pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engines import ParityError, load
from engines.importers import import_model
from engines.pins import pin

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SIZE = 64
MEAN, STD = [0.53, 0.5, 0.47], [0.26, 0.25, 0.27]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, dict[str, np.ndarray]]:
    """A random tiny DINOv2 in upstream format, its transformers model, and a heads file."""
    directory = tmp_path_factory.mktemp("rad-dino-tiny")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, patch_size=8, image_size=32, layerscale_value=0.7
    )
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(directory)
    processor = {
        "do_center_crop": True,
        "crop_size": {"height": SIZE, "width": SIZE},
        "size": {"shortest_edge": SIZE},
        "image_mean": MEAN,
        "image_std": STD,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    rng = np.random.default_rng(0)
    heads = {
        "names": np.array(["Effusion", "Cardiomegaly"]),
        "weights": rng.normal(0, 0.3, (2, 48)).astype(np.float32),
        "bias": np.array([0.1, -0.2], np.float32),
        "thresholds": np.array([0.4, 0.6]),
        "code_values": np.array(["60046008", "8186001"]),
        "code_schemes": np.array(["SCT", "SCT"]),
        "code_meanings": np.array(["Pleural effusion", "Cardiomegaly"]),
    }
    np.savez(directory / "heads.npz", **heads)
    return directory, model, heads


@pytest.fixture(scope="module")
def bundle_dir(checkpoint: tuple[Path, torch.nn.Module, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory, _, _ = checkpoint
    out = tmp_path_factory.mktemp("bundle") / "rad-dino"
    return import_model("dinov2", directory, out, name="rad-dino-tiny", version="1", heads=directory / "heads.npz")


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_imported_bundle_matches_transformers(
    bundle_dir: Path, checkpoint: tuple[Path, torch.nn.Module, dict], backend: str
) -> None:
    _, model, heads = checkpoint
    engine = load(bundle_dir, backend)
    assert engine.parity is not None and engine.parity.passed
    assert [f.name for f in engine.bundle.findings] == ["Effusion", "Cardiomegaly"]
    image = np.random.default_rng(1).random((SIZE, SIZE), dtype=np.float32)  # square: no letterbox padding
    result = engine.infer([image])
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    pixels = (torch.from_numpy(image).expand(1, 3, SIZE, SIZE) - mean) / std
    with torch.no_grad():
        tokens = model(pixel_values=pixels).last_hidden_state[0].numpy()
    np.testing.assert_allclose(result.embeddings[0], tokens[0], atol=1e-4)
    logits = tokens @ heads["weights"].T + heads["bias"]  # CLS then patch tokens
    np.testing.assert_allclose(result.probabilities[0], 1 / (1 + np.exp(-logits[0])), atol=1e-4)
    patch_maps = (1 / (1 + np.exp(-logits[1:]))).T.reshape(2, SIZE // 8, SIZE // 8)
    np.testing.assert_allclose(result.maps[0], patch_maps, atol=1e-4)


def test_manifest_records_upstream_preprocessing(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["architecture"]["mean"] == MEAN
    assert manifest["input"]["resize"]["upstream"]["crop_size"] == {"height": SIZE, "width": SIZE}
    assert manifest["outputs"]["map"] == {**manifest["outputs"]["map"], "feature_stride": 8, "size": [8, 8]}


def test_heads_are_required(checkpoint: tuple[Path, torch.nn.Module, dict], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one finding"):
        import_model("dinov2", checkpoint[0], tmp_path / "b", name="x", version="1")


def test_tampered_weights_fail_the_gate(bundle_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle_dir, tmp_path / "copy"))
    state = torch.load(copy / "weights.pt", weights_only=True)
    state["head.bias"] += 1.0
    torch.save(state, copy / "weights.pt")
    pin(copy)
    with pytest.raises(ParityError, match="parity gate"):
        load(copy, "torch")
