"""DICOMweb delivery (PS3.18): STOW-RS one Part-10 file to a destination's base URL, then confirm by QIDO-RS.

``POST {base}/studies`` sends one ``multipart/related; type="application/dicom"`` part, streamed from
the file. The answer (the Store Instances Response Module as DICOM JSON) decides, as C-STORE's status
does in :mod:`worker.deliver.send`:

- 2xx with the instance in ReferencedSOPSequence: stored; it counts as delivered once
  ``GET {base}/studies/{study}/series/{series}/instances?SOPInstanceUID={uid}`` (QIDO-RS) finds it,
  and is retried otherwise;
- the instance in FailedSOPSequence: refused for good with its FailureReason, except 0xA7xx (out of
  resources), retried as C-STORE retries it;
- 408, 429, 5xx, a 2xx that does not reference the instance, any other non-4xx status: retried;
  another 4xx: refused for good;
- connection, TLS and timeout errors raise (OSError, HTTPException): the caller retries.

The bearer token is read from its file at every send and never logged; a server's own words go to
``text`` (the ledger), never into ``error`` (logged).
"""

from __future__ import annotations

import http.client
import json
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

from worker.destinations import DicomWebDestination

#: seconds to connect, send and get the answer of each request (the C-STORE SCU's timeouts are 30 s too)
TIMEOUT = 30.0
DICOM_JSON = "application/dicom+json"
_CHUNK = 1 << 16
_FAILURE_REASONS = {0xA700: "out of resources", 0xA900: "data set does not match SOP class",
                    0xC000: "cannot understand", 0xC122: "transfer syntax not supported",
                    0x0110: "processing failure", 0x0122: "SOP class not supported",
                    0x0124: "not authorized", 0x0111: "duplicate SOP Instance UID"}


class Answer(NamedTuple):
    """One try's outcome (C-STORE's takes the same shape): the peer's status (here the STOW-RS's HTTP
    status), whether the object is delivered (``ok``: stored and found), refused for good (``permanent``),
    our reason (``error``, logged), the server's words (``text``, ledger only) and the QIDO-RS check when
    one was made (``checked``, for the event trail)."""

    status: int | None
    ok: bool
    permanent: bool = False
    error: str | None = None
    text: str | None = None
    checked: dict[str, Any] | None = None


class StoreResponse(NamedTuple):
    """What a Store Instances Response says about one instance: referenced (with its WarningReason, if
    any), or failed (with its FailureReason), or neither."""

    referenced: bool
    warning: int | None = None
    failure: int | None = None


def store(target: DicomWebDestination, path: Path, sop_instance_uid: str, study_uid: str, series_uid: str,
          tls: ssl.SSLContext | None, token_file: Path | None) -> Answer:
    """STOW-RS ``path`` to ``target`` and, once stored, confirm it by QIDO-RS."""
    auth = _auth(token_file)
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers = auth | {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                      "Accept": DICOM_JSON, "Content-Length": str(len(head) + path.stat().st_size + len(tail))}
    status, reason, body = _request(target, "POST", "/studies", _parts(head, path, tail), headers, tls)
    said = parse_response(body, sop_instance_uid)
    answer = judge(status, reason, said, body)
    if not answer.ok:
        return answer
    query = (f"/studies/{quote(study_uid)}/series/{quote(series_uid)}/instances"
             f"?SOPInstanceUID={quote(sop_instance_uid)}")
    try:
        found_status, _, found_body = _request(target, "GET", query, None, auth | {"Accept": DICOM_JSON}, tls)
        found = found_status == 200 and _lists(found_body, sop_instance_uid)
        problem = f"HTTP {found_status}" + (", not listed" if found_status in (200, 204) else "")
    except (OSError, http.client.HTTPException) as exc:
        found_status, found, problem = None, False, type(exc).__name__
    checked = {"query": "QIDO-RS", "found": found, "qido_status": found_status}
    if said.warning is not None:
        checked["warning_reason"] = f"0x{said.warning:04X}"
    if found:
        return answer._replace(checked=checked)
    return Answer(status, False, error=f"stored (HTTP {status}) but QIDO-RS does not find the instance "
                  f"({problem}); it will be sent again", checked=checked)


def parse_response(body: bytes, sop_instance_uid: str) -> StoreResponse:
    """Read a Store Instances Response (DICOM JSON) for ``sop_instance_uid``; an unreadable body says nothing.
    A FailedSOPSequence item without a SOP Instance UID counts as this instance's (one is sent at a time)."""
    try:
        doc = json.loads(body) if body.strip() else {}
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        return StoreResponse(False)
    for item in _items(doc, "00081198"):
        uid = _value(item, "00081155")
        if uid in (None, sop_instance_uid):
            reason = _value(item, "00081197")
            return StoreResponse(False, failure=reason if isinstance(reason, int) else 0x0110)
    for item in _items(doc, "00081199"):
        if _value(item, "00081155") == sop_instance_uid:
            warning = _value(item, "00081196")
            return StoreResponse(True, warning=warning if isinstance(warning, int) else None)
    return StoreResponse(False)


def judge(status: int, reason: str, said: StoreResponse, body: bytes) -> Answer:
    """The outcome of a STOW-RS answer (see the module's text); ``ok`` here means stored, not yet found."""
    if said.failure is not None:
        name = _FAILURE_REASONS.get(said.failure, _FAILURE_REASONS.get(said.failure & 0xFF00, "failure"))
        error = f"HTTP {status}: FailureReason 0x{said.failure:04X} ({name})"
        return Answer(status, False, permanent=said.failure & 0xFF00 != 0xA700, error=error)
    if 200 <= status < 300:
        if said.referenced:
            return Answer(status, True)
        return Answer(status, False, error=f"HTTP {status} but the answer does not reference the instance")
    error = f"HTTP {status} {reason}".strip()
    permanent = 400 <= status < 500 and status not in (408, 429)
    return Answer(status, False, permanent=permanent, error=error, text=_server_text(body))


def _auth(token_file: Path | None) -> dict[str, str]:
    if token_file is None:
        return {}
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise OSError(f"PLEURA_DESTINATION_TOKEN_FILE cannot be read ({type(exc).__name__})") from None
    if not token:
        raise OSError("PLEURA_DESTINATION_TOKEN_FILE is empty")
    return {"Authorization": f"Bearer {token}"}


def _parts(head: bytes, path: Path, tail: bytes) -> Iterator[bytes]:
    """The multipart body, read from the file piece by piece as it is sent."""
    yield head
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk
    yield tail


def _request(target: DicomWebDestination, method: str, path: str, body: Iterator[bytes] | None,
             headers: dict[str, str], tls: ssl.SSLContext | None) -> tuple[int, str, bytes]:
    """One request on a fresh connection: the status, its reason phrase and up to 1 MiB of the body."""
    parts = urlsplit(target.url)
    if target.tls:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=TIMEOUT, context=tls)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT)
    try:
        conn.request(method, parts.path + path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.reason, answer.read(1 << 20)
    finally:
        conn.close()


def _lists(body: bytes, sop_instance_uid: str) -> bool:
    """True when a QIDO-RS answer (a DICOM JSON array) holds the instance."""
    try:
        found = json.loads(body) if body.strip() else []
    except ValueError:
        return False
    return isinstance(found, list) and any(
        isinstance(i, dict) and _value(i, "00080018") == sop_instance_uid for i in found)


def _items(doc: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = doc.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [i for i in values if isinstance(i, dict)] if isinstance(values, list) else []


def _value(item: dict[str, Any], tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON object, or None."""
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _server_text(body: bytes) -> str | None:
    """A short excerpt of an error answer (Orthanc's ``Message``/``Details``, else the body's start)."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and any(k in doc for k in ("Message", "Details", "error", "message")):
        text = "; ".join(str(doc[k]) for k in ("Message", "Details", "error", "message") if doc.get(k))
    else:
        text = body[:300].decode("utf-8", errors="replace")
    return " ".join(text.split())[:300] or None
