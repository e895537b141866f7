"""Assemble role: a periodic sweep over ledger timestamps that queues and re-queues work.

The sweep is the only place that decides a study is complete (:mod:`worker.assemble.completion`)
and the only place that re-publishes lost work, so a restart of any process loses
nothing: the next sweep finds what the ledger says is due. Several sweepers may run at once;
every transition is a conditional UPDATE that only one of them wins.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from worker.assemble.completion import Completion
from worker.ledger import Delivery, Job, Notification, Study
from worker.ledger.db import Ledger, as_utc, utcnow
from worker.ledger.events import record
from worker.ledger.models import DeliveryState, JobState, StudyState
from worker.observability.metrics import STUDIES_COMPLETED, observe_stage
from worker.queue import DELIVER_TASK, NOTIFY_TASK, PROCESS_TASK, Publish
from worker.reports.store import match_pending

log = structlog.get_logger(__name__)

@dataclass
class SweepReport:
    queued: list[int] = field(default_factory=list)
    republished_jobs: list[int] = field(default_factory=list)
    published_deliveries: list[int] = field(default_factory=list)
    published_notifications: list[int] = field(default_factory=list)
    matched_reports: list[int] = field(default_factory=list)


def sweep(ledger: Ledger, quiet_seconds: float, republish_seconds: float, publish: Publish,
          settle_seconds: float | None = None, max_wait_seconds: float | None = None) -> SweepReport:
    """Queue complete studies (:mod:`worker.assemble.completion`), re-publish lost work, due deliveries and
    notifications; publish after commit. Then match the RIS reports whose study has arrived since
    (:func:`worker.reports.store.match_pending`).

    A message is re-sent when its row was never published (or the publish failed), when the
    lease of the worker that took it expired since, or, as a backstop against a broker that
    lost it (a killed worker's reserved messages, on Redis), every ``republish_seconds`` while
    the row stays unclaimed: a long backlog is not multiplied.
    """
    report = SweepReport()
    now = utcnow()
    for rule, complete in Completion(quiet_seconds, settle_seconds, max_wait_seconds).rules(now):
        _queue_complete(ledger, rule, complete, now, report)

    stale = now - timedelta(seconds=republish_seconds)
    with ledger.session() as s:
        jobs = s.scalars(
            select(Job).where(
                or_(
                    and_(Job.state == JobState.QUEUED,
                         or_(Job.published_at.is_(None), Job.published_at < stale)),
                    and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now,
                         or_(Job.published_at.is_(None), Job.published_at < Job.lease_expires_at,
                             Job.published_at < stale)),
                ),
            ).with_for_update(skip_locked=True)
        ).all()
        for job in jobs:
            job.published_at = now
            record(s, "job_republished", study_id=job.study_id, job_id=job.id, state=job.state)
            report.republished_jobs.append(job.id)
        for delivery in _due(s, Delivery, now, stale):
            delivery.published_at = now
            report.published_deliveries.append(delivery.id)
        for notification in _due(s, Notification, now, stale):
            notification.published_at = now
            report.published_notifications.append(notification.id)

    unsent_jobs = [i for i in report.queued + report.republished_jobs if not publish(PROCESS_TASK, i)]
    unsent_deliveries = [i for i in report.published_deliveries if not publish(DELIVER_TASK, i)]
    unsent_notifications = [i for i in report.published_notifications if not publish(NOTIFY_TASK, i)]
    if unsent_jobs or unsent_deliveries or unsent_notifications:  # the next sweep tries them again
        with ledger.session() as s:
            s.execute(update(Job).where(Job.id.in_(unsent_jobs)).values(published_at=None))
            s.execute(update(Delivery).where(Delivery.id.in_(unsent_deliveries)).values(published_at=None))
            s.execute(update(Notification).where(Notification.id.in_(unsent_notifications))
                      .values(published_at=None))
    if report.queued or report.republished_jobs:
        log.info("sweep", queued=report.queued, republished=report.republished_jobs)
    report.matched_reports = match_pending(ledger)
    return report


def _due(s: Session, row: type[Delivery] | type[Notification], now: datetime, stale: datetime) -> list[Any]:
    """Deliveries (or notifications: the same states) to publish: due and never published (or a
    publish that failed) or published ``stale`` ago, and those whose sender's lease expired since."""
    return list(s.scalars(
        select(row).where(
            or_(
                and_(row.state == DeliveryState.PENDING, row.next_attempt_at <= now,
                     or_(row.published_at.is_(None), row.published_at < stale)),
                and_(row.state == DeliveryState.SENDING, row.lease_expires_at < now,
                     or_(row.published_at.is_(None), row.published_at < row.lease_expires_at,
                         row.published_at < stale)),
            ),
        ).with_for_update(skip_locked=True)
    ).all())


def _queue_complete(ledger: Ledger, rule: str, complete: ColumnElement[bool], now: datetime,
                    report: SweepReport) -> None:
    """Queue a job for each receiving study that ``complete`` holds for; one sweeper wins each."""
    with ledger.session() as s:
        due = s.execute(
            select(Study.id, Study.revision, Study.last_received_at)
            .where(Study.state == StudyState.RECEIVING, complete)
        ).all()
    for study_id, revision, last_received_at in due:
        with ledger.session() as s:
            won = s.execute(
                update(Study)
                .where(Study.id == study_id, Study.state == StudyState.RECEIVING, Study.revision == revision,
                       complete)
                .values(state=StudyState.QUEUED, queued_at=now)
            ).rowcount
            if won:
                job = Job(study_id=study_id, revision=revision, state=JobState.QUEUED,
                          created_at=now, published_at=now, completed_by=rule)
                s.add(job)
                s.flush()
                record(s, "study_queued", study_id=study_id, job_id=job.id, revision=revision, completed_by=rule)
                report.queued.append(job.id)
        if won:
            STUDIES_COMPLETED.labels(rule).inc()
            observe_stage("received_to_queued", (now - as_utc(last_received_at)).total_seconds())


class Sweeper(threading.Thread):
    """Runs ``run_once`` (:func:`sweep`, say) every ``interval`` seconds, and at the times asked with
    :meth:`wake_in`, until ``stop()``; errors are logged. ``interval`` None: only when asked."""

    def __init__(self, interval: float | None, run_once: Callable[[], object]) -> None:
        super().__init__(name="pleura-sweeper", daemon=True)
        self.interval = interval
        self.run_once = run_once
        self._cond = threading.Condition()
        self._stopped = False
        self._wake_at: list[float] = []  # a heap of monotonic times

    def wake_in(self, seconds: float) -> None:
        """Run once more ``seconds`` from now (besides the interval; every such request is kept)."""
        with self._cond:
            heapq.heappush(self._wake_at, time.monotonic() + seconds)
            self._cond.notify()

    def run(self) -> None:
        regular = time.monotonic()
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    now = time.monotonic()
                    due = min(regular, self._wake_at[0] if self._wake_at else math.inf)
                    if now >= due:
                        break
                    self._cond.wait(None if math.isinf(due) else due - now)
                while self._wake_at and self._wake_at[0] <= now:  # one run answers all that are due
                    heapq.heappop(self._wake_at)
            if now >= regular:
                regular = now + self.interval if self.interval is not None else math.inf
            try:
                self.run_once()
            except Exception:
                log.exception("sweep failed; retrying at the next interval")

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
