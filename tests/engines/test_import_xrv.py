"""Importing torchxrayvision DenseNet checkpoints (``engines.importers.xrv``).

torchxrayvision itself cannot be installed here (it needs torchvision, which is not
available), so the imported bundle is compared with the reference implementation
:class:`engines.nets.densenet.DenseNet` (torchxrayvision's module names and forward pass) run
directly on the same preprocessed input. Checkpoints are seeded random-weight models saved in
the upstream state-dict format (with the ``op_threshs`` buffer). The full import runs on a
small DenseNet-BC to keep the test fast; DenseNet-121's key names and shapes are checked
against known upstream keys.
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import engines
from engines.importers import import_model
from engines.importers.xrv import LOCAL_SCHEME, PATHOLOGIES, architecture, load_upstream, read_state_dict
from engines.nets.densenet import DenseNet
from engines.preprocess import preprocess, resize

TINY: dict[str, Any] = {"growth_rate": 8, "block_config": (2, 2, 2, 2), "num_init_features": 16, "bn_size": 2}
#: Like torchxrayvision's dataset-specific weights: an output without a name is dropped.
NAMES = tuple("" if name == "Infiltration" else name for name in PATHOLOGIES)
OP_THRESHS = torch.linspace(0.01, 0.3, 18)

#: (key, shape) of torchxrayvision's ``DenseNet(weights="densenet121-res224-all")`` state dict.
UPSTREAM_KEYS = [
    ("features.conv0.weight", (64, 1, 7, 7)),
    ("features.norm0.running_var", (64,)),
    ("features.denseblock1.denselayer1.norm1.weight", (64,)),
    ("features.denseblock1.denselayer1.conv1.weight", (128, 64, 1, 1)),
    ("features.denseblock1.denselayer1.conv2.weight", (32, 128, 3, 3)),
    ("features.transition1.conv.weight", (128, 256, 1, 1)),
    ("features.denseblock3.denselayer24.norm2.bias", (128,)),
    ("features.transition3.norm.weight", (1024,)),
    ("features.denseblock4.denselayer16.conv2.weight", (32, 128, 3, 3)),
    ("features.norm5.weight", (1024,)),
    ("classifier.weight", (18, 1024)),
    ("classifier.bias", (18,)),
]


def random_densenet(seed: int = 0, **config: Any) -> DenseNet:
    """Seeded random DenseNet with batch-norm statistics measured on xrv-scaled noise (realistic scales)."""
    torch.manual_seed(seed)
    model = DenseNet(num_findings=18, **config)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(4, 1, 224, 224) * 2048 - 1024)
    return model.eval()


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [resize(rng.random((20, 16), dtype=np.float32), 300, 240), rng.random((224, 224), dtype=np.float32)]


@pytest.fixture(scope="module")
def upstream() -> DenseNet:
    return random_densenet(**TINY)


@pytest.fixture(scope="module")
def checkpoint(upstream: DenseNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("xrv") / "densenet.pt"
    torch.save({**upstream.state_dict(), "op_threshs": OP_THRESHS}, path)
    return path


@pytest.fixture(scope="module")
def bundle_dir(checkpoint: Path) -> Path:
    out = checkpoint.parent / "bundle"
    messages: list[str] = []
    result = import_model(
        "torchxrayvision", checkpoint, out, name="xrv-test", version="1.0", progress=messages.append, pathologies=NAMES
    )
    assert result == out and any("parity gate" in m for m in messages)
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_imported_bundle_passes_parity_gate(bundle_dir: Path, backend: str) -> None:
    engine = engines.load(bundle_dir, backend)
    assert engine.parity is not None and engine.parity.passed


def test_outputs_match_reference_forward(bundle_dir: Path, upstream: DenseNet) -> None:
    engine = engines.load(bundle_dir, "onnxruntime")
    keep = [i for i, name in enumerate(NAMES) if name]
    result = engine.infer(images())
    x, _ = preprocess(images(), engine.bundle.manifest["input"])
    with torch.no_grad():
        embedding, logits, cam = upstream(torch.from_numpy(x))
    np.testing.assert_allclose(result.embeddings, embedding.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.probabilities, torch.sigmoid(logits).numpy()[:, keep], atol=1e-4, rtol=0)
    assert result.embeddings.shape == (2, upstream.num_features)
    assert result.maps.shape == (2, 17, 32, 32)
    torch.testing.assert_close(cam.mean(dim=(2, 3)), logits, atol=1e-4, rtol=0)  # CAM resolves the logit


def test_preprocessing_is_xrv_normalize_and_center_crop(bundle_dir: Path) -> None:
    spec = engines.load_bundle(bundle_dir).manifest["input"]
    square = np.random.default_rng(1).integers(0, 256, (224, 224)).astype(np.float32)
    x, _ = preprocess([square / 255], spec)
    xrv_normalized = (2 * (square / 255) - 1.0) * 1024  # xrv.datasets.normalize(img, 255)
    np.testing.assert_allclose(x[0, 0], xrv_normalized, atol=1e-3)
    tall = np.random.default_rng(2).random((300, 200), dtype=np.float32)
    x, (region,) = preprocess([tall], spec)
    crop = tall[150 - 100 : 150 + 100]  # XRayCenterCrop: y // 2 - size // 2
    np.testing.assert_allclose(x[0, 0], resize(crop, 224, 224) * 2048 - 1024, atol=1e-2)
    assert (region.top, region.left, region.height, region.width) == (-56, 0, 336, 224)


def test_manifest_findings_thresholds_and_card(bundle_dir: Path) -> None:
    bundle = engines.load_bundle(bundle_dir)
    names = [name for name in NAMES if name]
    assert [f.name for f in bundle.findings] == names
    kept = [float(t) for t, name in zip(OP_THRESHS, NAMES, strict=True) if name]
    assert [f.threshold for f in bundle.findings] == pytest.approx(kept)
    by_name = {f.name: f for f in bundle.findings}
    assert (by_name["Effusion"].code_scheme, by_name["Effusion"].code_value) == ("SCT", "60046008")
    assert by_name["Lung Opacity"].code_scheme == LOCAL_SCHEME
    m = bundle.manifest
    assert m["input"]["normalization"] == {**m["input"]["normalization"], "scheme": "range", "low": -1024.0}
    assert m["input"]["resize"]["policy"] == "center_crop"
    assert m["architecture"] == {"name": "densenet", **TINY, "block_config": [2, 2, 2, 2]}
    card = bundle.file("model_card").read_text()
    assert "Not validated here" in card and LOCAL_SCHEME in card and "op_norm" in card


def test_densenet121_matches_upstream_keys() -> None:
    torch.manual_seed(0)
    state = DenseNet(num_findings=18).state_dict()
    for key, shape in UPSTREAM_KEYS:
        assert tuple(state[key].shape) == shape, key
    arch = architecture(state, Path("x.pt"))
    assert arch == {
        "name": "densenet",
        "growth_rate": 32,
        "block_config": [6, 12, 24, 16],
        "num_init_features": 64,
        "bn_size": 4,
    }
    model = load_upstream({**state, "classifier.bias": torch.ones(18)}, Path("x.pt"))
    with torch.no_grad():
        embedding, logits, cam = model(torch.zeros(1, 1, 64, 64))  # 224x224 gives 7x7 maps; smaller is faster
    assert embedding.shape == (1, 1024) and logits.shape == (1, 18) and cam.shape == (1, 18, 2, 2)


def test_whole_model_file_needs_allow_pickle_but_not_torchxrayvision(
    upstream: DenseNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchxrayvision's download pickles the whole model; it is read without importing the library."""
    models = types.ModuleType("torchxrayvision.models")
    models.DenseNet = type("DenseNet", (DenseNet,), {"__module__": "torchxrayvision.models"})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchxrayvision", types.ModuleType("torchxrayvision"))
    monkeypatch.setitem(sys.modules, "torchxrayvision.models", models)
    whole = copy.deepcopy(upstream)
    whole.__class__ = models.DenseNet  # type: ignore[attr-defined]
    path = tmp_path / "whole.pt"
    torch.save(whole, path)
    monkeypatch.undo()  # torchxrayvision is not importable any more
    with pytest.raises(ValueError, match="allow_pickle=True"):
        read_state_dict(path)
    state = read_state_dict(path, allow_pickle=True)
    assert state.keys() == upstream.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in upstream.state_dict().items())


def test_clear_errors(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        import_model("torchxrayvision", corrupt, out, name="x", version="1")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a model" * 50)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        import_model("torchxrayvision", garbage, out, name="x", version="1")
    demo = engines.load_bundle("demo").file("torch_state_dict")
    with pytest.raises(ValueError, match="not a torchxrayvision DenseNet"):
        import_model("torchxrayvision", demo, out, name="x", version="1")
    no_thresholds = tmp_path / "plain.pt"
    torch.save({k: v for k, v in torch.load(checkpoint, weights_only=True).items() if k != "op_threshs"}, no_thresholds)
    with pytest.raises(ValueError, match="op_threshs"):
        import_model("torchxrayvision", no_thresholds, out, name="x", version="1")
    with pytest.raises(ValueError, match="probabilities in"):
        import_model("torchxrayvision", checkpoint, out, name="x", version="1", op_threshs=[2.0] * 18)
    with pytest.raises(FileNotFoundError):
        import_model("torchxrayvision", tmp_path / "missing.pt", out, name="x", version="1")
    with pytest.raises(ValueError, match="unknown importer"):
        import_model("chexnet", checkpoint, out, name="x", version="1")
    assert not out.exists()


def test_cli_import_then_verify_by_name(checkpoint: Path, tmp_path: Path) -> None:
    """The operator's path: `pleura models import` into PLEURA_MODELS_DIR, then verify by name."""
    import os
    import subprocess
    import sys

    pleura = str(Path(sys.executable).with_name("pleura"))
    env = {**os.environ, "PLEURA_DATA_DIR": str(tmp_path)}
    done = subprocess.run([pleura, "models", "import", "torchxrayvision", str(checkpoint), "--name", "xrv-tiny",
                           "--version", "0.0.1"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models" / "xrv-tiny" / "manifest.json").is_file()
    done = subprocess.run([pleura, "models", "verify", "xrv-tiny", "--backend", "onnxruntime"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "parity PASSED" in done.stdout
