"""`pleura models verify/pin/sign/list`: pins, signatures and the parity gate of every backend, as an operator
runs them (issue 18)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.backends.tensorrt import unavailable_reason
from engines.bundle import BUILTIN_DIR
from engines.pins import pin
from tests.bundles import demo_copy, flip_middle, keypair

PLEURA = str(Path(sys.executable).with_name("pleura"))


def pleura(*args: str, data_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PLEURA_DATA_DIR": str(data_dir), **(env or {})}
    return subprocess.run([PLEURA, *args], capture_output=True, text=True, timeout=180, env=env)


def test_demo_passes_on_every_backend_here(tmp_path: Path) -> None:
    done = pleura("models", "verify", "demo", data_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert set(lines) == {"pins", "signature", "tensorrt", "onnxruntime", "torch"}
    assert "passed" in lines["pins"] and "6 files match" in lines["pins"]
    assert "parity PASSED" in lines["onnxruntime"] and "parity PASSED" in lines["torch"]
    reason = unavailable_reason()
    assert lines["tensorrt"].split()[1] == "unavailable" and reason in lines["tensorrt"] if reason \
        else "parity PASSED" in lines["tensorrt"]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_one_backend_on_request(backend: str, tmp_path: Path) -> None:
    done = pleura("models", "verify", "demo", "--backend", backend, data_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    checked = [line.split()[0] for line in done.stdout.splitlines()[1:]]
    assert checked == ["pins", "signature", backend] and "parity PASSED" in done.stdout


def test_flipped_bytes_are_refused_by_the_pins(tmp_path: Path) -> None:
    """The issue's new-user check: a copy with 64 bytes flipped in the middle of its ONNX graph."""
    flip_middle(demo_copy(tmp_path / "models" / "tampered") / "encoder.onnx")
    done = pleura("models", "verify", "tampered", data_dir=tmp_path)
    assert done.returncode == 1
    assert "changed since pinned: encoder.onnx" in done.stdout and "verify FAILED (pins)" in done.stderr
    assert "parity PASSED" not in done.stdout


def test_broken_onnx_fails_naming_onnxruntime_while_torch_passes(tmp_path: Path) -> None:
    bundle = demo_copy(tmp_path / "models" / "tampered")
    flip_middle(bundle / "encoder.onnx")
    assert pleura("models", "pin", "tampered", data_dir=tmp_path).returncode == 0  # pins pass: the gate decides
    done = pleura("models", "verify", "tampered", data_dir=tmp_path)
    assert done.returncode == 1
    lines = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert "parity FAILED" in lines["onnxruntime"] and "EXCEEDS tolerance" in lines["onnxruntime"]
    assert "parity PASSED" in lines["torch"]
    assert "verify FAILED (onnxruntime)" in done.stderr
    report = json.loads(pleura("models", "verify", "tampered", "--json", data_dir=tmp_path).stdout)
    statuses = {c["kind"]: c["status"] for c in report["backends"]}
    assert report["passed"] is False and statuses["onnxruntime"] == "failed" and statuses["torch"] == "passed"


def test_modified_golden_output_fails_on_every_backend(tmp_path: Path) -> None:
    bundle = demo_copy(tmp_path / "models" / "tampered")
    with np.load(bundle / "golden.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["probabilities"] = arrays["probabilities"] + 0.01
    np.savez(bundle / "golden.npz", **arrays)
    pin(bundle)
    done = pleura("models", "verify", "tampered", data_dir=tmp_path)
    assert done.returncode == 1
    assert "verify FAILED (onnxruntime, torch)" in done.stderr and done.stdout.count("EXCEEDS tolerance") >= 2


def test_unpinned_bundle_fails_verify(tmp_path: Path) -> None:
    bundle = demo_copy(tmp_path / "models" / "loose")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["pins"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    done = pleura("models", "verify", "loose", data_dir=tmp_path)
    assert done.returncode == 1 and "pins no files" in done.stdout and "parity PASSED" in done.stdout


def test_sign_then_verify_with_trusted_keys(tmp_path: Path) -> None:
    site, other = keypair(tmp_path / "keys", "site"), keypair(tmp_path / "keys", "other")
    demo_copy(tmp_path / "models" / "signed")
    signed = pleura("models", "sign", "signed", "--key", str(site[0]), data_dir=tmp_path)
    assert signed.returncode == 0, signed.stderr
    trusted = {"PLEURA_TRUSTED_KEYS": str(site[1])}
    done = pleura("models", "verify", "signed", data_dir=tmp_path, env=trusted)
    assert done.returncode == 0, done.stderr
    assert "signed by trusted key sha256:" in done.stdout and str(site[1]) in done.stdout
    untrusted = pleura("models", "verify", "signed", data_dir=tmp_path, env={"PLEURA_TRUSTED_KEYS": str(other[1])})
    assert untrusted.returncode == 1 and "not a trusted key" in untrusted.stdout
    assert "verify FAILED (signature)" in untrusted.stderr
    unsigned = pleura("models", "verify", "demo", data_dir=tmp_path, env=trusted)
    assert unsigned.returncode == 1 and "is not signed" in unsigned.stdout
    not_pinned = demo_copy(tmp_path / "models" / "loose")
    manifest = json.loads((not_pinned / "manifest.json").read_text())
    del manifest["pins"]
    (not_pinned / "manifest.json").write_text(json.dumps(manifest))
    refused = pleura("models", "sign", "loose", "--key", str(site[0]), data_dir=tmp_path)
    assert refused.returncode == 1 and "is not pinned" in refused.stderr
    rows = {r["path"]: r for r in json.loads(pleura("models", "list", "--json", data_dir=tmp_path).stdout)}
    assert rows[str(tmp_path / "models" / "signed")]["signed"] and rows[str(not_pinned)]["pinned"] is False


def test_builtin_bundles_are_not_re_pinned(tmp_path: Path) -> None:
    done = pleura("models", "pin", "demo", data_dir=tmp_path)
    assert done.returncode == 1 and "built-in bundle" in done.stderr


def test_list_shows_builtin_and_installed(tmp_path: Path) -> None:
    shutil.copytree(BUILTIN_DIR / "demo", tmp_path / "models" / "copy")
    done = pleura("models", "list", "--json", data_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["name"], r["origin"]) for r in rows] == [("demo", "built-in"), ("demo", "installed")]
    assert rows[0]["findings"] == ["Cardiomegaly", "Effusion", "Atelectasis", "Abnormal"]
