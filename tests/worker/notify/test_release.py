"""RIS notifications in the ledger (worker.notify.release, the sweeper, recovery), on SQLite and
PostgreSQL: made per destination with the triage flag, held until the SR is delivered, released
when no delivery of it is left, re-published by the sweeper and by a restarted `pleura serve`."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from engines import load_bundle
from worker.assemble import recovery
from worker.assemble.sweeper import sweep
from worker.ledger import Delivery, Event, Finding, Instance, Job, Notification, OutputObject, Study
from worker.ledger.db import Ledger, upgrade, utcnow
from worker.ledger.models import DeliveryState, JobState, NotificationState, StudyState
from worker.notify import release
from worker.notify.result import control_id
from worker.queue import NOTIFY_TASK
from worker.settings import Settings

DICOM = ["DEST@127.0.0.1:104", "ARCHIVE@127.0.0.1:105"]
RIS = {"notify_hl7": "ris:2575,ris2:2576+tls", "notify_fhir": "https://fhir.example/r4"}


@pytest.fixture
def ledger(db_url: str) -> Ledger:
    upgrade(db_url)
    return Ledger(db_url)


class Published(list):
    def __call__(self, task: str, row_id: int) -> bool:
        self.append((task, row_id))
        return True


def _result(ledger: Ledger, n: int, effusion: float, cardiomegaly: float = 0.1) -> tuple[int, int]:
    """A finished job with one image's findings and its SR; (job id, SR output id)."""
    now = utcnow()
    with ledger.session() as s:
        study = Study(study_instance_uid=f"2.25.{n}", state=StudyState.DONE, first_received_at=now,
                      last_received_at=now)
        s.add(study)
        s.flush()
        instance = Instance(study_id=study.id, sop_instance_uid=f"2.25.{n}.1", sop_class_uid="1.2",
                            series_instance_uid=f"2.25.{n}.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            spool_path="/spool/x", size_bytes=1, sha256="0" * 64, received_at=now)
        job = Job(study_id=study.id, revision=1, state=JobState.SUCCEEDED, created_at=now, finished_at=now,
                  bundle_name="demo", bundle_version="0.1.0")
        s.add_all([instance, job])
        s.flush()
        for name, p, threshold in (("Effusion", effusion, 0.17), ("Cardiomegaly", cardiomegaly, 0.69)):
            s.add(Finding(job_id=job.id, instance_id=instance.id, finding=name, probability=p, threshold=threshold,
                          positive=p >= threshold))
        sr = OutputObject(job_id=job.id, kind="SR", sop_instance_uid=f"2.25.{n}.9", sop_class_uid="1.2",
                          series_instance_uid="2.25.8", path="/outbox/sr", created_at=now)
        s.add(sr)
        s.flush()
        return job.id, sr.id


def _create(ledger: Ledger, settings: Settings, job_id: int, sr_id: int) -> list[int]:
    with ledger.session() as s:
        return release.create(s, settings, load_bundle("demo"), job_id, s.get(OutputObject, sr_id), utcnow())


def _rows(ledger: Ledger, job_id: int) -> list[Notification]:
    with ledger.session() as s:
        rows = s.scalars(select(Notification).where(Notification.job_id == job_id).order_by(Notification.id)).all()
        s.expunge_all()
        return list(rows)


def test_one_row_per_destination_with_the_triage_flag_waiting_for_the_sr(ledger: Ledger) -> None:
    settings = Settings(destinations=DICOM, **RIS)
    flagged, quiet = _result(ledger, 1, effusion=0.8), _result(ledger, 2, effusion=0.05, cardiomegaly=0.9)
    assert _create(ledger, settings, *flagged) == [] and _create(ledger, settings, *quiet) == []  # none leaves yet
    rows = _rows(ledger, flagged[0])
    assert [(r.protocol, r.destination) for r in rows] == [
        ("HL7", "ris:2575"), ("HL7", "ris2:2576+tls"), ("FHIR", "https://fhir.example/r4")]
    assert {r.state for r in rows} == {NotificationState.WAITING} and all(r.triage for r in rows)
    assert {r.control_id for r in rows} == {control_id("2.25.1.9")}
    assert not any(r.triage for r in _rows(ledger, quiet[0]))  # cardiomegaly is positive, but not a triage finding
    # the site chooses another triage finding: now the second study flags, the first does not
    site = Settings(destinations=DICOM, triage_findings="Cardiomegaly", **RIS)
    again = [_result(ledger, 3, effusion=0.8), _result(ledger, 4, effusion=0.05, cardiomegaly=0.9)]
    for job_id, sr_id in again:
        _create(ledger, site, job_id, sr_id)
    assert [_rows(ledger, job_id)[0].triage for job_id, _ in again] == [False, True]


def test_without_dicom_destinations_they_leave_at_once_and_without_findings_there_is_none(ledger: Ledger) -> None:
    job_id, sr_id = _result(ledger, 5, effusion=0.8)
    ids = _create(ledger, Settings(**RIS), job_id, sr_id)
    assert len(ids) == 3 and {r.state for r in _rows(ledger, job_id)} == {NotificationState.PENDING}
    assert _create(ledger, Settings(destinations=DICOM), *_result(ledger, 6, effusion=0.8)) == []  # no RIS
    unanalysed = _result(ledger, 7, effusion=0.8)
    with ledger.session() as s:  # a job without findings (its images were not analysed)
        s.query(Finding).filter(Finding.job_id == unanalysed[0]).delete()
    assert _create(ledger, Settings(**RIS), *unanalysed) == [] and _rows(ledger, unanalysed[0]) == []


def _deliveries(ledger: Ledger, sr_id: int, *states: str) -> list[int]:
    with ledger.session() as s:
        rows = [Delivery(output_object_id=sr_id, destination=d, state=state, next_attempt_at=utcnow())
                for d, state in zip(DICOM, states, strict=True)]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def _end(ledger: Ledger, delivery_id: int, state: str) -> list[int]:
    with ledger.session() as s:
        delivery = s.get(Delivery, delivery_id)
        assert delivery is not None
        delivery.state = state
        return release.after_sr_delivery(s, delivery, utcnow())


def test_released_by_the_srs_first_delivery_or_once_none_is_left(ledger: Ledger) -> None:
    settings = Settings(destinations=DICOM, **RIS)
    job_id, sr_id = _result(ledger, 8, effusion=0.8)
    _create(ledger, settings, job_id, sr_id)
    first, second = _deliveries(ledger, sr_id, DeliveryState.SENDING, DeliveryState.PENDING)
    assert _end(ledger, first, DeliveryState.FAILED) == []  # another delivery of the SR may still succeed
    released = _end(ledger, second, DeliveryState.DELIVERED)
    assert sorted(released) == [r.id for r in _rows(ledger, job_id)]
    assert {r.state for r in _rows(ledger, job_id)} == {NotificationState.PENDING}
    assert all(r.released_at is not None for r in _rows(ledger, job_id))
    assert _end(ledger, second, DeliveryState.DELIVERED) == []  # released once

    job_id, sr_id = _result(ledger, 9, effusion=0.8)
    _create(ledger, settings, job_id, sr_id)
    first, second = _deliveries(ledger, sr_id, DeliveryState.FAILED, DeliveryState.SENDING)
    assert len(_end(ledger, second, DeliveryState.FAILED)) == 3  # no SR reached a PACS: the RIS still hears
    with ledger.session() as s:
        assert s.scalars(select(Event).where(Event.kind == "notifications_released")).one()


def test_the_sweeper_and_a_restarted_serve_publish_due_notifications(ledger: Ledger) -> None:
    job_id, sr_id = _result(ledger, 10, effusion=0.8)
    ids = _create(ledger, Settings(**RIS), job_id, sr_id)
    with ledger.session() as s:  # as if the first publish had failed
        s.query(Notification).filter(Notification.id.in_(ids)).update({"published_at": None})
    published = Published()
    assert sorted(sweep(ledger, 30, 60, published).published_notifications) == sorted(ids)
    assert sorted(published) == sorted((NOTIFY_TASK, i) for i in ids)
    assert sweep(ledger, 30, 60, Published()).published_notifications == []  # published: not again
    again = Published()  # `pleura serve` restarted: its in-process broker lost those messages
    assert sorted(recovery.recover(ledger, again, requeue_all=True).notifications) == sorted(ids)
    assert sorted(again) == sorted((NOTIFY_TASK, i) for i in ids)
