"""Claiming and finishing jobs with a lease: what makes a duplicated message harmless."""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from worker.ledger import Attempt, Job, Study
from worker.ledger.db import Ledger, as_utc, utcnow
from worker.ledger.events import record
from worker.ledger.models import JobState, StudyState

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


class LeaseLost(RuntimeError):
    """Another worker took the job over (our lease expired); our results are dropped."""


def claim(ledger: Ledger, job_id: int, lease_seconds: float) -> int | None:
    """Take the job if it is queued or its lease expired; return the attempt id, else None."""
    now = utcnow()
    with ledger.session() as s:
        won = s.execute(
            update(Job)
            .where(
                Job.id == job_id,
                or_(
                    Job.state == JobState.QUEUED,
                    and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
                ),
            )
            .values(
                state=JobState.RUNNING,
                lease_owner=WORKER_ID,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1,
            )
        ).rowcount
        if not won:
            return None
        job = s.get(Job, job_id)
        assert job is not None
        study = s.get(Study, job.study_id)
        assert study is not None
        if study.revision != job.revision and study.state == StudyState.RECEIVING:
            job.state, job.finished_at = JobState.SUPERSEDED, now
            record(s, "job_superseded", study_id=study.id, job_id=job.id, by_revision=study.revision)
            return None
        if study.revision == job.revision:
            study.state = StudyState.PROCESSING
        attempt = Attempt(job_id=job_id, number=job.attempts, worker=WORKER_ID, started_at=now)
        s.add(attempt)
        s.flush()
        record(s, "job_started", study_id=study.id, job_id=job.id, attempt=job.attempts, worker=WORKER_ID)
        return attempt.id


def still_owned(s: Session, job: Job) -> bool:
    """True while our lease holds (re-read under a row lock inside the finishing transaction)."""
    fresh = s.scalars(select(Job).where(Job.id == job.id).with_for_update()).one()
    return fresh.lease_owner == WORKER_ID and fresh.state == JobState.RUNNING and (
        as_utc(fresh.lease_expires_at) > utcnow()
    )


def fail(ledger: Ledger, job_id: int, attempt_id: int, error: str, max_attempts: int) -> bool:
    """Record a failed attempt; quarantine the job (FAILED) after ``max_attempts``.

    Returns True when the job will be retried.
    """
    now = utcnow()
    with ledger.session() as s:
        job = s.get(Job, job_id)
        attempt = s.get(Attempt, attempt_id)
        assert job is not None and attempt is not None
        attempt.finished_at, attempt.outcome, attempt.error = now, "FAILED", error[:2000]
        if job.lease_owner != WORKER_ID or job.state != JobState.RUNNING:
            return False
        job.error = error[:2000]
        study = s.get(Study, job.study_id)
        assert study is not None
        if job.attempts >= max_attempts:
            job.state, job.finished_at = JobState.FAILED, now
            if study.revision == job.revision:
                study.state, study.note = StudyState.FAILED, f"processing failed: {error[:500]}"
            record(s, "job_failed", study_id=study.id, job_id=job.id, attempts=job.attempts, error=error[:500])
            return False
        job.state, job.published_at, job.lease_owner = JobState.QUEUED, None, None
        record(s, "job_retry", study_id=study.id, job_id=job.id, attempts=job.attempts, error=error[:500])
        return True


def renew(ledger: Ledger, job_id: int, lease_seconds: float) -> bool:
    """Extend our lease; False when it was lost (another worker may have taken over)."""
    now = utcnow()
    with ledger.session() as s:
        return bool(
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == WORKER_ID,
                       Job.lease_expires_at > now)
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
            ).rowcount
        )


class LeaseKeeper(threading.Thread):
    """Renews a job's lease every third of its length while the job runs."""

    def __init__(self, ledger: Ledger, job_id: int, lease_seconds: float) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.ledger, self.job_id, self.lease_seconds = ledger, job_id, lease_seconds
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.lease_seconds / 3):
            if not renew(self.ledger, self.job_id, self.lease_seconds):
                return

    def __enter__(self) -> LeaseKeeper:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()
