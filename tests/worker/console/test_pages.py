"""The console's pages from a small SQLite ledger: every page renders, values with markup come out
escaped, study links are URL-encoded, bad query parameters give 400 and an unknown study 404."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from worker.console.pages import Console
from worker.ledger import Association, Delivery, Finding, Instance, Job, OutputObject, Report, Study
from worker.ledger.db import Ledger, upgrade
from worker.ledger.events import record
from worker.settings import load_settings
from worker.web.server import Handler

EVIL = '<script>alert("x")</script>'
AE = '<i>"AE"</i>'  # a calling AE title with markup and quotes
UID = "1.2.3.4"
ODD_UID = "1.2.3&x=<5>"  # not a DICOM UID, but the link must still carry it whole
AT = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def _study(s, uid: str, assoc: Association, state: str) -> tuple[Study, Instance]:  # type: ignore[no-untyped-def]
    study = Study(study_instance_uid=uid, state=state, revision=1, first_received_at=AT, last_received_at=AT)
    s.add(study)
    s.flush()
    instance = Instance(study_id=study.id, association_id=assoc.id, sop_instance_uid=f"{uid}.1",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", series_instance_uid=f"{uid}.0",
                        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CR", spool_path="/spool/1",
                        size_bytes=1000, sha256="0" * 64, received_at=AT)
    s.add(instance)
    s.flush()
    return study, instance


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Handler]:
    tmp: Path = tmp_path_factory.mktemp("console")
    url = f"sqlite:///{tmp / 'ledger.db'}"
    upgrade(url)
    ledger = Ledger(url)
    with ledger.session() as s:
        assoc = Association(calling_ae=AE, called_ae="PLEURA", peer_host="10.0.0.1", peer_port=104,
                            started_at=AT)
        s.add(assoc)
        s.flush()
        done, image = _study(s, UID, assoc, "DONE")
        job = Job(study_id=done.id, revision=1, state="SUCCEEDED", created_at=AT + timedelta(seconds=2.5), attempts=1,
                  bundle_name="demo", bundle_version="0.1.0", backend="onnxruntime",
                  finished_at=AT + timedelta(seconds=3))
        s.add(job)
        s.flush()
        output = OutputObject(job_id=job.id, kind="SR", sop_instance_uid="2.25.1", sop_class_uid="1.2.3",
                              series_instance_uid="2.25.2", path="/outbox/1", created_at=AT)
        s.add(output)
        s.flush()
        s.add(Delivery(output_object_id=output.id, destination="PACS@pacs:104", state="FAILED", attempts=5,
                       next_attempt_at=AT, last_attempt_at=AT, peer_status=0xA700, last_error=f"refused {EVIL}"))
        s.add(Finding(job_id=job.id, instance_id=image.id, finding="Effusion", probability=0.8, threshold=0.5,
                      positive=True))
        s.add(Report(source="hl7", sender="ris", message_id="m1", status="final", study_id=done.id,
                     study_instance_uid=UID, text="never shown", labels=json.dumps({"Effusion": "absent"}),
                     labeler="test/1", received_at=AT, matched_at=AT))
        failed, _ = _study(s, ODD_UID, assoc, "FAILED")
        s.add(Job(study_id=failed.id, revision=1, state="FAILED", created_at=AT, attempts=3,
                  finished_at=AT + timedelta(seconds=9), error=f"worker died: {EVIL}"))
        record(s, "association_rejected", calling_ae=AE, called_ae="PLEURA", peer_host="10.9.9.9",
               reason=f"not allowed: {EVIL}")
    settings = load_settings(database_url=url, data_dir=tmp, monitor_window_days=7)
    return Console(ledger, settings).routes()


def _get(pages: dict[str, Handler], path: str, status: int = 200, **query: str) -> str:
    response = pages[path]({k: [v] for k, v in query.items()})
    assert (response.status, response.content_type) == (status, "text/html; charset=utf-8")
    page = response.body.decode()
    assert page.startswith("<!doctype html>") and "<script" not in page
    return page


def test_every_page_escapes_its_values(pages: dict[str, Handler]) -> None:
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;"
    home = _get(pages, "/")
    assert "<title>Studies · Pleura</title>" in home and "<h1>Studies</h1>" in home
    assert '<a href="/?state=DONE"><span class="s DONE">DONE</span> 1</a>' in home
    assert "&lt;i&gt;&#34;AE&#34;&lt;/i&gt;" in home and '<td class="">demo 0.1.0</td>' in home
    assert '<td class="n">0/1 (1 failed)</td>' in home and '<td class="n">2.50 s</td>' in home  # quiet
    assert "2 most recent." in home and "1 most recent in state FAILED." in _get(pages, "/", state="failed")

    study = _get(pages, "/study", uid=UID)
    assert f'<p class="uid">{UID}</p>' in study and f"refused {escaped}" in study
    assert '<span class="s FAILED">FAILED</span>' in study and "&lt;i&gt;&#34;AE&#34;&lt;/i&gt;" in study
    assert f"worker died: {escaped}" in _get(pages, "/study", uid=ODD_UID)

    failures = _get(pages, "/failures")
    assert f"not allowed: {escaped}" in failures and f"worker died: {escaped}" in failures
    assert "&lt;i&gt;&#34;AE&#34;&lt;/i&gt;@10.9.9.9" in failures
    assert '<a href="/failures?kind=job_failed">job failed</a>' in failures

    assert '<td class="">demo</td><td class="">0.1.0</td>' in _get(pages, "/models")
    monitor = _get(pages, "/monitor", windows="2")
    assert "<td class=\"\">demo 0.1.0</td><td class=\"\">Effusion</td>" in monitor
    assert '<img alt="demo 0.1.0 Effusion over time" src="data:image/png;base64,' in monitor


def test_study_links_are_url_encoded(pages: dict[str, Handler]) -> None:
    link = '<a class="uid" href="/study?uid=1.2.3%26x%3D%3C5%3E">1.2.3&amp;x=&lt;5&gt;</a>'
    assert link in _get(pages, "/") and link in _get(pages, "/failures")
    assert f'<a class="uid" href="/study?uid={UID}">{UID}</a>' in _get(pages, "/")


def test_bad_parameters_and_unknown_studies(pages: dict[str, Handler]) -> None:
    for path in ("/", "/failures"):
        page = _get(pages, path, 400, limit="abc")
        assert "<h1>Bad request</h1><p>limit must be a whole number from 1 to 1000</p>" in page.replace("\n", "")
    assert "state must be one of" in _get(pages, "/", 400, state="nope")
    assert "windows must be a whole number from 1 to 24" in _get(pages, "/monitor", 400, windows="0")
    assert "give the study as /study?uid=" in _get(pages, "/study", 400)
    missing = _get(pages, "/study", 404, uid='9.9"<b>')
    assert "<h1>Study not found</h1>" in missing and "<p>No study 9.9&#34;&lt;b&gt; in the ledger.</p>" in missing
