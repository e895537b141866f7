"""Claiming and finishing jobs with a lease: what makes a duplicated message harmless."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import structlog
from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from worker.leases import owner
from worker.ledger import Attempt, Job, Study
from worker.ledger.db import Ledger, as_utc, utcnow
from worker.ledger.events import record
from worker.ledger.models import JobState, StudyState
from worker.observability.metrics import observe_stage

log = structlog.get_logger(__name__)

#: ``attempts.outcome`` (at most 16 characters) of an attempt that a ledger outage ended, not charged.
LEDGER_DOWN = "LEDGER_DOWN"
#: SQLSTATEs (prefixes) of a server that cannot be reached or dropped us: connection exception,
#: administrator or crash shutdown, cannot connect now, too many connections.
_OUTAGE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")


class LeaseLost(RuntimeError):
    """Another worker took the job over (our lease expired); our results are dropped."""


def claim(ledger: Ledger, job_id: int, lease_seconds: float, max_attempts: int = 3) -> int | None:
    """Take the job if it is queued or its lease expired; return the attempt id, else None.

    A job whose lease expired after ``max_attempts`` attempts is quarantined here instead: its
    worker died every time (a crash or an out-of-memory kill never reaches :func:`fail`).
    """
    now = utcnow()
    claimable = or_(
        Job.state == JobState.QUEUED,
        and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
    )
    with ledger.session() as s:
        won = s.execute(
            update(Job)
            .where(Job.id == job_id, claimable, Job.attempts < max_attempts)
            .values(
                state=JobState.RUNNING,
                lease_owner=owner(),
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1,
            )
        ).rowcount
        if not won:
            _quarantine_exhausted(s, job_id, claimable, max_attempts)
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
        attempt = Attempt(job_id=job_id, number=job.attempts, worker=owner(), started_at=now)
        s.add(attempt)
        s.flush()
        record(s, "job_started", study_id=study.id, job_id=job.id, attempt=job.attempts, worker=owner())
        attempt_id, first, waited = attempt.id, job.attempts == 1, (now - as_utc(job.created_at)).total_seconds()
    if first:  # a retry's wait would count the failed attempts again
        observe_stage("queued_to_processing", waited)
    return attempt_id


def _quarantine_exhausted(s: Session, job_id: int, claimable: ColumnElement[bool], max_attempts: int) -> None:
    """FAIL a claimable job that has used up its attempts, with the reason, in the claim's transaction."""
    now = utcnow()
    if not s.execute(
        update(Job)
        .where(Job.id == job_id, claimable, Job.attempts >= max_attempts)
        .values(state=JobState.FAILED, finished_at=now, lease_owner=None)
    ).rowcount:
        return
    job = s.get(Job, job_id)
    assert job is not None
    died = s.scalar(select(func.count()).select_from(Attempt)
                    .where(Attempt.job_id == job_id, Attempt.finished_at.is_(None))) or 0
    reason = f"worker died {died} times (lease expired)"
    if died < job.attempts and job.error:
        reason += f"; last error: {job.error[:300]}"
    job.error = reason
    _fail_study(s, job, reason)


def _fail_study(s: Session, job: Job, reason: str) -> None:
    study = s.get(Study, job.study_id)
    assert study is not None
    if study.revision == job.revision:
        study.state, study.note = StudyState.FAILED, f"processing failed: {reason[:500]}"
    record(s, "job_failed", study_id=study.id, job_id=job.id, attempts=job.attempts, error=reason[:500])


def previous_attempt_died(ledger: Ledger, job_id: int) -> bool:
    """True when the job's latest attempt never finished: its worker may have been killed by it."""
    with ledger.session() as s:
        latest = s.scalars(select(Attempt).where(Attempt.job_id == job_id)  # numbers repeat after give_back
                           .order_by(Attempt.id.desc()).limit(1)).first()
        return latest is not None and latest.finished_at is None


class Isolation:
    """A shared/exclusive lock between the jobs of one worker process (writers preferred).

    A job whose previous attempt died runs alone: if it kills the process again, no other
    study dies with it (and is charged an attempt it did not cause). Jobs take the lock
    before they claim, so a job waiting here has not been charged an attempt either.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        with self._cond:
            if exclusive:
                self._waiting_exclusive += 1
                self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                self._waiting_exclusive -= 1
                self._exclusive = True
            else:
                self._cond.wait_for(lambda: not self._exclusive and self._waiting_exclusive == 0)
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()


def still_owned(s: Session, job: Job) -> bool:
    """True while our lease holds (re-read under a row lock inside the finishing transaction)."""
    fresh = s.scalars(select(Job).where(Job.id == job.id).with_for_update()).one()
    return fresh.lease_owner == owner() and fresh.state == JobState.RUNNING and (
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
        if job.lease_owner != owner() or job.state != JobState.RUNNING:
            return False
        job.error = error[:2000]
        if job.attempts >= max_attempts:
            job.state, job.finished_at = JobState.FAILED, now
            _fail_study(s, job, error)
            return False
        _requeue(s, job, error=error[:500])
        return True


def _requeue(s: Session, job: Job, **detail: object) -> None:
    """QUEUED again, unpublished and without a lease: the sweeper publishes it again."""
    job.state, job.published_at, job.lease_owner = JobState.QUEUED, None, None
    record(s, "job_retry", study_id=job.study_id, job_id=job.id, attempts=job.attempts, **detail)


def ledger_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` says the ledger could not be reached or dropped the connection.

    An error the server answered with (a statement timeout, a deadlock, a full disk) is no outage:
    the study may cause it again, so it is charged like any failure.
    """
    if isinstance(exc, InterfaceError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return True
    if not isinstance(exc, OperationalError):
        return False
    code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)  # psycopg2, psycopg 3
    return code is None or code.startswith(_OUTAGE_SQLSTATES)


def give_back(ledger: Ledger, job_id: int, attempt_id: int, error: BaseException, within: float) -> None:
    """Finish an attempt that a ledger outage (:func:`ledger_unreachable`) ended, without charging it.

    Tried again while the ledger stays unreachable, 0.5 s apart doubling to 5 s, for ``within``
    seconds (the lease's length). The attempt ends ``LEDGER_DOWN``; while this worker still holds
    the lease the job gets the attempt back and is QUEUED again (a ``job_retry`` event with
    ``charged=False``). When the ledger does not answer in time, or the worker is killed first,
    the attempt stays open and charged and the lease-expiry path applies: the sweeper re-publishes
    the job, and the claim after the last attempt quarantines it.
    """
    kind = type(error).__name__
    message = str(getattr(error, "orig", error)).partition("\n")[0]  # the driver's words, not the SQL
    deadline, pause = time.monotonic() + within, 0.5
    while True:
        try:
            _give_back(ledger, job_id, attempt_id, f"ledger unreachable: {kind}: {message}", kind)
            return
        except SQLAlchemyError as exc:
            left = deadline - time.monotonic()
            if not ledger_unreachable(exc) or left <= 0:
                log.warning("attempt not recorded; its lease will expire", job_id=job_id, error=type(exc).__name__)
                return
        log.warning("ledger unreachable; retrying to give the attempt back", job_id=job_id,
                    retry_in_s=round(min(pause, left), 2))
        time.sleep(min(pause, left))  # the last try at the deadline
        pause = min(2 * pause, 5.0)


def _give_back(ledger: Ledger, job_id: int, attempt_id: int, error: str, kind: str) -> None:
    with ledger.session() as s:
        job = s.get(Job, job_id, with_for_update=True)  # a claim of another worker decides first
        attempt = s.get(Attempt, attempt_id)
        assert job is not None and attempt is not None
        attempt.finished_at, attempt.outcome, attempt.error = utcnow(), LEDGER_DOWN, error[:2000]
        if job.lease_owner != owner() or job.state != JobState.RUNNING:
            return
        job.attempts -= 1
        _requeue(s, job, charged=False, error=kind)


def renew(ledger: Ledger, job_id: int, lease_seconds: float) -> bool:
    """Extend our lease; False when it was lost (another worker may have taken over)."""
    now = utcnow()
    with ledger.session() as s:
        return bool(
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == owner(),
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
            try:
                if not renew(self.ledger, self.job_id, self.lease_seconds):
                    return
            except SQLAlchemyError as exc:  # database restarting: try again; the lease may still hold
                log.warning("lease renewal failed; retrying", job_id=self.job_id, error=type(exc).__name__)

    def __enter__(self) -> LeaseKeeper:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()
