"""Study assembly, queueing and leases from ledger timestamps, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from dicom_node.filing import StoredInstance
from worker.assemble.sweeper import sweep
from worker.ledger import Attempt, Event, Job, Study
from worker.ledger.db import Ledger, upgrade, utcnow
from worker.ledger.models import JobState, StudyState
from worker.listen.receiver import LedgerReceiver
from worker.process import jobs
from worker.queue import PROCESS_TASK


@pytest.fixture
def ledger(db_url: str) -> Ledger:
    upgrade(db_url)
    return Ledger(db_url)


def _receive(ledger: Ledger, sop: str, study: str = "1.2.3", sha: str = "a" * 64) -> None:
    LedgerReceiver(ledger).instance_stored(
        StoredInstance(association=None, sop_class_uid="1.2.840.10008.5.1.4.1.1.1", sop_instance_uid=sop,
                       study_instance_uid=study, series_instance_uid=study + ".1",
                       transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CR", path=f"/spool/{sop}",
                       size=10, sha256=sha)
    )


class Published(list):
    def __call__(self, task: str, row_id: int) -> bool:
        self.append((task, row_id))
        return True


def test_quiet_period_then_exactly_one_job(ledger: Ledger) -> None:
    _receive(ledger, "1.2.3.4")
    published = Published()
    assert sweep(ledger, quiet_seconds=30, republish_seconds=60, publish=published).queued == []
    report = sweep(ledger, quiet_seconds=0, republish_seconds=60, publish=published)
    assert len(report.queued) == 1 and published == [(PROCESS_TASK, report.queued[0])]
    assert sweep(ledger, quiet_seconds=0, republish_seconds=60, publish=published).queued == []
    with ledger.session() as s:
        assert s.scalars(select(Study)).one().state == StudyState.QUEUED


def test_claim_is_exclusive_and_expired_lease_is_republished(ledger: Ledger) -> None:
    _receive(ledger, "1.2.3.4")
    job_id = sweep(ledger, 0, 60, Published()).queued[0]
    assert jobs.claim(ledger, job_id, lease_seconds=60) is not None
    assert jobs.claim(ledger, job_id, lease_seconds=60) is None  # a duplicated message is harmless
    with ledger.session() as s:  # the lease ran out, and the message was published long ago
        s.execute(update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1),
                                     published_at=utcnow() - timedelta(seconds=120)))
    published = Published()
    assert sweep(ledger, 0, 60, published).republished_jobs == [job_id]
    assert jobs.claim(ledger, job_id, lease_seconds=60) is not None  # the lease expired: taken over
    with ledger.session() as s:
        assert [a.number for a in s.scalars(select(Attempt).order_by(Attempt.number))] == [1, 2]


def test_failures_are_retried_then_quarantined(ledger: Ledger) -> None:
    _receive(ledger, "1.2.3.4")
    job_id = sweep(ledger, 0, 60, Published()).queued[0]
    attempt = jobs.claim(ledger, job_id, 60)
    assert jobs.fail(ledger, job_id, attempt, "decoder crashed", max_attempts=2) is True
    attempt = jobs.claim(ledger, job_id, 60)
    assert jobs.fail(ledger, job_id, attempt, "decoder crashed", max_attempts=2) is False
    with ledger.session() as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.FAILED and "decoder crashed" in job.error
        assert s.get(Study, job.study_id).state == StudyState.FAILED
        assert "job_failed" in [e.kind for e in s.scalars(select(Event))]


def test_late_instance_reopens_and_supersedes_the_queued_job(ledger: Ledger) -> None:
    _receive(ledger, "1.2.3.4")
    first = sweep(ledger, 0, 60, Published()).queued[0]
    _receive(ledger, "1.2.3.5")  # arrives after queueing
    with ledger.session() as s:
        study = s.scalars(select(Study)).one()
        assert (study.state, study.revision) == (StudyState.RECEIVING, 2)
    assert jobs.claim(ledger, first, 60) is None
    second = sweep(ledger, 0, 60, Published()).queued[0]
    with ledger.session() as s:
        assert s.get(Job, first).state == JobState.SUPERSEDED
        assert s.get(Job, second).revision == 2


def test_failed_publish_is_retried_next_sweep_and_a_backlog_is_not_multiplied(ledger: Ledger) -> None:
    _receive(ledger, "1.2.3.4")
    attempts: list[int] = []

    def broker_down(task: str, row_id: int) -> bool:
        attempts.append(row_id)
        return False

    job_id = sweep(ledger, 0, 600, broker_down).queued[0]
    with ledger.session() as s:
        assert s.get(Job, job_id).published_at is None  # marked unsent
    published = Published()
    assert sweep(ledger, 0, 600, published).republished_jobs == [job_id]  # the broker is back
    for _ in range(3):  # the message now waits in the broker: later sweeps do not add copies
        assert sweep(ledger, 0, 600, published).republished_jobs == []
    assert published == [(PROCESS_TASK, job_id)] and attempts == [job_id]


def test_an_expired_lease_is_republished_once(ledger: Ledger) -> None:
    _receive(ledger, "1.2.3.4")
    job_id = sweep(ledger, 0, 600, Published()).queued[0]
    assert jobs.claim(ledger, job_id, lease_seconds=60) is not None
    published = Published()
    assert sweep(ledger, 0, 600, published).republished_jobs == []  # the lease holds
    with ledger.session() as s:  # ... until it runs out (the message was published before)
        s.execute(update(Job).values(published_at=utcnow() - timedelta(seconds=2),
                                     lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert sweep(ledger, 0, 600, published).republished_jobs == [job_id]
    assert sweep(ledger, 0, 600, published).republished_jobs == []
    assert published == [(PROCESS_TASK, job_id)]
    # that message was lost too (a worker that reserved it was killed before claiming it): the backstop
    with ledger.session() as s:
        s.execute(update(Job).values(published_at=utcnow() - timedelta(seconds=601)))
    assert sweep(ledger, 0, 600, published).republished_jobs == [job_id]
