"""Issue 18: pinned and signed bundles, and the parity gate of every backend.

A bundle's manifest pins the SHA-256 of each of its files; a changed, missing or added file is
refused with the file named. Signatures are Ed25519 over the manifest, with keys made by OpenSSL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines import BundleError, load_bundle
from engines.backends.tensorrt import unavailable_reason
from engines.pins import SIGNATURE, pin
from engines.runtime import check_backends
from engines.signing import SignatureError, load_trusted_keys, sign
from tests.bundles import demo_copy, flip_middle, keypair


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    return demo_copy(tmp_path / "demo")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("keys")
    return {name: keypair(folder, name) for name in ("site", "other")}


def test_builtin_demo_is_pinned_and_loads() -> None:
    bundle = load_bundle("demo")
    assert bundle.pinned and bundle.signer is None
    assert set(bundle.manifest["pins"]) == {"MODEL_CARD.md", "crossval.json", "encoder.onnx", "golden.npz",
                                            "roc.png", "weights.pt"}


def test_flipped_bytes_in_the_encoder_are_refused_naming_it(copy: Path) -> None:
    flip_middle(copy / "encoder.onnx")
    with pytest.raises(BundleError, match=r"changed since pinned: encoder\.onnx"):
        load_bundle(copy)


def test_a_missing_file_is_refused_naming_it(copy: Path) -> None:
    (copy / "roc.png").unlink()
    with pytest.raises(BundleError, match=r"missing: roc\.png"):
        load_bundle(copy)


@pytest.mark.parametrize("extra", ["encoder.onnx.data", "sub/weights.bin", ".hidden"])
def test_an_extra_file_is_refused_naming_it(copy: Path, extra: str) -> None:
    """Any file a backend could read (an ONNX graph's external data, say) must be pinned."""
    (copy / extra).parent.mkdir(exist_ok=True)
    (copy / extra).write_bytes(b"\0" * 16)
    with pytest.raises(BundleError, match=rf"not pinned: {extra.replace('.', '[.]')}"):
        load_bundle(copy)


def test_every_problem_is_named_at_once(copy: Path) -> None:
    flip_middle(copy / "weights.pt")
    (copy / "crossval.json").unlink()
    (copy / "notes.txt").write_text("added")
    with pytest.raises(BundleError) as raised:
        load_bundle(copy)
    message = str(raised.value)
    assert "changed since pinned: weights.pt" in message and "missing: crossval.json" in message
    assert "not pinned: notes.txt" in message and str(copy) in message


def test_re_pinning_accepts_an_intended_change(copy: Path) -> None:
    (copy / "MODEL_CARD.md").write_text("# a site's own card\n")
    with pytest.raises(BundleError, match="MODEL_CARD.md"):
        load_bundle(copy)
    pins = pin(copy)
    assert load_bundle(copy).pinned and "MODEL_CARD.md" in pins
    assert load_bundle(copy).model_sha256 == load_bundle("demo").model_sha256, "the card decides no output"
    manifest = json.loads((copy / "manifest.json").read_text())
    assert "sha256" not in manifest and manifest["pins"] == pins


def test_signed_bundle_loads_with_its_key_and_names_the_signer(copy: Path, keys: dict) -> None:
    private, public = keys["site"]
    signer = sign(copy, private)
    trusted = load_trusted_keys([public])
    assert list(trusted) == [signer] and signer.startswith("sha256:") and len(signer) == 71
    bundle = load_bundle(copy, trusted)
    assert bundle.signer == signer
    assert load_bundle(copy).signer is None, "no trusted keys given: the signature is not claimed"


def test_unsigned_bundle_is_refused_when_keys_are_trusted(copy: Path, keys: dict) -> None:
    with pytest.raises(BundleError, match="is not signed"):
        load_bundle(copy, load_trusted_keys([keys["site"][1]]))


def test_bundle_signed_by_another_key_is_refused(copy: Path, keys: dict) -> None:
    sign(copy, keys["other"][0])
    with pytest.raises(BundleError, match="which is not a trusted key"):
        load_bundle(copy, load_trusted_keys([keys["site"][1]]))


def test_manifest_changed_after_signing_is_refused(copy: Path, keys: dict) -> None:
    sign(copy, keys["site"][0])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["findings"][1]["threshold"] = 0.01  # flag every study
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(BundleError, match="does not match its manifest"):
        load_bundle(copy, load_trusted_keys([keys["site"][1]]))


def test_file_changed_after_signing_is_refused_by_the_pins(copy: Path, keys: dict) -> None:
    sign(copy, keys["site"][0])
    flip_middle(copy / "golden.npz")
    with pytest.raises(BundleError, match=r"changed since pinned: golden\.npz"):
        load_bundle(copy, load_trusted_keys([keys["site"][1]]))


def test_re_pinning_voids_the_signature(copy: Path, keys: dict) -> None:
    sign(copy, keys["site"][0])
    pin(copy)
    assert not (copy / SIGNATURE).exists()
    with pytest.raises(BundleError, match="is not signed"):
        load_bundle(copy, load_trusted_keys([keys["site"][1]]))


def test_unpinned_bundle_cannot_be_trusted(copy: Path, keys: dict) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["pins"]
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert not load_bundle(copy).pinned
    sign(copy, keys["site"][0])
    with pytest.raises(BundleError, match="not pinned"):
        load_bundle(copy, load_trusted_keys([keys["site"][1]]))


def test_keys_that_are_not_ed25519_public_keys_are_refused(tmp_path: Path, keys: dict) -> None:
    import subprocess

    rsa = tmp_path / "rsa.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(rsa)],
                   check=True, timeout=60)
    rsa_pub = tmp_path / "rsa.pub.pem"
    subprocess.run(["openssl", "pkey", "-in", str(rsa), "-pubout", "-out", str(rsa_pub)], check=True, timeout=30)
    with pytest.raises(SignatureError, match="not an Ed25519 key"):
        load_trusted_keys([rsa_pub])
    with pytest.raises(SignatureError, match="cannot read a PEM public key"):
        load_trusted_keys([keys["site"][0].with_suffix(".missing")])
    with pytest.raises(SignatureError, match="not an Ed25519 key"):
        sign(demo_copy(tmp_path / "demo"), rsa)


def test_broken_onnx_fails_on_onnxruntime_while_torch_passes(copy: Path) -> None:
    """The parity gate of each backend, not only the first that passes (the issue's tampered copy, re-pinned)."""
    flip_middle(copy / "encoder.onnx")
    pin(copy)
    checks = {c.kind: c for c in check_backends(load_bundle(copy))}
    assert checks["onnxruntime"].status == "failed" and "EXCEEDS tolerance" in checks["onnxruntime"].detail
    assert checks["torch"].status == "passed"
    reason = unavailable_reason()
    if reason:  # no TensorRT here: said so, with the reason, and not counted as a failure
        assert (checks["tensorrt"].status, checks["tensorrt"].backend, checks["tensorrt"].detail) == (
            "unavailable", None, reason)
    else:
        assert checks["tensorrt"].status == "failed", "the broken graph fails on TensorRT too"
