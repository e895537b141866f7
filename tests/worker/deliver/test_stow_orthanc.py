"""Results out by DICOMweb STOW-RS (worker.deliver.stow through worker.deliver.send) into a real Orthanc.

Debian's Orthanc with its DICOMweb plugin (tests/viewer/ohif.py), made to demand a bearer token by a Lua
``IncomingHttpRequestFilter`` (Orthanc has no bearer authentication of its own; the filter answers 403
without it, and raises for paths under ``/unavailable/``, which Orthanc answers with a 500), and to drop
one instance by a ``ReceivedInstanceFilter`` (its STOW-RS still answers 200 and references the instance:
only the QIDO-RS check tells). A real SR and SC built from the shared CR go through the real delivery
state machine on a SQLite ledger.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.results.content import Algorithm, ImageResult
from dicom_node.results.sc import build_sc
from dicom_node.results.sr import build_sr
from dicom_node.results.uids import derive_uid
from tests.dicom_node.node_helpers import decode_unit, make_findings
from tests.e2e.harness import Proc, wait_port
from tests.security.pki import Authority, authority
from tests.support import REAL_CR, free_port, require_tool
from tests.viewer.ohif import DicomWebOrthanc, orthanc_missing
from worker.deliver.send import deliver
from worker.ledger import Delivery, Event, Job, OutputObject, Study
from worker.ledger.db import Ledger, upgrade, utcnow
from worker.ledger.models import SC_KIND, SR_KIND, DeliveryState, JobState, StudyState
from worker.runtime import Runtime
from worker.settings import Settings

pytestmark = pytest.mark.integration

TOKEN = f"pleura-test-{uuid.uuid4().hex}"
BACKOFF = 2.0


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pydicom.Dataset]:
    """A real SR and SC of the shared CR, and a second SC that Orthanc's filter drops, saved as Part-10 files."""
    if (why := orthanc_missing()) is not None:
        pytest.skip(why)
    if not REAL_CR.is_file():
        pytest.skip(f"real CR {REAL_CR} absent: the shared data folder is not beside the repo")
    source = pydicom.dcmread(REAL_CR)
    result = ImageResult(source=source, pixels=decode_unit(source), findings=make_findings())
    algorithm, study = Algorithm(name="demo", version="0.1.0"), source.StudyInstanceUID
    built = {
        "SR": build_sr([result], algorithm, series_instance_uid=derive_uid("sr-series", study),
                       sop_instance_uid=derive_uid("sr", study, "stow"), series_number=9001, instance_number=1),
        "SC": build_sc(result, algorithm, series_instance_uid=derive_uid("sc-series", study),
                       sop_instance_uid=derive_uid("sc", study, "stow"), series_number=9002, instance_number=1),
        "dropped": build_sc(result, algorithm, series_instance_uid=derive_uid("sc-series", study),
                            sop_instance_uid=derive_uid("sc", study, "dropped"), series_number=9002,
                            instance_number=2),
    }
    folder = tmp_path_factory.mktemp("outbox")
    for name, ds in built.items():
        ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
        ds.filename = str(folder / f"{name}.dcm")
    return built


@pytest.fixture(scope="module")
def orthanc(objects: dict[str, pydicom.Dataset], tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomWebOrthanc]:
    lua = f"""
function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  if string.find(uri, '^/unavailable/') then error('simulated outage') end
  return headers['authorization'] == 'Bearer {TOKEN}'
end
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.SOPInstanceUID ~= '{objects["dropped"].SOPInstanceUID}'
end
"""
    server = DicomWebOrthanc(tmp_path_factory.mktemp("orthanc"), lua=lua, token=TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ledger(objects: dict[str, pydicom.Dataset], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """One study, one job and the three output objects; each test adds its deliveries."""
    url = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
    upgrade(url)
    ledger = Ledger(url)
    now = utcnow()
    with ledger.session() as s:
        study = Study(study_instance_uid=objects["SR"].StudyInstanceUID, state=StudyState.DONE,
                      first_received_at=now, last_received_at=now)
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, revision=1, state=JobState.SUCCEEDED, created_at=now)
        s.add(job)
        s.flush()
        for name, ds in objects.items():
            s.add(OutputObject(job_id=job.id, kind=SR_KIND if name == "SR" else SC_KIND,
                               sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                               series_instance_uid=ds.SeriesInstanceUID, path=ds.filename, created_at=now))
    yield ledger
    ledger.close()


def _runtime(ledger: Ledger, tmp_path: Path, token: str = TOKEN, horizon: float = 3600) -> Runtime:
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    settings = Settings(data_dir=tmp_path, destination_token_file=token_file, delivery_backoff_seconds=BACKOFF,
                        delivery_backoff_max_seconds=60, delivery_horizon_seconds=horizon)
    return Runtime(settings, ledger, publish=lambda task, row_id: True)


def _send(rt: Runtime, ds: pydicom.Dataset, destination: str) -> int:
    """Queue a delivery of ``ds`` to ``destination`` and make one try; its id."""
    with rt.ledger.session() as s:
        output = s.scalars(select(OutputObject).where(OutputObject.sop_instance_uid == ds.SOPInstanceUID)).one()
        row = Delivery(output_object_id=output.id, destination=destination, state=DeliveryState.PENDING,
                       next_attempt_at=utcnow())
        s.add(row)
        s.flush()
        delivery_id = row.id
    deliver(rt, delivery_id)
    return delivery_id


def _row(ledger: Ledger, delivery_id: int) -> dict[str, Any]:
    with ledger.session() as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        return {c: getattr(row, c) for c in ("state", "attempts", "peer_status", "last_error", "next_attempt_at",
                                             "last_attempt_at", "delivered_at")}


def _events(ledger: Ledger, delivery_id: int) -> list[tuple[str, dict[str, Any]]]:
    with ledger.session() as s:
        events = [(e.kind, json.loads(e.detail or "{}")) for e in s.scalars(select(Event).order_by(Event.id))]
    return [(kind, detail) for kind, detail in events if detail.get("delivery_id") == delivery_id]


def _again(ledger: Ledger, delivery_id: int) -> None:
    """Make a retried delivery due now."""
    with ledger.session() as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        row.next_attempt_at = utcnow()


def _qido(orthanc: DicomWebOrthanc, ds: pydicom.Dataset) -> list[Any]:
    return orthanc.rest(f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances"
                        f"?SOPInstanceUID={ds.SOPInstanceUID}")


def test_sr_and_sc_are_stored_and_found_by_qido(orthanc: DicomWebOrthanc, ledger: Ledger, objects, tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    rt = _runtime(ledger, tmp_path)
    base = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    for name in ("SR", "SC"):
        delivery_id = _send(rt, objects[name], base)
        row = _row(ledger, delivery_id)
        assert (row["state"], row["attempts"], row["peer_status"], row["last_error"]) == ("DELIVERED", 1, 200, None)
        assert [kind for kind, _ in _events(ledger, delivery_id)] == ["delivery_checked", "delivered"]
        checked = _events(ledger, delivery_id)[0][1]
        assert checked == {"delivery_id": delivery_id, "destination": base, "query": "QIDO-RS", "found": True,
                           "qido_status": 200}
        assert [i["00080018"]["Value"] for i in _qido(orthanc, objects[name])] == [[objects[name].SOPInstanceUID]]
    held = {i["SOPInstanceUID"] for i in orthanc.instances(objects["SR"].StudyInstanceUID)}
    assert held == {objects["SR"].SOPInstanceUID, objects["SC"].SOPInstanceUID}
    assert TOKEN not in "".join(capfd.readouterr())


def test_a_wrong_token_is_refused_at_once(orthanc: DicomWebOrthanc, ledger: Ledger, objects, tmp_path: Path) -> None:
    rt = _runtime(ledger, tmp_path, token="not-the-token")
    base = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    delivery_id = _send(rt, objects["SC"], base + "/")  # a destination string as an operator may write it
    row = _row(ledger, delivery_id)
    assert (row["state"], row["attempts"], row["peer_status"], row["last_error"]) == ("FAILED", 1, 403,
                                                                                      "HTTP 403 Forbidden")
    (kind, detail), = _events(ledger, delivery_id)
    assert kind == "delivery_failed" and detail["reason"] == "peer refused permanently"


def test_a_wrong_path_is_refused_at_once(orthanc: DicomWebOrthanc, ledger: Ledger, objects, tmp_path: Path) -> None:
    rt = _runtime(ledger, tmp_path)
    delivery_id = _send(rt, objects["SR"], f"http://127.0.0.1:{orthanc.http_port}/wrong/dicom-web")
    row = _row(ledger, delivery_id)
    assert (row["state"], row["attempts"], row["peer_status"]) == ("FAILED", 1, 404)
    assert row["last_error"] == "HTTP 404 Not Found: Unknown resource"
    assert [kind for kind, _ in _events(ledger, delivery_id)] == ["delivery_failed"]


def test_a_server_error_is_retried_with_the_delivery_backoff(orthanc: DicomWebOrthanc, ledger: Ledger, objects,
                                                             tmp_path: Path) -> None:
    rt = _runtime(ledger, tmp_path)
    delivery_id = _send(rt, objects["SR"], f"http://127.0.0.1:{orthanc.http_port}/unavailable/dicom-web")
    _again(ledger, delivery_id)
    deliver(rt, delivery_id)
    row = _row(ledger, delivery_id)
    assert (row["state"], row["attempts"], row["peer_status"]) == ("PENDING", 2, 500)
    assert row["last_error"].startswith("HTTP 500 Internal Server Error: Cannot execute a Lua command")
    assert "simulated outage" in row["last_error"]
    retries = [(k, d["retry_in_seconds"]) for k, d in _events(ledger, delivery_id)]
    assert retries == [("delivery_retry", BACKOFF), ("delivery_retry", 2 * BACKOFF)]  # doubling, as for C-STORE
    wait = (row["next_attempt_at"] - row["last_attempt_at"]).total_seconds()
    assert 2 * BACKOFF - 1 < wait < 2 * BACKOFF + 1


def test_nothing_listening_is_retried_until_the_horizon(ledger: Ledger, objects, tmp_path: Path) -> None:
    rt = _runtime(ledger, tmp_path)
    delivery_id = _send(rt, objects["SC"], f"http://127.0.0.1:{free_port()}/dicom-web")
    row = _row(ledger, delivery_id)
    assert (row["state"], row["attempts"], row["peer_status"]) == ("PENDING", 1, None)
    assert row["last_error"].startswith("ConnectionRefusedError")
    _again(ledger, delivery_id)
    deliver(_runtime(ledger, tmp_path, horizon=0.001), delivery_id)  # the result is now older than the horizon
    assert _row(ledger, delivery_id)["state"] == "FAILED"
    (k1, _), (k2, failed) = _events(ledger, delivery_id)
    assert (k1, k2, failed["reason"]) == ("delivery_retry", "delivery_failed", "delivery horizon passed")


def test_stored_but_not_found_by_qido_is_retried(orthanc: DicomWebOrthanc, ledger: Ledger, objects,
                                                 tmp_path: Path) -> None:
    rt = _runtime(ledger, tmp_path)
    base = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    delivery_id = _send(rt, objects["dropped"], base)
    row = _row(ledger, delivery_id)
    assert (row["state"], row["attempts"], row["peer_status"]) == ("PENDING", 1, 200)
    assert row["last_error"] == ("stored (HTTP 200) but QIDO-RS does not find the instance (HTTP 200, not listed); "
                                 "it will be sent again")
    (k1, checked), (k2, _) = _events(ledger, delivery_id)
    assert (k1, checked["found"], checked["qido_status"], k2) == ("delivery_checked", False, 200, "delivery_retry")
    assert _qido(orthanc, objects["dropped"]) == []


def test_c_store_goes_the_same_way(orthanc: DicomWebOrthanc, ledger: Ledger, objects, tmp_path: Path) -> None:
    rt = _runtime(ledger, tmp_path)
    delivery_id = _send(rt, objects["SR"], f"{DicomWebOrthanc.AE_TITLE}@127.0.0.1:{orthanc.dicom_port}")
    row = _row(ledger, delivery_id)
    assert (row["state"], row["peer_status"], row["last_error"]) == ("DELIVERED", 0, None)
    assert [kind for kind, _ in _events(ledger, delivery_id)] == ["delivered"]


_TLS_PROXY = """@USER@
worker_processes 1;
daemon off;
pid @WORK@/nginx.pid;
error_log @WORK@/error.log warn;
events { worker_connections 64; }
http {
    access_log @WORK@/access.log;
    client_body_temp_path @WORK@/body; proxy_temp_path @WORK@/proxy; fastcgi_temp_path @WORK@/fastcgi;
    uwsgi_temp_path @WORK@/uwsgi; scgi_temp_path @WORK@/scgi;
    server {
        listen 127.0.0.1:@PORT@ ssl;
        ssl_certificate @CERT@;
        ssl_certificate_key @KEY@;
        ssl_client_certificate @CA@;
        ssl_verify_client on;
        client_max_body_size 64m;
        location / { proxy_pass http://127.0.0.1:@ORTHANC@; }
    }
}
"""


def _tls_proxy(workdir: Path, orthanc: DicomWebOrthanc, pki: Authority) -> tuple[Proc, int]:
    """nginx in front of ``orthanc`` speaking HTTPS with ``pki``'s server certificate and asking for a client
    certificate of ``pki``'s CA (Debian's Orthanc 1.10 itself crashes at its first TLS handshake here)."""
    port = free_port()
    values = {"@USER@": "user root;" if os.geteuid() == 0 else "", "@WORK@": str(workdir), "@PORT@": str(port),
              "@CERT@": str(pki.server.cert), "@KEY@": str(pki.server.key), "@CA@": str(pki.ca.cert),
              "@ORTHANC@": str(orthanc.http_port)}
    conf = _TLS_PROXY
    for key, value in values.items():
        conf = conf.replace(key, value)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "nginx.conf").write_text(conf)
    proc = Proc([require_tool("nginx"), "-p", str(workdir), "-e", str(workdir / "error.log"),
                 "-c", str(workdir / "nginx.conf")], workdir / "nginx.log")
    wait_port(port, proc)
    return proc, port


def test_https_verifies_the_server_and_presents_our_certificate(orthanc: DicomWebOrthanc, ledger: Ledger, objects,
                                                                tmp_path: Path) -> None:
    """HTTPS (nginx in front of Orthanc, asking for a client certificate): delivered with the ``PLEURA_TLS_*``
    files; a server certificate from a CA other than ``PLEURA_TLS_CA_FILE``: retried; no client certificate:
    nginx answers 400, refused at once."""
    trusted, rogue = authority(tmp_path / "pki", "trusted"), authority(tmp_path / "pki", "rogue")
    proxy, port = _tls_proxy(tmp_path / "nginx", orthanc, trusted)
    try:
        base = f"https://127.0.0.1:{port}/dicom-web"
        rt = _runtime(ledger, tmp_path)
        tls = {"tls_ca_file": trusted.ca.cert, "tls_cert_file": trusted.client.cert, "tls_key_file": trusted.client.key}
        outcomes = {}
        for name, settings in (("SR", tls), ("SC", {**tls, "tls_ca_file": rogue.ca.cert}),
                               ("dropped", {**tls, "tls_cert_file": None, "tls_key_file": None})):
            rt.settings = rt.settings.model_copy(update=settings)
            outcomes[name] = _row(ledger, _send(rt, objects[name], base))
        assert (outcomes["SR"]["state"], outcomes["SR"]["peer_status"]) == ("DELIVERED", 200)
        assert (outcomes["SC"]["state"], outcomes["SC"]["peer_status"]) == ("PENDING", None)
        assert "CERTIFICATE_VERIFY_FAILED" in outcomes["SC"]["last_error"]
        assert (outcomes["dropped"]["state"], outcomes["dropped"]["peer_status"]) == ("FAILED", 400)
        assert "No required SSL certificate was sent" in outcomes["dropped"]["last_error"]
    except BaseException:
        print(f"--- nginx error.log\n{(tmp_path / 'nginx' / 'error.log').read_text(errors='replace')[-3000:]}")
        raise
    finally:
        proxy.stop()
