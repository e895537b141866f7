"""Deliver role: C-STORE one output object to one destination, with backoff between tries."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import structlog
from sqlalchemy import and_, or_, update

from dicom_node.scu import send_files
from worker.ledger import Delivery
from worker.ledger.db import utcnow
from worker.ledger.events import record
from worker.ledger.models import DeliveryState
from worker.runtime import Runtime
from worker.settings import Destination

log = structlog.get_logger(__name__)


def deliver(rt: Runtime, delivery_id: int) -> None:
    """Claim the delivery if due, send it, record the peer's status or schedule a retry."""
    settings = rt.settings
    now = utcnow()
    with rt.ledger.session() as s:
        won = s.execute(
            update(Delivery)
            .where(
                Delivery.id == delivery_id,
                or_(
                    and_(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now),
                    and_(Delivery.state == DeliveryState.SENDING, Delivery.lease_expires_at < now),
                ),
            )
            .values(
                state=DeliveryState.SENDING,
                attempts=Delivery.attempts + 1,
                last_attempt_at=now,
                lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
            )
        ).rowcount
        if not won:
            return
        delivery = s.get(Delivery, delivery_id)
        assert delivery is not None
        path, target = Path(delivery.output.path), Destination.parse(delivery.destination)

    status: int | None = None
    permanent = False
    try:
        result = send_files(target.host, target.port, [path], called_ae=target.ae_title,
                            calling_ae=settings.ae_title)[0]
        status, error, ok, permanent = result.status, result.error, result.ok, result.permanent
        if not ok and error is None:
            error = f"peer answered status 0x{status:04X}" if status is not None else "no status"
    except Exception as exc:  # network, association and file errors all mean "try again"
        error, ok = f"{type(exc).__name__}: {exc}", False

    with rt.ledger.session() as s:
        delivery = s.get(Delivery, delivery_id)
        assert delivery is not None
        delivery.peer_status = status
        study_id = delivery.output.job.study_id
        if ok:
            delivery.state, delivery.delivered_at, delivery.last_error = DeliveryState.DELIVERED, utcnow(), None
            record(s, "delivered", study_id=study_id, delivery_id=delivery_id,
                   destination=delivery.destination, peer_status=status)
            return
        delivery.last_error = error
        if permanent or delivery.attempts >= settings.delivery_max_attempts:
            delivery.state = DeliveryState.FAILED
            record(s, "delivery_failed", study_id=study_id, delivery_id=delivery_id,
                   destination=delivery.destination, attempts=delivery.attempts, error=error)
            log.error("delivery failed for good", delivery_id=delivery_id, error=error)
            return
        backoff = settings.delivery_backoff_seconds * 2 ** (delivery.attempts - 1)
        delivery.state, delivery.published_at = DeliveryState.PENDING, None
        delivery.next_attempt_at = utcnow() + timedelta(seconds=backoff)
        record(s, "delivery_retry", study_id=study_id, delivery_id=delivery_id,
               destination=delivery.destination, attempts=delivery.attempts, error=error,
               retry_in_seconds=backoff)
        log.warning("delivery will be retried", delivery_id=delivery_id, retry_in_s=backoff, error=error)
