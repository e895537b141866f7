"""Issue 18: with PLEURA_TRUSTED_KEYS set, `pleura serve` and `pleura worker` run only a bundle signed by
one of those keys; the SR's algorithm parameters name the signer key.

The keys are made by OpenSSL as a site would; the bundle is a copy of the demo installed in
PLEURA_MODELS_DIR and signed with `pleura models sign`. An unsigned bundle (the built-in demo) and
one signed by another key are refused at start-up: the process exits with the reason and never
listens.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from tests.bundles import demo_copy, keypair
from tests.e2e.harness import PLEURA, embedded_env, pleura, pleura_run, running, storescp, wait_port
from tests.reliability.services import pleura_env
from tests.support import free_port, reachable, require_tool, wait_for

pytestmark = pytest.mark.integration
QUIET = 2


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("keys")
    return {name: keypair(folder, name) for name in ("site", "other")}


def _install(models_dir: Path, name: str, key: Path | None) -> None:
    demo_copy(models_dir / name)
    if key is not None:
        pleura_run({"PLEURA_MODELS_DIR": str(models_dir)}, "models", "sign", name, "--key", str(key))


def _texts(ds: Dataset) -> Iterator[str]:
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            yield str(item.TextValue)
        yield from _texts(item)


def _refused(command: str, env: dict[str, str], log: Path) -> str:
    """Run ``command`` expecting it to exit at start-up; returns its output."""
    done = subprocess.run([PLEURA, command], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0, f"{command} started with a bundle it must refuse:\n{done.stderr[-2000:]}"
    log.write_text(done.stdout + done.stderr)
    return done.stderr


def test_serve_runs_a_signed_bundle_and_its_sr_names_the_signer(real_cr: Path, tmp_path: Path,
                                                                 keys: dict) -> None:
    models = tmp_path / "var" / "models"
    _install(models, "signed", keys["site"][0])
    key_id = json.loads((models / "signed" / "manifest.sig").read_text())["key"]
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    env = {**embedded_env(tmp_path, port, dest_port, QUIET), "PLEURA_MODEL": "signed",
           "PLEURA_TRUSTED_KEYS": f"{keys['other'][1]},{keys['site'][1]}"}
    serve = pleura("serve", env, tmp_path / "serve.log")
    with running(serve, dest):
        wait_port(port, serve, timeout=120)
        sent = subprocess.run([require_tool("storescu"), "-xw", "-aet", "MODALITY", "-aec", "PLEURA", "127.0.0.1",
                               str(port), str(real_cr)], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        received = wait_for(lambda: [p for p in (tmp_path / "received").iterdir() if p.name.startswith("SR")],
                            QUIET + 60, "the SR at the destination")
        sr = dcmread(received[0])
        parameters = [t for t in _texts(sr) if "=" in t]
        assert f"signer_key={key_id}" in parameters, parameters
        assert any(t.startswith("model_sha256=") for t in parameters)


@pytest.mark.parametrize("signed_by", [None, "other"])
def test_serve_refuses_an_unsigned_or_wrongly_signed_bundle(tmp_path: Path, keys: dict,
                                                            signed_by: str | None) -> None:
    models = tmp_path / "var" / "models"
    _install(models, "candidate", keys[signed_by][0] if signed_by else None)
    port = free_port()
    env = {**embedded_env(tmp_path, port, free_port(), QUIET), "PLEURA_MODEL": "candidate",
           "PLEURA_TRUSTED_KEYS": str(keys["site"][1])}
    stderr = _refused("serve", env, tmp_path / "serve.log")
    assert "model 'candidate' refused" in stderr
    assert ("is not signed" if signed_by is None else "which is not a trusted key") in stderr
    assert not reachable("127.0.0.1", port), "a refused model must not leave a listener behind"


def test_worker_runs_only_a_bundle_signed_by_a_trusted_key(pg_url: str, amqp_url: str, tmp_path: Path,
                                                           keys: dict) -> None:
    models = tmp_path / "var" / "models"
    _install(models, "signed", keys["site"][0])
    _install(models, "other", keys["other"][0])
    _install(models, "unsigned", None)
    env = {**pleura_env(tmp_path, pg_url, amqp_url, free_port(), ""),
           "PLEURA_TRUSTED_KEYS": str(keys["site"][1])}
    pleura_run(env, "db", "upgrade")
    for name, reason in (("unsigned", "is not signed"), ("other", "which is not a trusted key")):
        stderr = _refused("worker", {**env, "PLEURA_MODEL": name}, tmp_path / f"worker-{name}.log")
        assert f"model '{name}' refused" in stderr and reason in stderr
    worker = pleura("worker", {**env, "PLEURA_MODEL": "signed"}, tmp_path / "worker.log")
    with running(worker):
        wait_for(lambda: worker.alive() and "model loaded" in worker.log.read_text(), 90,
                 "the worker to load the signed bundle")
        assert "refused" not in worker.log.read_text()
