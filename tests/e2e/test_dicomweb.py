"""DICOMweb both ways, end to end: a PACS pushes studies to Pleura by STOW-RS, Pleura STOWs its results
into an archive, and the archive serves them by QIDO-RS and WADO-RS. No mocks.

- Orthanc A, the site's PACS (Debian's Orthanc with its DICOMweb plugin, tests/viewer/ohif.py), holds
  studies made from the NIH sample (uploaded with its REST ``POST /instances``) and knows Pleura as a
  DICOMweb server, with the bearer token Pleura gave it (and, as ``pleura-wrong``, a token Pleura does
  not know). Its own DICOMweb client pushes each study: ``POST /dicom-web/servers/pleura/stow``.
- `pleura serve` (embedded: SQLite, in-process broker) takes STOW-RS on PLEURA_DICOMWEB_PORT and has
  one destination, Orthanc B's DICOMweb base URL.
- Orthanc B, the archive, then lists each study's SR and SC(s) by QIDO-RS and returns the SR by WADO-RS,
  which pydicom reads as the TID 1500 SR the ledger describes.

The ledger records each push as an association of ``ORTHANC-A`` (the token's name) to ``STOW-RS``,
released, and each delivery to B as DELIVERED after a QIDO-RS check (``delivery_checked``). A push with
the wrong token fails on Orthanc A's side and leaves nothing in the ledger. The time from the end of
each of Orthanc A's pushes to its results being listed on Orthanc B is printed (not asserted).
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
import uuid
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import func, select

from tests.e2e.harness import embedded_env, pleura, running, wait_port
from tests.reliability.services import synth_studies
from tests.support import ROOT, free_port, wait_for
from tests.viewer.ohif import DicomWebOrthanc, orthanc_missing
from worker.ledger import Association, Delivery, Event, Finding, Instance, Job, OutputObject, Study
from worker.ledger.db import Ledger
from worker.ledger.models import DeliveryState, JobState, StudyState

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUIET = 1
SENDER = "ORTHANC-A"
TOKEN = f"pleura-e2e-{uuid.uuid4().hex}"
MANIFEST = ROOT / "engines" / "bundles" / "demo" / "manifest.json"
RELATED_DICOM = 'multipart/related; type="application/dicom"'


def _http(port: int, path: str, data: bytes | None = None, accept: str = "application/json",
          timeout: float = 60) -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of one request to 127.0.0.1:port; HTTP errors are answers too."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     method="POST" if data is not None else "GET", headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def _push(orthanc: DicomWebOrthanc, server: str, study_id: str) -> tuple[bool, str]:
    """Orthanc's DICOMweb client STOWs one of its studies to ``server``: whether it says it succeeded, and
    what it said (a synchronous answer, or the job's final state when the plugin answers with a job)."""
    status, _, body = _http(orthanc.http_port, f"/dicom-web/servers/{server}/stow",
                            json.dumps({"Resources": [study_id], "Synchronous": True}).encode())
    said = body.decode(errors="replace")
    if status != 200:
        return False, f"HTTP {status}: {said}"
    answer = json.loads(body or b"{}")
    if isinstance(answer, dict) and "ID" in answer and "Path" in answer:  # an asynchronous job
        def ended() -> dict[str, Any] | None:
            job = orthanc.rest(f"/jobs/{answer['ID']}")
            return job if job["State"] in ("Success", "Failure") else None

        job = wait_for(ended, 60, f"Orthanc job {answer['ID']}", interval=0.1)
        return job["State"] == "Success", json.dumps(job.get("Content") if job["State"] == "Success" else job)
    return True, said


def _qido(archive: DicomWebOrthanc, study_uid: str) -> list[dict[str, str]]:
    """QIDO-RS on the archive: (modality, series, SOP Instance UID, SOP Class UID) of each instance of the study."""
    status, kind, body = _http(archive.http_port, f"/dicom-web/studies/{study_uid}/instances?includefield=00080060",
                               accept="application/dicom+json")
    if status == 204 or not body.strip():
        return []
    assert status == 200 and kind.startswith("application/dicom+json"), (status, kind, body[:300])

    def value(item: dict[str, Any], tag: str) -> str:
        return str(item.get(tag, {}).get("Value", [""])[0])

    return [{"modality": value(i, "00080060"), "series": value(i, "0020000E"), "sop": value(i, "00080018"),
             "sop_class": value(i, "00080016")} for i in json.loads(body)]


def _wado(archive: DicomWebOrthanc, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
    """WADO-RS on the archive: the one Part-10 file in the multipart/related answer."""
    status, kind, body = _http(archive.http_port,
                               f"/dicom-web/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
                               accept=f"{RELATED_DICOM}; transfer-syntax=*")
    assert status == 200 and kind.lower().startswith("multipart/related"), (status, kind, body[:300])
    params = dict(p.strip().split("=", 1) for p in kind.split(";")[1:] if "=" in p)
    boundary = params["boundary"].strip('"').encode()
    parts = [p for p in body.split(b"--" + boundary)[1:] if not p.startswith(b"--")]
    assert len(parts) == 1, f"one instance asked for, {len(parts)} parts answered"
    head, _, content = parts[0].partition(b"\r\n\r\n")
    assert b"application/dicom" in head.lower(), head
    return content.removesuffix(b"\r\n")


def _content(items: Any) -> list[Dataset]:
    """Every content item of an SR's tree, depth first."""
    found = []
    for item in items:
        found.append(item)
        found += _content(item.get("ContentSequence", []))
    return found


def _outputs(ledger: Ledger, study_uid: str) -> list[dict[str, str]] | None:
    """The outputs of the study's newest job once it has succeeded (None before)."""
    with ledger.session() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        job = study and s.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.revision.desc())).first()
        if job is None or job.state != JobState.SUCCEEDED:
            return None
        rows = s.scalars(select(OutputObject).where(OutputObject.job_id == job.id)).all()
        return [{"kind": o.kind, "sop": o.sop_instance_uid, "series": o.series_instance_uid, "path": o.path}
                for o in rows] or None


def _findings(ledger: Ledger, study_uid: str, meanings: dict[str, str]) -> set[str]:
    """The code meanings of the findings the ledger records for the study."""
    with ledger.session() as s:
        names = s.scalars(select(Finding.finding).join(Job).join(Study)
                          .where(Study.study_instance_uid == study_uid)).all()
    return {meanings[name] for name in names}


def _delivered(ledger: Ledger, study_uid: str) -> list[tuple[int, str, str]] | None:
    """(delivery id, destination, state) of the study's deliveries once the study is done and all of
    them are final."""
    with ledger.session() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if study is None or study.state != StudyState.DONE:
            return None
        rows = s.execute(select(Delivery.id, Delivery.destination, Delivery.state).join(OutputObject)
                         .join(Job).where(Job.study_id == study.id)).all()
    final = (DeliveryState.DELIVERED, DeliveryState.FAILED)
    return [tuple(r) for r in rows] if rows and all(r[2] in final for r in rows) else None  # type: ignore[misc]


def test_pacs_pushes_by_stow_rs_and_results_reach_the_archive(nih: Path, tmp_path: Path) -> None:
    if (why := orthanc_missing()) is not None:
        pytest.skip(why)
    started = time.monotonic()
    files = synth_studies(nih, tmp_path / "studies", 3)
    sources = [dcmread(f, stop_before_pixels=True) for f in files]
    pushed, refused = sources[:2], sources[2]
    meanings = {f["name"]: f["code"]["meaning"] for f in json.loads(MANIFEST.read_text())["findings"]}

    web_port, dicom_port = free_port(), free_port()
    base = f"http://127.0.0.1:{web_port}/dicom-web/"
    archive = DicomWebOrthanc(tmp_path / "orthanc-b")
    try:
        pacs = DicomWebOrthanc(tmp_path / "orthanc-a", config={"DicomWeb": {"Servers": {
            "pleura": {"Url": base, "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}},
            "pleura-wrong": {"Url": base, "HttpHeaders": {"Authorization": f"Bearer not-{TOKEN}"}},
        }}})
    except BaseException:
        archive.stop()
        raise
    tokens = tmp_path / "dicomweb-tokens"
    tokens.write_text(f"{SENDER}:{TOKEN}\n")
    destination = f"http://127.0.0.1:{archive.http_port}/dicom-web"
    env = {**embedded_env(tmp_path, dicom_port, 0, QUIET),
           "PLEURA_DESTINATIONS": destination, "PLEURA_DICOMWEB_PORT": str(web_port),
           "PLEURA_DICOMWEB_HOST": "127.0.0.1", "PLEURA_DICOMWEB_TOKEN_FILE": str(tokens),
           "PLEURA_SWEEP_INTERVAL_SECONDS": "0.5", "PLEURA_DELIVERY_BACKOFF_SECONDS": "0.5"}
    serve = pleura("serve", env, tmp_path / "serve.log")
    with running(serve, pacs.proc, archive.proc):  # their logs are printed when the test fails
        # the PACS holds the studies (REST upload of the Part-10 files) while Pleura starts
        orthanc_ids = {str(ds.StudyInstanceUID): pacs.rest("/instances", f.read_bytes())["ParentStudy"]
                       for f, ds in zip(files, sources, strict=True)}
        wait_port(web_port, serve, timeout=120)
        wait_port(dicom_port, serve, timeout=30)
        ready = time.monotonic()
        ledger = Ledger(f"sqlite:///{tmp_path / 'var' / 'pleura.db'}")

        # Orthanc A's own DICOMweb client pushes each study to Pleura
        pushed_at: dict[str, float] = {}
        for ds in pushed:
            uid = str(ds.StudyInstanceUID)
            t0 = time.monotonic()
            ok, said = _push(pacs, "pleura", orthanc_ids[uid])
            pushed_at[uid] = time.monotonic()
            assert ok, f"Orthanc A's STOW-RS to Pleura failed: {said}"
            assert json.loads(said).get("InstancesCount") == "1", f"Orthanc A sent the study's one image: {said}"
            print(f"push of {uid}: {pushed_at[uid] - t0:.2f} s for Orthanc A's STOW-RS")

        # ... and once more with a token Pleura does not know: refused, and Orthanc A says so
        with ledger.session() as s:
            before = (s.scalar(select(func.count()).select_from(Instance)),
                      s.scalar(select(func.sum(Instance.times_received))))
        ok, wrong_said = _push(pacs, "pleura-wrong", orthanc_ids[str(refused.StudyInstanceUID)])
        assert not ok, f"Orthanc A's push with a wrong token succeeded: {wrong_said}"
        assert "HTTP status 401" in pacs.proc.log.read_text(errors="replace"), "A was told 401 Unauthorized"

        # each study's results listed on Orthanc B (QIDO-RS): every output of its job in the ledger
        listed_after: dict[str, float] = {}

        def all_listed() -> bool:
            for ds in pushed:
                uid = str(ds.StudyInstanceUID)
                if uid in listed_after:
                    continue
                outputs = _outputs(ledger, uid)
                if outputs and {o["sop"] for o in outputs} <= {i["sop"] for i in _qido(archive, uid)}:
                    listed_after[uid] = time.monotonic() - pushed_at[uid]
            return len(listed_after) == len(pushed)

        wait_for(all_listed, 60, "each study's SR and SC(s) listed by Orthanc B's QIDO-RS", interval=0.2)
        for uid, seconds in listed_after.items():
            print(f"study {uid}: results listed on Orthanc B {seconds:.2f} s after Orthanc A's STOW-RS ended")
        deliveries = {str(ds.StudyInstanceUID): wait_for(lambda uid=str(ds.StudyInstanceUID): _delivered(ledger, uid),
                                                         30, f"the deliveries of {ds.StudyInstanceUID} recorded",
                                                         interval=0.2)
                      for ds in pushed}

        found = {uid: _findings(ledger, uid, meanings) for uid in deliveries}

        # what the archive holds and serves
        for ds in pushed:
            uid = str(ds.StudyInstanceUID)
            outputs = _outputs(ledger, uid)
            assert outputs is not None
            held = _qido(archive, uid)
            assert sorted(i["sop"] for i in held) == sorted(o["sop"] for o in outputs), "B holds the results, only"
            modalities = sorted(i["modality"] for i in held)
            assert modalities.count("SR") == 1 and len(modalities) >= 2, f"one SR and the SC(s): {held}"
            assert {m for m in modalities if m != "SR"} == {"OT"}, f"the SCs are modality OT: {held}"
            (sr,) = [i for i in held if i["modality"] == "SR"]
            body = _wado(archive, uid, sr["series"], sr["sop"])
            (sr_out,) = [o for o in outputs if o["sop"] == sr["sop"]]
            assert hashlib.sha256(body).hexdigest() == hashlib.sha256(Path(sr_out["path"]).read_bytes()).hexdigest(), \
                "WADO-RS returns the SR Pleura made, byte for byte"
            report = dcmread(BytesIO(body))
            assert report.Modality == "SR" and report.StudyInstanceUID == uid
            assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
            assert report.ContentTemplateSequence[0].MappingResource == "DCMR"
            items = _content(report.ContentSequence)
            named = {item.ConceptNameCodeSequence[0].CodeMeaning for item in items if "ConceptNameCodeSequence" in item}
            scored = {item.ConceptNameCodeSequence[0].CodeMeaning for item in items if item.ValueType == "NUM"}
            assert found[uid] and found[uid] <= named, f"the ledger's findings {found[uid]} named in the SR: {named}"
            assert scored & found[uid], f"a finding's probability is in the SR as a NUM: {scored}"
            referenced = {ref.ReferencedSOPInstanceUID for item in report.CurrentRequestedProcedureEvidenceSequence
                          for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
            assert referenced == {str(ds.SOPInstanceUID)}, "the SR's evidence is the image Orthanc A pushed"

        # the ledger: each push an association of ORTHANC-A to STOW-RS, released; every delivery to B
        # DELIVERED and checked by QIDO-RS
        with ledger.session() as s:
            associations = s.scalars(select(Association).order_by(Association.id)).all()
            ours = [(a.id, a.calling_ae, a.called_ae, a.peer_host, a.end_reason) for a in associations]
            instances = {i.sop_instance_uid: (i.association_id, i.times_received) for i in s.scalars(select(Instance))}
            after = (s.scalar(select(func.count()).select_from(Instance)),
                     s.scalar(select(func.sum(Instance.times_received))))
            checked = {json.loads(e.detail or "{}").get("delivery_id")
                       for e in s.scalars(select(Event).where(Event.kind == "delivery_checked"))}
        assert [a[1:] for a in ours] == [(SENDER, "STOW-RS", "127.0.0.1", "released")] * len(pushed), ours
        assert sorted(instances) == sorted(str(ds.SOPInstanceUID) for ds in pushed)
        assert {assoc for assoc, _ in instances.values()} == {a[0] for a in ours}, "one push, one association"
        assert all(times == 1 for _, times in instances.values())
        for uid, rows in deliveries.items():
            assert rows and all(dest == destination and state == DeliveryState.DELIVERED for _, dest, state in rows), \
                f"{uid}: {rows}"
            assert {delivery_id for delivery_id, _, _ in rows} <= checked, f"{uid}: a delivery not checked by QIDO-RS"
        # the wrong token: nothing new in the ledger, no association, and the study is not there
        assert after == before == (len(pushed), len(pushed)), (before, after)
        assert str(refused.SOPInstanceUID) not in instances
        ledger.engine.dispose()
        log = (tmp_path / "serve.log").read_text()
    assert TOKEN not in log, "the bearer token never reaches the logs"
    print(f"wrong token: Orthanc A said {wrong_said[:300]!r}")
    print(f"serve ready {ready - started:.1f} s, test {time.monotonic() - started:.1f} s")
