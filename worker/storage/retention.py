"""Retention: the bytes of a finished study are removed ``PLEURA_RETENTION_HOURS`` after the last
thing that happened to it (its last instance, its job's end, the last try of a delivery or a
notification), once nothing of it is still waiting. The ledger rows stay: the audit trail, the
findings and the embeddings (search keeps answering) outlive the bytes.

A study that grows again after its bytes were removed is processed with the images it still
has; the others are recorded as unreadable.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from worker.ledger import Delivery, Instance, Job, Notification, OutputObject, Study
from worker.ledger.db import Ledger, as_utc, utcnow
from worker.ledger.events import record
from worker.ledger.models import DeliveryState, JobState, NotificationState, StudyState
from worker.storage.base import Storage, instance_key, output_key

log = structlog.get_logger(__name__)

_OPEN_JOBS = (JobState.QUEUED, JobState.RUNNING)
_OPEN_SENDS = (DeliveryState.PENDING, DeliveryState.SENDING, NotificationState.WAITING)


def interval_seconds(hours: float) -> float:
    """How often to look: a quarter of the retention time, between 1 s and 5 min."""
    return min(300.0, max(1.0, hours * 3600 / 4))


def purge(ledger: Ledger, storage: Storage, hours: float, limit: int = 200) -> list[int]:
    """Remove the bytes of the studies that are due; their ids."""
    now = utcnow()
    cutoff = now - timedelta(hours=hours)
    with ledger.session() as s:
        candidates = s.scalars(
            select(Study.id)
            .where(Study.state.in_([StudyState.DONE, StudyState.FAILED]), Study.last_received_at < cutoff,
                   or_(Study.purged_at.is_(None), Study.purged_at < Study.last_received_at))
            .order_by(Study.last_received_at).limit(limit)
        ).all()
    purged = []
    for study_id in candidates:
        with ledger.session() as s:
            if _due(s, study_id, cutoff):
                _remove(s, storage, study_id, now)
                purged.append(study_id)
    if purged:
        log.info("retention removed the bytes of studies", studies=len(purged), hours=hours)
    return purged


def _due(s: Session, study_id: int, cutoff: datetime) -> bool:
    """Nothing of the study waits, and nothing happened to it since ``cutoff``."""
    jobs = select(Job.id).where(Job.study_id == study_id)
    if s.scalars(select(Job.id).where(Job.study_id == study_id, Job.state.in_(_OPEN_JOBS))).first():
        return False
    outputs = select(OutputObject.id).where(OutputObject.job_id.in_(jobs))
    sends = ((Delivery, Delivery.output_object_id.in_(outputs)), (Notification, Notification.job_id.in_(jobs)))
    for table, link in sends:
        if s.scalars(select(table.id).where(link, table.state.in_(_OPEN_SENDS))).first():
            return False
        last = s.scalar(select(func.max(func.coalesce(table.delivered_at, table.last_attempt_at))).where(link))
        if last is not None and as_utc(last) >= cutoff:
            return False
    last_job = s.scalar(select(func.max(Job.finished_at)).where(Job.study_id == study_id))
    return last_job is None or as_utc(last_job) < cutoff


def _remove(s: Session, storage: Storage, study_id: int, now: datetime) -> None:
    study = s.scalars(select(Study).where(Study.id == study_id).with_for_update()).one()
    instances = s.scalars(select(Instance).where(Instance.study_id == study_id)).all()
    outputs = s.scalars(select(OutputObject).join(Job).where(Job.study_id == study_id)).all()
    for instance in instances:
        storage.remove(s, instance_key(instance.sha256), instance.spool_path)
    for output in outputs:
        storage.remove(s, output_key(output.sop_instance_uid), output.path)
    study.purged_at = now
    record(s, "study_purged", study_id=study_id, instances=len(instances), outputs=len(outputs))
