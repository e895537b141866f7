"""Deliver role: C-STORE one output object to one destination, with backoff between tries.

Retries double their delay up to a cap and go on until the delivery horizon (counted from
when the result was produced); a delivery still not accepted then ends FAILED. There is no
separate count of tries: with a capped backoff a count only restates the horizon less clearly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import structlog
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dicom_node.scu import send_files
from dicom_node.tls import client_context
from worker.destinations import Destination
from worker.leases import claimed, retry_or_fail
from worker.ledger import Delivery
from worker.ledger.db import as_utc, utcnow
from worker.ledger.events import record
from worker.ledger.models import SR_KIND, DeliveryState
from worker.logging import log_context
from worker.notify import release
from worker.observability.metrics import DELIVERY_ATTEMPTS, DELIVERY_FAILURES, observe_stage
from worker.queue import NOTIFY_TASK
from worker.runtime import Runtime
from worker.storage import output_key
from worker.storage.base import fetched

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
        what = claimed(rt.ledger, Delivery, delivery_id, rt.settings.lease_seconds, _what_to_send)
        if what is not None:
            _send(rt, delivery_id, *what)


def _what_to_send(_s: Session, delivery: Delivery) -> tuple[Destination, str, str]:
    """The claimed delivery's destination, and its object's recorded path and SOP Instance UID."""
    structlog.contextvars.bind_contextvars(study_id=delivery.output.job.study_id)
    return Destination.parse(delivery.destination), delivery.output.path, delivery.output.sop_instance_uid


def _send(rt: Runtime, delivery_id: int, target: Destination, recorded: str, uid: str) -> None:
    settings = rt.settings
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
        backoff = retry_or_fail(delivery, settings, as_utc(delivery.output.created_at), permanent)
        if backoff is None:
            record(s, "delivery_failed", study_id=study_id, delivery_id=delivery_id,
                   destination=delivery.destination, attempts=delivery.attempts, error=error,
                   reason="peer refused permanently" if permanent else "delivery horizon passed")
            log.error("delivery failed for good", delivery_id=delivery_id, error=error)
            return _Outcome("failed", reason="peer_refused" if permanent else "horizon_passed",
                            released=_release(s, delivery))
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
