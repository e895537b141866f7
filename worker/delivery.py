"""Deliver role: C-STORE one output object to one destination, with backoff between tries.

Retries double their delay up to a cap and go on until the delivery horizon (counted from
when the result was produced); a delivery still not accepted then ends FAILED. There is no
separate count of tries: with a capped backoff a count only restates the horizon less clearly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import NamedTuple

import structlog
from sqlalchemy import and_, or_, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dicom_node.scu import send_files
from dicom_node.tls import client_context
from worker.ledger import Delivery
from worker.ledger.db import as_utc, utcnow
from worker.ledger.events import record
from worker.ledger.models import DeliveryState
from worker.logging import log_context
from worker.notify import release
from worker.observability.metrics import DELIVERY_ATTEMPTS, DELIVERY_FAILURES, observe_stage
from worker.recovery import owner
from worker.result_objects import SR_KIND
from worker.runtime import Runtime
from worker.settings import Destination, Settings
from worker.storage import output_key
from worker.storage.base import fetched
from worker.sweeper import NOTIFY_TASK

log = structlog.get_logger(__name__)


class _Outcome(NamedTuple):
    """What one try ended as: ``delivered`` (with the time since the result was produced), ``retry`` or
    ``failed`` (with the reason)."""

    outcome: str
    seconds: float | None = None
    reason: str | None = None
    #: notifications this outcome released (worker.notify.release), to publish
    released: tuple[int, ...] = ()


def deliver(rt: Runtime, delivery_id: int) -> None:
    """Claim the delivery if due, send it, record the peer's status or schedule a retry."""
    with log_context(delivery_id=delivery_id):
        _deliver(rt, delivery_id)


def _deliver(rt: Runtime, delivery_id: int) -> None:
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
                lease_owner=owner(),
                lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
            )
        ).rowcount
        if not won:
            return
        delivery = s.get(Delivery, delivery_id)
        assert delivery is not None
        recorded, uid = delivery.output.path, delivery.output.sop_instance_uid
        target = Destination.parse(delivery.destination)
        structlog.contextvars.bind_contextvars(study_id=delivery.output.job.study_id)

    status: int | None = None
    permanent = False
    try:
        tls = (client_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
               if target.tls else None)
        with fetched(rt.storage(), output_key(uid), recorded) as path:
            result = send_files(target.host, target.port, [path], called_ae=target.ae_title,
                                calling_ae=settings.ae_title, tls=tls)[0]
        status, error, ok, permanent = result.status, result.error, result.ok, result.permanent
        if not ok and error is None:
            error = f"peer answered status 0x{status:04X}" if status is not None else "no status"
    except Exception as exc:  # network, association and file errors all mean "try again"
        error, ok = f"{type(exc).__name__}: {exc}", False
    # the peer has the object now: losing this write (a database restart) would send it twice
    done = _retrying(lambda: _record_outcome(rt, delivery_id, status, error, ok, permanent),
                     rt.settings.lease_seconds / 2)  # well inside the delivery's lease
    DELIVERY_ATTEMPTS.labels(done.outcome).inc()
    if done.seconds is not None:
        observe_stage("results_to_delivered", done.seconds)
    if done.reason is not None:
        DELIVERY_FAILURES.labels(done.reason).inc()
    for notification_id in done.released:
        rt.publish(NOTIFY_TASK, notification_id)


def _retrying(write: Callable[[], _Outcome], seconds: float) -> _Outcome:
    """Run a ledger write, retrying while the database is unreachable for up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return write()
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            log.warning("ledger unreachable; retrying the delivery outcome")
            time.sleep(0.5)


def _record_outcome(rt: Runtime, delivery_id: int, status: int | None, error: str | None, ok: bool,
                    permanent: bool) -> _Outcome:
    settings = rt.settings
    with rt.ledger.session() as s:
        delivery = s.get(Delivery, delivery_id)
        assert delivery is not None
        delivery.peer_status = status
        study_id = delivery.output.job.study_id
        if ok:
            delivery.state, delivery.delivered_at, delivery.last_error = DeliveryState.DELIVERED, utcnow(), None
            record(s, "delivered", study_id=study_id, delivery_id=delivery_id,
                   destination=delivery.destination, peer_status=status)
            return _Outcome("delivered", (delivery.delivered_at - as_utc(delivery.output.created_at)).total_seconds(),
                            released=_release(s, delivery))
        delivery.last_error = error
        deadline = as_utc(delivery.output.created_at) + timedelta(seconds=settings.delivery_horizon_seconds)
        now = utcnow()
        if permanent or now >= deadline:
            delivery.state = DeliveryState.FAILED
            record(s, "delivery_failed", study_id=study_id, delivery_id=delivery_id,
                   destination=delivery.destination, attempts=delivery.attempts, error=error,
                   reason="peer refused permanently" if permanent else "delivery horizon passed")
            log.error("delivery failed for good", delivery_id=delivery_id, error=error)
            return _Outcome("failed", reason="peer_refused" if permanent else "horizon_passed",
                            released=_release(s, delivery))
        backoff = backoff_seconds(settings, delivery.attempts)
        delivery.state, delivery.published_at = DeliveryState.PENDING, None
        delivery.next_attempt_at = min(now + timedelta(seconds=backoff), deadline)  # a last try at the horizon
        record(s, "delivery_retry", study_id=study_id, delivery_id=delivery_id,
               destination=delivery.destination, attempts=delivery.attempts, error=error,
               retry_in_seconds=backoff)
        log.warning("delivery will be retried", delivery_id=delivery_id, retry_in_s=backoff, error=error)
        return _Outcome("retry")


def _release(s: Session, delivery: Delivery) -> tuple[int, ...]:
    """The result's notifications that this SR delivery's end lets leave."""
    if delivery.output.kind != SR_KIND:
        return ()
    return tuple(release.after_sr_delivery(s, delivery, utcnow()))


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """Delay after the ``attempts``-th failed try: doubling from the first delay, capped."""
    return min(settings.delivery_backoff_seconds * 2 ** min(attempts - 1, 60), settings.delivery_backoff_max_seconds)
