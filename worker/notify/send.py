"""Send one notification: claim its ledger row, build the message, send it, record the answer.

HL7: ``AA`` delivered; ``AE`` retried; ``AR`` FAILED; no acknowledgment in time, a broken
frame or a connection or TLS failure retried. FHIR: 2xx delivered; 408, 429 and 5xx retried;
any other status FAILED; connection or TLS failure retried. Retries back off as deliveries do
(``PLEURA_DELIVERY_BACKOFF_*``) until the delivery horizon, counted from the release.
The peer's text goes to the ledger; logs carry codes and types only (messages hold PHI).
"""

from __future__ import annotations

import http.client
import json
import ssl
from typing import NamedTuple

import structlog
from sqlalchemy.orm import Session

from dicom_node.tls import client_context
from engines import Bundle
from worker import mllp
from worker.bundles import catalogue
from worker.destinations import HL7, Hl7Peer
from worker.leases import claimed, retry_or_fail
from worker.ledger import Job, Notification
from worker.ledger.db import as_utc, utcnow
from worker.ledger.events import record
from worker.ledger.models import NotificationState
from worker.logging import log_context
from worker.notify import fhir, hl7
from worker.notify.result import StudyResult, load, triage_names
from worker.observability.metrics import NOTIFICATION_ATTEMPTS, NOTIFICATION_FAILURES, NOTIFICATION_SECONDS
from worker.runtime import Runtime

log = structlog.get_logger(__name__)


class _Answer(NamedTuple):
    """What one try ended as: ``delivered``, ``retry`` or ``failed``, the peer's code, the text."""

    outcome: str
    peer_answer: str | None = None
    text: str | None = None


def notify(rt: Runtime, notification_id: int) -> None:
    """Claim the notification if due, send it, record the peer's answer or schedule a retry."""
    with log_context(notification_id=notification_id):
        what = claimed(rt.ledger, Notification, notification_id, rt.settings.lease_seconds,
                       lambda s, row: _what_to_send(rt, s, row))
        if what is not None:
            _send(rt, notification_id, *what)


def _what_to_send(rt: Runtime, s: Session, row: Notification) -> tuple[str, str, StudyResult | None, str | None]:
    """The claimed notification's protocol and destination, and its result (None, with the problem, when it
    cannot be read)."""
    structlog.contextvars.bind_contextvars(study_id=row.job.study_id)
    try:
        bundle = _bundle(rt, row.job)
        result = load(s, row.job, row.control_id, bundle, triage_names(rt.settings.triage_findings, bundle),
                      rt.storage())
        return row.protocol, row.destination, result, None
    except (OSError, ValueError) as exc:  # the source header is gone or unreadable, the model is not installed
        return row.protocol, row.destination, None, f"the result could not be read: {type(exc).__name__}: {exc}"


def _send(rt: Runtime, notification_id: int, protocol: str, destination: str, result: StudyResult | None,
          problem: str | None) -> None:
    if result is None:
        answer = _Answer("retry", None, problem)
    elif protocol == HL7:
        answer = _send_hl7(rt, Hl7Peer.parse(destination), result)
    else:
        answer = _send_fhir(rt, destination, result)
    seconds = _record(rt, notification_id, answer)
    NOTIFICATION_ATTEMPTS.labels(protocol, answer.outcome if seconds is not False else "failed").inc()
    if isinstance(seconds, float):
        NOTIFICATION_SECONDS.labels(protocol).observe(max(seconds, 0.0))


def _bundle(rt: Runtime, job: Job) -> Bundle:
    """The bundle that produced ``job``: the loaded one, else the installed one of that name."""
    loaded = rt.engine().bundle
    if (loaded.name, loaded.version) == (job.bundle_name, job.bundle_version):
        return loaded
    found = catalogue.bundle(rt.settings, job.bundle_name or "")
    if found.version != job.bundle_version:
        raise ValueError(f"bundle {job.bundle_name} {job.bundle_version} that made this result is not installed")
    return found


def _tls(rt: Runtime) -> ssl.SSLContext:
    s = rt.settings
    return client_context(s.tls_ca_file, s.tls_cert_file, s.tls_key_file)


def _send_hl7(rt: Runtime, peer: Hl7Peer, result: StudyResult) -> _Answer:
    message = hl7.oru(result, rt.settings.ae_title)
    try:
        frame = mllp.exchange(peer.host, peer.port, message, rt.settings.notify_timeout_seconds,
                              _tls(rt) if peer.tls else None)
        ack = hl7.parse_ack(frame, result.control_id)
    except ssl.SSLError as exc:
        return _Answer("retry", None, f"TLS: {exc}")
    except (OSError, hl7.AckError) as exc:  # mllp.MllpError is an OSError
        return _Answer("retry", None, f"{type(exc).__name__}: {exc}")
    if ack.code in hl7.ACCEPTED:
        return _Answer("delivered", ack.code, ack.text or None)
    if ack.code in hl7.REFUSED:
        return _Answer("failed", ack.code, ack.text or f"the peer refused the message ({ack.code})")
    text = ack.text or "the peer could not process the message"
    if ack.code not in hl7.RETRY:
        text = f"acknowledgment code {ack.code[:8]!r} is not AA, AE or AR: {text}"
    return _Answer("retry", ack.code[:16], text)


def _send_fhir(rt: Runtime, base_url: str, result: StudyResult) -> _Answer:
    body = json.dumps(fhir.bundle(result), separators=(",", ":")).encode()
    try:
        response = fhir.post(base_url, body, rt.settings.notify_timeout_seconds,
                             _tls(rt) if base_url.startswith("https:") else None, rt.settings.notify_fhir_token_file)
    except ssl.SSLError as exc:
        return _Answer("retry", None, f"TLS: {exc}")
    except (OSError, http.client.HTTPException) as exc:
        return _Answer("retry", None, f"{type(exc).__name__}: {exc}")
    code = f"HTTP {response.status}"
    if 200 <= response.status < 300:
        return _Answer("delivered", code, None)
    if response.status in (408, 429) or response.status >= 500:
        return _Answer("retry", code, response.text)
    return _Answer("failed", code, response.text or f"the server refused the Bundle ({code})")


def _record(rt: Runtime, notification_id: int, answer: _Answer) -> float | bool | None:
    """Write the outcome; the seconds from release to delivery when delivered, False when it ended FAILED."""
    settings, now = rt.settings, utcnow()
    with rt.ledger.session() as s:
        row = s.get(Notification, notification_id)
        assert row is not None
        study_id = row.job.study_id
        row.peer_answer, row.last_error, row.lease_owner = answer.peer_answer, answer.text, None
        where = {"notification_id": notification_id, "protocol": row.protocol, "destination": row.destination}
        if answer.outcome == "delivered":
            row.state, row.delivered_at = NotificationState.DELIVERED, now
            record(s, "notified", study_id=study_id, job_id=row.job_id, peer_answer=answer.peer_answer,
                   triage=row.triage, control_id=row.control_id, **where)
            released = as_utc(row.released_at) if row.released_at else now
            return (now - released).total_seconds()
        backoff = retry_or_fail(row, settings, as_utc(row.released_at or row.created_at),
                                refused=answer.outcome == "failed")
        if backoff is None:
            reason = "peer_refused" if answer.outcome == "failed" else "horizon_passed"
            record(s, "notification_failed", study_id=study_id, job_id=row.job_id, attempts=row.attempts,
                   peer_answer=answer.peer_answer, error=answer.text, reason=reason, **where)
            log.error("notification failed for good", peer_answer=answer.peer_answer, reason=reason, **where)
            NOTIFICATION_FAILURES.labels(row.protocol, reason).inc()
            return False
        record(s, "notification_retry", study_id=study_id, job_id=row.job_id, attempts=row.attempts,
               peer_answer=answer.peer_answer, error=answer.text, retry_in_seconds=backoff, **where)
        log.warning("notification will be retried", peer_answer=answer.peer_answer, retry_in_s=backoff, **where)
        return None
