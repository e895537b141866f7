"""Bundle loading and validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines import Bundle, BundleError, FindingSpec, load, load_bundle
from engines.bundle import hash_files
from engines.pins import pin


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_demo_bundle_fields(demo: Bundle) -> None:
    assert demo.name == "demo" and demo.version == "0.1.0"
    assert (demo.path / "manifest.json").is_file()
    assert [f.name for f in demo.findings] == ["Cardiomegaly", "Effusion", "Atelectasis", "Abnormal"]
    cardio = demo.findings[0]
    assert isinstance(cardio, FindingSpec)
    assert (cardio.code_value, cardio.code_scheme, cardio.code_meaning) == ("8186001", "SCT", "Cardiomegaly")
    assert all(0.0 < f.threshold < 1.0 for f in demo.findings)
    assert demo.intended_use == {
        "modalities": ["CR", "DX"],
        "body_parts": ["CHEST"],
        "views": ["PA", "AP"],
        "min_age_years": 18,
    }
    assert "NIH" in demo.manifest["source"]["attribution"]
    assert len(demo.sha256) == 64


def test_demo_bundle_is_small_and_complete(demo: Bundle) -> None:
    sizes = {p.name: p.stat().st_size for p in demo.path.iterdir()}
    assert {"manifest.json", "encoder.onnx", "weights.pt", "golden.npz", "MODEL_CARD.md"} <= set(sizes)
    assert sum(sizes.values()) < 5_000_000
    for name, result in demo.manifest["evaluation"]["findings"].items():
        assert 0.0 <= result["auc"] <= 1.0 and result["n_positive"] > 0, name


def test_load_by_path_equals_builtin_and_hash_is_stable(demo: Bundle, demo_copy: Path) -> None:
    copy = load_bundle(demo_copy)
    assert copy.sha256 == demo.sha256 == hash_files(demo.path)
    (demo_copy / "MODEL_CARD.md").write_text("changed")
    pin(demo_copy)
    assert load_bundle(demo_copy).sha256 != demo.sha256


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(BundleError, match=r"no model bundle 'nope'.*available: demo"):
        load_bundle("nope")


def test_directory_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_bundle(tmp_path)


def test_manifest_not_json(demo_copy: Path) -> None:
    (demo_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        load_bundle(demo_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["findings"][2].pop("threshold"), r"findings\[2\]\.threshold is missing"),
        (lambda m: m["findings"][0].update(threshold=1.5), r"findings\[0\]\.threshold must be a probability"),
        (lambda m: m["findings"].clear(), "findings must list at least one finding"),
        (lambda m: m["input"].update(size=[256]), r"input\.size must be \[height, width\]"),
        (lambda m: m["input"]["normalization"].update(scheme="zscore"), "supported: 'mean_std', 'range'"),
        (lambda m: m["intended_use"].update(views=[]), "intended_use.views must be a non-empty list"),
        (lambda m: m.update(schema_version=99), "this Pleura reads version 1"),
        (lambda m: m["files"].update(onnx="missing.onnx"), "files.onnx names 'missing.onnx', which is not in"),
    ],
)
def test_broken_manifest_names_the_field(demo_copy: Path, edit, message: str) -> None:
    _edit_manifest(demo_copy, edit)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(demo_copy)
    assert str(demo_copy) in str(info.value)


@pytest.mark.parametrize(("name", "backend"), [("weights.pt", "torch"), ("encoder.onnx", "onnxruntime")])
def test_corrupt_model_file_is_a_bundle_error(demo_copy: Path, name: str, backend: str) -> None:
    (demo_copy / name).write_bytes(b"not a model")
    with pytest.raises(BundleError, match=name):
        load(demo_copy, backend=backend)


def test_model_hash_follows_weights_and_thresholds_not_the_card(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import shutil

    from engines.bundle import BUILTIN_DIR, load_bundle
    from engines.pins import pin

    original = load_bundle("demo").model_sha256
    copy = shutil.copytree(BUILTIN_DIR / "demo", tmp_path / "demo")
    (copy / "MODEL_CARD.md").write_text("edited card")
    pin(copy)
    assert load_bundle(copy).model_sha256 == original
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["findings"][0]["threshold"] = 0.9
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(copy).model_sha256 != original
