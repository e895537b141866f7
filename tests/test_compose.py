"""compose.yaml: the production stack parses, is wired together, keeps its passwords in secret files
and is documented in docs/operations.md; Orthanc's Lua scripts from docker/orthanc/ do what it says.

No Docker engine runs these tests: they read the files, run docker/make_secrets.py, and run the
Lua scripts in the Debian Orthanc that the end-to-end tests use.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.e2e.harness import Proc, running, storescp, wait_port
from tests.support import ROOT, free_port, require_tool, wait_for
from worker.settings import Settings, load_settings

OPERATIONS = ROOT / "docs" / "operations.md"
ONE_SHOT = "service_completed_successfully"


class _ComposeLoader(yaml.SafeLoader):
    """Reads Compose's merge tags (``!reset``, ``!override``) as plain values."""


_ComposeLoader.add_constructor("!reset", lambda _loader, _node: "!reset")
_ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node)
                               if isinstance(node, yaml.MappingNode) else loader.construct_sequence(node))


@cache
def _compose(name: str = "compose.yaml") -> dict[str, Any]:
    return yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)


def _services() -> dict[str, Any]:
    return _compose()["services"]


def _pleura_services() -> dict[str, Any]:
    return {name: s for name, s in _services().items() if str(s.get("image", "")).startswith("pleura:")}


def _one_shot() -> set[str]:
    """Services that others wait for to *complete* (migrations): they are not meant to keep running."""
    return {dep for s in _services().values() for dep, cond in s.get("depends_on", {}).items()
            if cond.get("condition") == ONE_SHOT}


def test_stack_runs_migrations_once_then_the_roles() -> None:
    services = _services()
    assert {"postgres", "rabbitmq", "orthanc", "ohif", "pleura-migrate", "pleura-listen", "pleura-worker"} <= set(
        services)
    assert services["pleura-migrate"]["command"] == ["pleura", "db", "upgrade"]
    assert services["pleura-migrate"]["restart"] == "no"
    assert services["pleura-migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for role in ("listen", "worker"):
        service = services[f"pleura-{role}"]
        assert service["command"] == ["pleura", role]
        assert service["depends_on"]["pleura-migrate"]["condition"] == ONE_SHOT
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert "pleura-data:/var/lib/pleura" in service["volumes"]  # one spool and outbox for both
    assert _one_shot() == {"pleura-migrate"}


def test_every_service_is_described_in_operations_doc() -> None:
    doc = OPERATIONS.read_text()
    for name in _services():
        assert re.search(rf"^\| `{re.escape(name)}` \|", doc, re.M), f"{name} has no row in docs/operations.md"
    for heading in ("Metrics and health", "Logs", "Audit", "Secrets", "Backup", "GPU"):
        assert re.search(rf"^#+ .*{heading}", doc, re.M), heading


def test_pleura_environment_is_made_of_settings() -> None:
    for name, service in _pleura_services().items():
        env = service["environment"]
        unknown = [key for key in env if key.removeprefix("PLEURA_").lower() not in Settings.model_fields]
        assert all(key.startswith("PLEURA_") for key in env) and not unknown, (name, unknown)
        settings = Settings(**{key.removeprefix("PLEURA_").lower(): value for key, value in env.items()})
        assert settings.http_port == 8080 and settings.http_host == "0.0.0.0", name
    for dockerfile in ("docker/Dockerfile", "docker/Dockerfile.gpu"):
        for key in re.findall(r"\b(PLEURA_\w+)=", (ROOT / dockerfile).read_text()):
            assert key.removeprefix("PLEURA_").lower() in Settings.model_fields, (dockerfile, key)


def test_passwords_live_in_secret_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "compose.yaml").read_text()
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", text), "credentials in a URL in compose.yaml"
    for service in _services().values():
        for key, value in (service.get("environment") or {}).items():
            assert not re.search(r"PASS(WORD)?$", key), f"{key}={value}: use a secret file"
    declared = _compose()["secrets"]
    files = {name: Path(spec["file"]) for name, spec in declared.items()}
    for name, path in files.items():
        assert path.parent == Path("docker/secrets"), name
        assert (ROOT / path).is_file() or (ROOT / f"{path}.example").is_file(), f"{path}: no file, no example"
    for service in _services().values():
        for ref in service.get("secrets", []):
            assert (ref if isinstance(ref, str) else ref["source"]) in declared

    out = tmp_path / "secrets"
    made = subprocess.run([sys.executable, str(ROOT / "docker" / "make_secrets.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    assert {p.name for p in out.iterdir()} == {p.name for p in files.values()}
    db = (out / "postgres_password").read_text().strip()
    broker = re.search(r"default_pass = (\S+)", (out / "rabbitmq_defaults.conf").read_text())[1]
    users = json.loads((out / "orthanc_users.json").read_text())
    assert len({db, broker, users["admin"], users["viewer"]}) == 4  # four distinct random passwords
    assert (out / "pleura_broker_url").read_text().strip() == f"amqp://pleura:{broker}@rabbitmq:5672//"
    header = base64.b64encode(f"viewer:{users['viewer']}".encode()).decode()
    assert f'Authorization "Basic {header}"' in (out / "ohif_orthanc_auth.conf").read_text()
    # Pleura reads its two secrets from that folder the way the containers do from /run/secrets.
    for key in [k for k in os.environ if k.startswith("PLEURA_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PLEURA_SECRETS_DIR", str(out))
    settings = load_settings()
    assert settings.database_url == f"postgresql+psycopg2://pleura:{db}@postgres:5432/pleura"
    assert settings.broker_url == f"amqp://pleura:{broker}@rabbitmq:5672//"
    again = subprocess.run([sys.executable, str(ROOT / "docker" / "make_secrets.py"), "--out", str(out)],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "all together or not at all" in again.stderr
    assert (out / "postgres_password").read_text().strip() == db  # nothing overwritten


def test_worker_reserves_a_gpu_in_the_tensorrt_image() -> None:
    worker = _services()["pleura-worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1
    assert worker["environment"]["PLEURA_BACKEND"] == "tensorrt"
    gpu_dockerfile = (ROOT / worker["build"]["dockerfile"]).read_text()
    base = re.search(r"^ARG TENSORRT_IMAGE=(\S+)$", gpu_dockerfile, re.M)[1]
    assert re.fullmatch(r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3", base), base
    cpu = _compose("docker/compose.cpu.yaml")["services"]["pleura-worker"]
    assert cpu["deploy"] == "!reset" and cpu["environment"]["PLEURA_BACKEND"] == "auto"
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile"


def test_long_running_services_have_health_checks() -> None:
    for name, service in _services().items():
        if name in _one_shot():
            continue
        assert service["restart"] == "unless-stopped", name
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL") and "NONE" not in test, name
    for name, service in _pleura_services().items():
        if name not in _one_shot():
            probe = " ".join(service["healthcheck"]["test"])
            assert f"127.0.0.1:{service['environment']['PLEURA_HTTP_PORT']}/readyz" in probe, name


def test_orthanc_ohif_and_pleura_point_at_each_other() -> None:
    services = _services()
    orthanc, pleura = services["orthanc"]["environment"], services["pleura-listen"]["environment"]
    modality = json.loads(orthanc["ORTHANC__DICOM_MODALITIES"])["pleura"]
    assert (modality["AET"], modality["Host"], modality["Port"]) == (
        pleura["PLEURA_AE_TITLE"], "pleura-listen", int(pleura["PLEURA_DICOM_PORT"]))
    assert f"{modality['Port']}:{modality['Port']}" in services["pleura-listen"]["ports"]
    assert pleura["PLEURA_DESTINATIONS"] == f"{orthanc['ORTHANC__DICOM_AET']}@orthanc:{orthanc['ORTHANC__DICOM_PORT']}"
    assert orthanc["ORTHANC__DICOM_AET"] in pleura["PLEURA_ALLOWED_CALLING_AES"].split(",")
    assert orthanc["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    mounts = dict(v.split(":")[1::-1] for v in services["orthanc"]["volumes"] if v.startswith("./"))
    for script in json.loads(orthanc["ORTHANC__LUA_SCRIPTS"]):
        assert (ROOT / mounts[script]).is_file(), script

    ohif = services["ohif"]
    mounts = dict(v.split(":")[1::-1] for v in ohif["volumes"])
    config = (ROOT / mounts["/usr/share/nginx/html/app-config.js"]).read_text()
    assert "qidoRoot: '/dicom-web'" in config and "wadoRoot: '/dicom-web'" in config
    proxy = (ROOT / mounts["/etc/nginx/conf.d/pleura-dicomweb.conf"]).read_text()
    assert re.search(r"listen 3000;", proxy) and "127.0.0.1:3000:3000" in ohif["ports"]
    assert "set $orthanc orthanc:8042;" in proxy and "proxy_pass http://127.0.0.1:8080;" in proxy
    assert ohif["environment"]["PORT"] == "8080"
    [secret] = ohif["secrets"]
    assert f"include /run/secrets/{secret['target']};" in proxy


def _instance(folder: Path, name: str, modality: str, body_part: str | None) -> Path:
    """A small instance: CR/DX image (8x8 pixels) or, for ``SR``, a Basic Text SR without content."""
    sop_class = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
                 "SR": "1.2.840.10008.5.1.4.1.1.88.11"}[modality]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID = sop_class, ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "LUA-TEST", "Lua^Test", modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if modality != "SR":
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.integration
def test_orthanc_lua_forwards_chest_radiographs_and_keeps_the_viewer_read_only(tmp_path: Path) -> None:
    binary, storescu = require_tool("Orthanc"), require_tool("storescu")
    received = tmp_path / "pleura-received"
    pleura_scp, pleura_port = storescp(received, tmp_path / "storescp.log", ae_title="PLEURA")
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "compose-lua-test", "StorageDirectory": str(tmp_path / "db"), "IndexDirectory": str(tmp_path / "db"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {"admin": "adminpw", "viewer": "viewerpw"},
        "DicomModalities": {"pleura": {"AET": "PLEURA", "Host": "127.0.0.1", "Port": pleura_port}},
        "LuaScripts": [str(ROOT / "docker/orthanc/autoforward.lua"), str(ROOT / "docker/orthanc/http-filter.lua")],
        "Plugins": [],
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    orthanc = Proc([binary, str(tmp_path / "orthanc.json")], tmp_path / "orthanc.log")

    def call(path: str, user: str, data: bytes | None = None) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", data=data,
                                         method="POST" if data is not None else "GET")
        password = {"admin": "adminpw", "viewer": "viewerpw"}[user]
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with running(orthanc, pleura_scp):
        wait_port(http_port, orthanc)
        skipped = [_instance(tmp_path, "hand", "CR", "HAND"), _instance(tmp_path, "sr", "SR", "CHEST")]
        own_result = _instance(tmp_path, "from-pleura", "CR", "CHEST")
        forwarded = [_instance(tmp_path, "cr", "CR", None), _instance(tmp_path, "dx", "DX", "THORAX")]
        for path in skipped:
            assert call("/instances", "admin", path.read_bytes()) == 200
        sent = subprocess.run([storescu, "-aet", "PLEURA", "-aec", "ORTHANC", "127.0.0.1", str(dicom_port),
                               str(own_result)], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        assert call("/instances", "viewer", forwarded[0].read_bytes()) == 403  # the viewer account only reads
        for path in forwarded:
            assert call("/instances", "admin", path.read_bytes()) == 200
        wait_for(lambda: len(list(received.iterdir())) >= len(forwarded), 30, "forwarded instances at PLEURA")
        time.sleep(1.5)  # sends are Orthanc jobs: give a wrongly routed one (queued earlier) time to land
        assert call("/instances", "viewer") == 200
    got = sorted(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in received.iterdir())
    assert got == sorted(str(dcmread(path).SOPInstanceUID) for path in forwarded)


def test_the_multihost_option_shares_no_volume_between_pleura_processes() -> None:
    """docker/compose.multihost.yaml: every Pleura process keeps its bytes in the database and has a
    data volume of its own; a second listener on another port; the settings are valid settings."""
    overlay = _compose("docker/compose.multihost.yaml")["services"]
    assert set(overlay) == {"pleura-listen", "pleura-listen-2", "pleura-worker"}
    data = {}
    for name, service in overlay.items():
        assert service["environment"]["PLEURA_STORAGE"] == "database", name
        data[name] = next(v.split(":")[0] for v in service["volumes"] if v.endswith(":/var/lib/pleura"))
    assert len(set(data.values())) == len(data), data  # no two processes share a data volume
    assert overlay["pleura-listen-2"]["extends"] == {"file": "../compose.yaml", "service": "pleura-listen"}
    assert overlay["pleura-listen-2"]["ports"][0] == "11113:11112"
    env = {**_services()["pleura-listen"]["environment"], **overlay["pleura-listen"]["environment"]}
    assert Settings(**{k.removeprefix("PLEURA_").lower(): v for k, v in env.items()}).storage == "database"
