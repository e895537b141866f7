"""Deliver role: send one output object to one destination, C-STORE or DICOMweb STOW-RS
(:mod:`worker.deliver.stow`), with backoff between tries.

Retries double their delay up to a cap and go on until the delivery horizon (counted from
when the result was produced); a delivery still not accepted then ends FAILED. There is no
separate count of tries: with a capped backoff a count only restates the horizon less clearly.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import structlog
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dicom_node.scu import send_files
from dicom_node.tls import client_context
from worker.deliver import stow
from worker.deliver.stow import Answer
from worker.destinations import Destination, DicomWebDestination, parse_destination
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
from worker.settings import Settings
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


def _what_to_send(_s: Session, delivery: Delivery) -> tuple[Destination | DicomWebDestination, str, str, str, str]:
    """The claimed delivery's destination, and its object's recorded path, SOP Instance, Study and Series UIDs."""
    structlog.contextvars.bind_contextvars(study_id=delivery.output.job.study_id)
    output = delivery.output
    return (parse_destination(delivery.destination), output.path, output.sop_instance_uid,
            output.job.study.study_instance_uid, output.series_instance_uid)


def _send(rt: Runtime, delivery_id: int, target: Destination | DicomWebDestination, recorded: str, uid: str,
          study_uid: str, series_uid: str) -> None:
    settings = rt.settings
    try:
        tls = (client_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
               if target.tls else None)
        with fetched(rt.storage(), output_key(uid), recorded) as path:
            if isinstance(target, DicomWebDestination):
                answer = stow.store(target, path, uid, study_uid, series_uid, tls, settings.destination_token_file)
            else:
                answer = _c_store(settings, target, path, tls)
    except Exception as exc:  # network, association, HTTP and file errors all mean "try again"
        answer = Answer(None, False, error=f"{type(exc).__name__}: {exc}")
    # the peer has the object now: losing this write (a database restart) would send it twice
    done = _retrying(lambda: _record_outcome(rt, delivery_id, answer),
                     rt.settings.lease_seconds / 2)  # well inside the delivery's lease
    DELIVERY_ATTEMPTS.labels(done.outcome).inc()
    if done.seconds is not None:
        observe_stage("results_to_delivered", done.seconds)
    if done.reason is not None:
        DELIVERY_FAILURES.labels(done.reason).inc()
    for notification_id in done.released:
        rt.publish(NOTIFY_TASK, notification_id)


def _c_store(settings: Settings, target: Destination, path: Path, tls: ssl.SSLContext | None) -> Answer:
    """One C-STORE on its own association; the peer's DIMSE status decides."""
    result = send_files(target.host, target.port, [path], called_ae=target.ae_title,
                        calling_ae=settings.ae_title, tls=tls)[0]
    error = result.error
    if not result.ok and error is None:
        error = f"peer answered status 0x{result.status:04X}" if result.status is not None else "no status"
    return Answer(result.status, result.ok, result.permanent, error)


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


def _record_outcome(rt: Runtime, delivery_id: int, answer: Answer) -> _Outcome:
    settings = rt.settings
    with rt.ledger.session() as s:
        delivery = s.get(Delivery, delivery_id)
        assert delivery is not None
        delivery.peer_status = status = answer.status
        study_id = delivery.output.job.study_id
        where = {"delivery_id": delivery_id, "destination": delivery.destination}
        if answer.checked is not None:
            record(s, "delivery_checked", study_id=study_id, **where, **answer.checked)
        if answer.ok:
            delivery.state, delivery.delivered_at, delivery.last_error = DeliveryState.DELIVERED, utcnow(), None
            record(s, "delivered", study_id=study_id, peer_status=status, **where)
            return _Outcome("delivered", (delivery.delivered_at - as_utc(delivery.output.created_at)).total_seconds(),
                            released=_release(s, delivery))
        # the peer's own words go to the ledger only: the logs get our reason
        delivery.last_error = error = f"{answer.error}: {answer.text}" if answer.text else answer.error
        backoff = retry_or_fail(delivery, settings, as_utc(delivery.output.created_at), answer.permanent)
        if backoff is None:
            record(s, "delivery_failed", study_id=study_id, attempts=delivery.attempts, error=error,
                   reason="peer refused permanently" if answer.permanent else "delivery horizon passed", **where)
            log.error("delivery failed for good", delivery_id=delivery_id, error=answer.error)
            return _Outcome("failed", reason="peer_refused" if answer.permanent else "horizon_passed",
                            released=_release(s, delivery))
        record(s, "delivery_retry", study_id=study_id, attempts=delivery.attempts, error=error,
               retry_in_seconds=backoff, **where)
        log.warning("delivery will be retried", delivery_id=delivery_id, retry_in_s=backoff, error=answer.error)
        return _Outcome("retry")


def _release(s: Session, delivery: Delivery) -> tuple[int, ...]:
    """The result's notifications that this SR delivery's end lets leave."""
    if delivery.output.kind != SR_KIND:
        return ()
    return tuple(release.after_sr_delivery(s, delivery, utcnow()))
