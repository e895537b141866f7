"""FHIR R4 ``DiagnosticReport`` final reports in: ``POST /fhir/DiagnosticReport`` on ``PLEURA_HTTP_PORT``.

The client sends ``Authorization: Bearer <token>``, the token being the content of
``PLEURA_REPORTS_TOKEN_FILE`` (read at every request, so it can be rotated in place; unset: FHIR
reports are off). What is read (docs/hl7.md, Inbound):

- text: the ``text/plain`` ``presentedForm`` attachments (``data``, base64), then ``conclusion`` unless
  one of them holds it already
- status: ``preliminary``; ``final``; ``amended``, ``corrected``, ``appended`` as corrected
- accession number: an identifier of type ``ACSN`` (v2-0203) or whose system names an accession, on
  the report, in ``basedOn`` or ``imagingStudy`` (logical references), or on a contained
  ServiceRequest or ImagingStudy
- Study Instance UID: an ImagingStudy identifier (``imagingStudy`` or contained) of system
  ``urn:dicom:uid`` or whose value begins ``urn:oid:`` or ``urn:dicom:uid:``
- reported at: ``issued``
- message id: ``DiagnosticReport/<id>`` (or its first other identifier, ``system|value``) and a digest
  of what is stored, so an identical resend is the same message and an amended one a new report

Answers: 201 (stored; ``Location``), 200 (an identical resend), 400 (not JSON, not a DiagnosticReport),
401 (token), 404 (off), 408 (the body did not arrive in time), 413, 415, 422 (a DiagnosticReport
Pleura cannot use), 500 (the labeler failed), 503 (the ledger is unavailable, or the token file
cannot be read); errors as an OperationOutcome without patient values.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import structlog
from sqlalchemy.exc import DBAPIError

from worker.ledger.models import ReportStatus
from worker.reports.store import IncomingReport, Intake
from worker.settings import Settings
from worker.web.server import PostRoute, Request, Response

log = structlog.get_logger(__name__)

PATH = "/fhir/DiagnosticReport"
FHIR_JSON = "application/fhir+json"
STATUSES = {"preliminary": ReportStatus.PRELIMINARY, "final": ReportStatus.FINAL,
            "amended": ReportStatus.CORRECTED, "corrected": ReportStatus.CORRECTED,
            "appended": ReportStatus.CORRECTED}
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


class _Refused(Exception):
    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


def route(settings: Settings, intake: Intake | None) -> PostRoute:
    """The POST route; ``intake`` None when FHIR reports are off (``PLEURA_REPORTS_TOKEN_FILE`` unset)."""
    def handle(request: Request) -> Response:
        if intake is None or settings.reports_token_file is None:
            return outcome(HTTPStatus.NOT_FOUND, "error", "not-supported", "FHIR reports are off on this Pleura: "
                           "set PLEURA_REPORTS_TOKEN_FILE to take DiagnosticReports")
        try:
            return _handle(settings, intake, request)
        except _Refused as refused:
            intake.refuse("fhir", request.client, refused.reason, http_status=refused.status)
            log.warning("fhir report refused", client=request.client, status=refused.status, reason=refused.reason)
            extra = (("WWW-Authenticate", "Bearer"),) if refused.status == HTTPStatus.UNAUTHORIZED else ()
            return outcome(refused.status, "error", refused.code, refused.reason, extra)

    return PostRoute(handle, settings.hl7_max_message_kb * 1024, settings.hl7_timeout_seconds)


def outcome(status: int, severity: str, code: str, diagnostics: str,
            headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """An OperationOutcome with one issue."""
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}
    return Response(status, FHIR_JSON + "; charset=utf-8", json.dumps(body).encode(), headers)


def _handle(settings: Settings, intake: Intake, request: Request) -> Response:
    _authorise(settings, request)
    if request.body is None:
        raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too-long",
                       f"the body is larger than {settings.hl7_max_message_kb} KiB (PLEURA_HL7_MAX_MESSAGE_KB)")
    kind = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if kind not in (FHIR_JSON, "application/json"):
        raise _Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "not-supported",
                       f"Content-Type {kind[:60] or '(none)'!r}: send application/fhir+json")
    try:
        resource = json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Refused(HTTPStatus.BAD_REQUEST, "structure", f"the body is not JSON ({type(exc).__name__})") from exc
    if not isinstance(resource, dict) or resource.get("resourceType") != "DiagnosticReport":
        kind = resource.get("resourceType") if isinstance(resource, dict) else type(resource).__name__
        raise _Refused(HTTPStatus.BAD_REQUEST, "structure",
                       f"the body is a {str(kind)[:40]!r}, not a DiagnosticReport resource")
    report = _read(resource, request.client)
    try:
        stored = intake.store(report)
    except Exception as exc:  # the ledger or the labeler failed: nothing was stored, the client retries
        log.error("fhir report not stored", client=request.client, error=type(exc).__name__)
        if isinstance(exc, DBAPIError):
            raise _Refused(HTTPStatus.SERVICE_UNAVAILABLE, "transient",
                           "the report could not be stored now (database unavailable); send it again") from exc
        raise _Refused(HTTPStatus.INTERNAL_SERVER_ERROR, "exception",
                       f"the report could not be stored ({type(exc).__name__})") from exc
    location = f"{PATH}/{stored.report_id}"
    log.info("fhir report stored", client=request.client, report_id=stored.report_id, resend=not stored.created,
             matched=stored.study_id is not None)
    said = "stored" if stored.created else "already received"
    matched = "matched to its study" if stored.study_id is not None else "waiting for its study"
    return outcome(HTTPStatus.CREATED if stored.created else HTTPStatus.OK, "information", "informational",
                   f"{said} as DiagnosticReport/{stored.report_id}, {matched}",
                   (("Location", location), ("ETag", 'W/"1"')))


def _authorise(settings: Settings, request: Request) -> None:
    assert settings.reports_token_file is not None
    try:
        token = settings.reports_token_file.read_text().strip()
    except OSError as exc:
        log.error("reports token file unreadable", path=str(settings.reports_token_file), error=type(exc).__name__)
        raise _Refused(HTTPStatus.SERVICE_UNAVAILABLE, "exception",
                       "the reports token file (PLEURA_REPORTS_TOKEN_FILE) cannot be read") from exc
    if not token:
        raise _Refused(HTTPStatus.SERVICE_UNAVAILABLE, "exception",
                       "the reports token file (PLEURA_REPORTS_TOKEN_FILE) is empty")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise _Refused(HTTPStatus.UNAUTHORIZED, "login", "a valid bearer token is required (Authorization: Bearer)")


def _read(resource: dict[str, Any], client: str) -> IncomingReport:
    """The report a DiagnosticReport carries; _Refused (422) with the reason when Pleura cannot use it."""
    status = resource.get("status")
    if status not in STATUSES:
        raise _unusable(f"status {str(status)[:30]!r} is not one Pleura takes ({', '.join(STATUSES)})")
    text = _text(resource)
    contained = {c.get("id"): c for c in _list(resource, "contained") if isinstance(c, dict)}
    studies = [_referenced(r, contained, "ImagingStudy") for r in _list(resource, "imagingStudy")]
    orders = [_referenced(r, contained, "ServiceRequest") for r in _list(resource, "basedOn")]
    identifiers = [i for i in _list(resource, "identifier") if isinstance(i, dict)]
    candidates = identifiers + [i for group in studies + orders for i in group]
    accession = next((str(i["value"]).strip() for i in candidates if _is_accession(i) and i.get("value")), None)
    uid = next((u for u in (_study_uid(i) for group in studies for i in group) if u), None)
    if uid is not None and (len(uid) > 64 or not _UID.match(uid)):
        raise _unusable("the ImagingStudy's Study Instance UID is not a DICOM UID (digits and dots, at most 64)")
    if not accession and uid is None:
        raise _unusable("no accession number (an ACSN identifier) and no Study Instance UID (an ImagingStudy "
                        "identifier, urn:dicom:uid) to match the report to its study")
    reported_at = _instant(resource.get("issued"))
    mapped = STATUSES[status]
    digest = hashlib.sha256(json.dumps([mapped, text, accession, uid]).encode()).hexdigest()[:24]
    base = f"DiagnosticReport/{resource['id']}" if isinstance(resource.get("id"), str) else next(
        (f"{i.get('system', '')}|{i['value']}" for i in identifiers if i.get("value") and not _is_accession(i)), "")
    return IncomingReport("fhir", client, f"{base[:170]}#{digest}", mapped, text, accession, uid, reported_at)


def _unusable(reason: str) -> _Refused:
    return _Refused(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid", reason)


def _text(resource: dict[str, Any]) -> str:
    parts = []
    for n, form in enumerate(_list(resource, "presentedForm")):
        if not isinstance(form, dict) or not str(form.get("contentType", "")).lower().startswith("text/plain"):
            continue
        charset = re.search(r"charset=([\w.-]+)", str(form.get("contentType", "")), re.IGNORECASE)
        try:
            parts.append(base64.b64decode(str(form.get("data", "")), validate=True)
                         .decode(charset.group(1) if charset else "utf-8").strip())
        except (binascii.Error, UnicodeDecodeError, LookupError) as exc:
            raise _unusable(f"presentedForm[{n}].data is not base64 text in its charset") from exc
    conclusion = resource.get("conclusion")
    if isinstance(conclusion, str) and conclusion.strip() and not any(conclusion.strip() in p for p in parts):
        parts.append(conclusion.strip())
    text = "\n\n".join(p for p in parts if p)
    if not text:
        raise _unusable("no report text: a conclusion or a text/plain presentedForm (base64 data) is needed")
    return text


def _list(resource: dict[str, Any], key: str) -> list[Any]:
    value = resource.get(key)
    return value if isinstance(value, list) else []


def _referenced(reference: Any, contained: dict[Any, dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The identifiers a reference gives: its own (a logical reference) and those of the ``kind`` it contains."""
    if not isinstance(reference, dict):
        return []
    found = [reference["identifier"]] if isinstance(reference.get("identifier"), dict) else []
    target = str(reference.get("reference", ""))
    resource = contained.get(target[1:]) if target.startswith("#") else None
    if resource is not None and resource.get("resourceType") == kind:
        found += [i for i in _list(resource, "identifier") if isinstance(i, dict)]
    return found


def _is_accession(identifier: dict[str, Any]) -> bool:
    kind = identifier.get("type")
    codings = _list(kind, "coding") if isinstance(kind, dict) else []
    return any(isinstance(c, dict) and c.get("code") == "ACSN" for c in codings) or (
        "accession" in str(identifier.get("system", "")).lower())


def _study_uid(identifier: dict[str, Any]) -> str | None:
    value = str(identifier.get("value", "")).strip()
    for prefix in ("urn:oid:", "urn:dicom:uid:"):
        if value.startswith(prefix):
            return value.removeprefix(prefix)
    if identifier.get("system") == "urn:dicom:uid" and value:
        return value
    return None


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
