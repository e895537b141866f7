"""When a result's notifications are made and when they may leave.

A job that analysed images gets one notification per RIS destination with its results. It
waits (``WAITING``) until the result's SR is delivered to a DICOM destination, so the worklist
flag never points at a study whose result the PACS does not have yet; it leaves at once when
no DICOM destination is configured, and when every delivery of the SR ended FAILED (the
message carries the findings itself; the flag should not wait a day for a PACS).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from engines import Bundle
from worker.destinations import FHIR, HL7
from worker.ledger import Delivery, Finding, Notification, OutputObject
from worker.ledger.events import record
from worker.ledger.models import DeliveryState, NotificationState
from worker.notify.result import CRITICAL, control_id, study_findings, triage_names
from worker.settings import Settings


def destinations(settings: Settings) -> list[tuple[str, str]]:
    """(protocol, destination) for every configured RIS destination."""
    return [(HL7, str(peer)) for peer in settings.notify_hl7] + [(FHIR, url) for url in settings.notify_fhir]


def create(s: Session, settings: Settings, bundle: Bundle, job_id: int, sr: OutputObject,
           now: datetime) -> list[int]:
    """Add the notifications of a job's result (SR ``sr``); the ids that may leave now."""
    targets = destinations(settings)
    if not targets or not s.scalars(select(Finding.id).where(Finding.job_id == job_id)).first():
        return []
    triage = triage_names(settings.triage_findings, bundle)
    flagged = any(f.flag == CRITICAL for f in study_findings(s, job_id, bundle, triage))
    now_ready = not settings.destinations
    ready: list[int] = []
    for protocol, destination in targets:
        row = Notification(
            job_id=job_id, sr_output_id=sr.id, protocol=protocol, destination=destination,
            control_id=control_id(sr.sop_instance_uid), triage=flagged, created_at=now,
            state=NotificationState.PENDING if now_ready else NotificationState.WAITING,
            released_at=now if now_ready else None, next_attempt_at=now if now_ready else None,
            published_at=now if now_ready else None)
        s.add(row)
        s.flush()
        if now_ready:
            ready.append(row.id)
    return ready


def after_sr_delivery(s: Session, delivery: Delivery, now: datetime) -> list[int]:
    """Release the notifications waiting for ``delivery``'s SR once it is delivered, or once no
    delivery of it is left to try; the ids released (to publish after commit)."""
    if delivery.state != DeliveryState.DELIVERED and s.scalars(
        select(Delivery.id).where(Delivery.output_object_id == delivery.output_object_id,
                                  Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]))
    ).first():
        return []
    ids = list(s.scalars(
        update(Notification)
        .where(Notification.sr_output_id == delivery.output_object_id, Notification.state == NotificationState.WAITING)
        .values(state=NotificationState.PENDING, released_at=now, next_attempt_at=now, published_at=now)
        .returning(Notification.id)
    ))
    if ids and delivery.state != DeliveryState.DELIVERED:
        output = s.get(OutputObject, delivery.output_object_id)
        assert output is not None
        record(s, "notifications_released", study_id=output.job.study_id, job_id=output.job_id,
               notification_ids=ids, reason="no delivery of the SR succeeded")
    return ids
