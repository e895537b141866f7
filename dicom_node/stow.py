"""DICOMweb STOW-RS origin server (PS3.18 10.5): ``POST {prefix}/studies`` and ``POST
{prefix}/studies/{StudyInstanceUID}``, as Starlette routes.

The body, ``multipart/related; type="application/dicom"``, is parsed as it arrives
(python-multipart, in worker threads a MiB at a time): each part is written into a spool temporary
file, then filed as a C-STORE data set is (:mod:`dicom_node.filing`). The parts of a request are
recorded together (group commit: one fsync per spool folder, their ledger rows in one transaction,
every :data:`_BATCH` parts and at the end), before the answer, so a part is acknowledged only once
its bytes and its ledger row are durable. The answer is the Store Instances Response Module in DICOM
JSON: 200 all stored, 202 some failed, 409 none stored (a FailedSOPSequence item with its
FailureReason for each), 400 (no or a broken multipart body), 401 (bearer token), 408 (the client
stalled), 413 (over ``max_bytes``), 415 (not ``application/dicom`` parts), 503 (none stored for want
of resources). Every request is an association for the :class:`~dicom_node.filing.Receiver`: the
token's name is its calling AE, it is released once the answer is sent; a request refused on its
headers is a rejected association, with the reason.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

import structlog
from pydicom import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AllStoragePresentationContexts
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from dicom_node.filing import (
    ACCEPTED_TRANSFER_SYNTAXES,
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    RELEASED,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    TRANSFER_SYNTAX_NOT_SUPPORTED,
    NotUnderstood,
    Peer,
    Receiver,
    Refused,
    StoredInstance,
    file_instance,
    read_header,
    record_instances,
    refusal,
)
from dicom_node.spool import Incoming, InvalidUID, Spool, check_uid

log = structlog.get_logger(__name__)

DICOM_JSON = "application/dicom+json"
#: the called AE of the association recorded for a STOW-RS request
CALLED = "STOW-RS"
#: the calling AE recorded for a client that mutual TLS admitted without a token
TLS_CLIENT = "TLS-CLIENT"
_STORAGE_CLASSES = frozenset(str(c.abstract_syntax) for c in AllStoragePresentationContexts)
_ACCEPTED_SYNTAXES = frozenset(str(s) for s in ACCEPTED_TRANSFER_SYNTAXES)
#: bytes of a body gathered before they are parsed in a worker thread (one thread hop per MiB)
_FEED = 1 << 20
#: parts filed before their folders' fsyncs and ledger rows are written together (at the latest at
#: the end of the request)
_BATCH = 32
#: most of a refused body read (and dropped) so that the client is answered, not reset
_DRAIN_LIMIT = 16 * 2**20


@dataclass(frozen=True)
class StowPolicy:
    """``tokens``: bearer token -> sender name, read at every request (the file may be rotated); None:
    no token is asked, the transport proved the client (mutual TLS) and it is recorded as
    :data:`TLS_CLIENT`. ``max_bytes``: the largest body; ``timeout``: seconds a client may stay silent
    mid-body."""

    tokens: Callable[[], Mapping[str, str]] | None
    max_bytes: int
    timeout: float = 60.0


@dataclass
class _Outcome:
    """One part: its UIDs when they could be read, and its status (SUCCESS: stored) and reason."""

    sop_class: str = ""
    sop_uid: str = ""
    status: int = SUCCESS
    reason: str = ""


@dataclass
class _Parts:
    """The multipart parser's callbacks: the current part's headers, then its bytes into a spool
    temporary file; a complete part waits in ``ready`` to be filed."""

    spool: Spool
    ready: list[tuple[Incoming | None, _Outcome]] = field(default_factory=list)
    #: parts filed in the spool (the file fsynced, not its folder) whose ledger rows are not written yet
    filed: list[tuple[StoredInstance, _Outcome]] = field(default_factory=list)
    ended: bool = False
    _field: bytearray = field(default_factory=bytearray)
    _value: bytearray = field(default_factory=bytearray)
    _headers: dict[str, str] = field(default_factory=dict)
    _incoming: Incoming | None = None
    _outcome: _Outcome | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_part_end": self._end, "on_end": self._finished}

    def _begin(self) -> None:
        self._headers, self._incoming, self._outcome = {}, None, _Outcome()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        assert self._outcome is not None
        kind = self._headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/dicom":
            self._outcome.status = CANNOT_UNDERSTAND
            self._outcome.reason = f"a part of type {kind or 'none'!r}, not application/dicom"[:120]
            return
        try:
            self._incoming = self.spool.incoming()
        except Exception as exc:
            refused = refusal(exc)
            self._outcome.status, self._outcome.reason = refused.status, refused.reason

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._incoming is not None:
            try:
                self._incoming.write(memoryview(data)[start:end])
            except Exception as exc:
                refused = refusal(exc)
                assert self._outcome is not None
                self._outcome.status, self._outcome.reason = refused.status, refused.reason
                self._incoming.discard()
                self._incoming = None

    def _end(self) -> None:
        assert self._outcome is not None
        self.ready.append((self._incoming, self._outcome))
        self._incoming, self._outcome = None, None

    def _finished(self) -> None:
        self.ended = True

    def discard(self) -> None:
        """Drop the part being received and those not filed yet (nothing of them is kept)."""
        for incoming, _ in self.ready:
            if incoming is not None:
                incoming.discard()
        self.ready.clear()
        if self._incoming is not None:
            self._incoming.discard()
            self._incoming = None


class StowService:
    """STOW-RS into ``spool``, recorded through ``receiver``."""

    def __init__(self, spool: Spool, receiver: Receiver, policy: StowPolicy, max_inflated_bytes: int,
                 prefix: str = "/dicom-web") -> None:
        self.spool, self.receiver, self.policy = spool, receiver, policy
        self.max_inflated_bytes, self.prefix = max_inflated_bytes, prefix.rstrip("/")

    def routes(self) -> list[Route]:
        return [Route(f"{self.prefix}/studies", self.store, methods=["POST"]),
                Route(f"{self.prefix}/studies/{{study}}", self.store, methods=["POST"])]

    async def store(self, request: Request) -> Response:
        client = request.client
        sender, refused = self._check(request)
        peer = Peer(sender or "", CALLED, client.host if client else "", client.port if client else 0)
        if refused is not None:  # recorded as a rejected association; a bounded part of the body is read
            reason = f"{bytes(refused.body).decode().strip()} (HTTP {refused.status_code})"
            log.warning("STOW-RS request refused", status=refused.status_code, peer_host=peer.host)
            await run_in_threadpool(self._rejected, peer, reason)
            await _drain(request.stream())
            return refused
        # recorded while the body starts to arrive; awaited before the first part is filed
        opened = asyncio.ensure_future(run_in_threadpool(self.receiver.association_opened, peer))
        boundary = parse_options_header(request.headers.get("content-type", ""))[1][b"boundary"]
        try:
            status, outcomes, why = await self._receive(request, opened, boundary, request.path_params.get("study"))
        except _NotRecorded:
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, "the request could not be recorded; try again later")
        return self._answer(status, outcomes, why, opened.result())

    def _check(self, request: Request) -> tuple[str | None, Response | None]:
        """The sender (its token's name, None when unknown) and, for a request refused on its headers
        alone, the answer."""
        try:
            sender = self._sender(request.headers.get("authorization", ""))
        except Exception as exc:
            log.error("STOW-RS tokens cannot be read", error=type(exc).__name__)
            return None, _error(HTTPStatus.SERVICE_UNAVAILABLE, "the tokens cannot be read; try again later")
        if sender is None:
            return None, _error(HTTPStatus.UNAUTHORIZED, "a valid bearer token is required",
                                {"WWW-Authenticate": 'Bearer realm="dicom-web"'})
        return sender, self._refusal(request)

    def _refusal(self, request: Request) -> Response | None:
        """The answer to a request whose path or headers are wrong, or None."""
        study = request.path_params.get("study")
        if study is not None:
            try:
                check_uid(study)
            except InvalidUID as exc:
                return _error(HTTPStatus.BAD_REQUEST, f"the study in the path is {exc}")
        kind, options = parse_options_header(request.headers.get("content-type", ""))
        if kind != b"multipart/related" or options.get(b"type", b"application/dicom").lower() != b"application/dicom":
            return _error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          'the body must be multipart/related; type="application/dicom"')
        boundary = options.get(b"boundary")
        if not boundary:
            return _error(HTTPStatus.BAD_REQUEST, "the multipart/related body has no boundary")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.policy.max_bytes:
            return _error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {self.policy.max_bytes} bytes")
        return None

    def _sender(self, authorization: str) -> str | None:
        if self.policy.tokens is None:
            return TLS_CLIENT
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        found = None
        for token, name in self.policy.tokens().items():  # every entry compared: no early exit to time
            if hmac.compare_digest(token.encode(), given.strip().encode()):
                found = name
        return found

    async def _receive(self, request: Request, opened: asyncio.Future, boundary: bytes,
                       study: str | None) -> tuple[int | None, list[_Outcome], str]:
        """Parse and file the parts; an HTTP status that overrides the outcomes' (or None), the
        outcomes, and why the body was cut short. ``opened``: the association's key, being recorded
        (_NotRecorded when it could not be)."""
        parts = _Parts(self.spool)
        parser = MultipartParser(boundary, parts.callbacks())
        outcomes: list[_Outcome] = []
        pending: list[bytes] = []
        received, buffered, status, why = 0, 0, None, ""
        stream = request.stream().__aiter__()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), self.policy.timeout)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    status, why = HTTPStatus.REQUEST_TIMEOUT, f"the client sent nothing for {self.policy.timeout:g} s"
                    break
                except ClientDisconnect:
                    status, why = HTTPStatus.BAD_REQUEST, "the client went away mid-body"
                    break
                received += len(chunk)
                if received > self.policy.max_bytes:
                    status, why = HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {self.policy.max_bytes} bytes"
                    break
                pending.append(chunk)
                buffered += len(chunk)
                if buffered >= _FEED:
                    key = await _key(opened)
                    await run_in_threadpool(self._feed, parser, parts, b"".join(pending), key, study, outcomes)
                    pending, buffered = [], 0
            key = await _key(opened)
            if pending:  # what arrived before the end, or before the body was cut short: its whole parts are kept
                await run_in_threadpool(self._feed, parser, parts, b"".join(pending), key, study, outcomes)
        except _NotRecorded:
            await _drain(stream)
            raise
        except Exception as exc:  # python-multipart's errors: a broken body
            status, why = HTTPStatus.BAD_REQUEST, f"the multipart body cannot be parsed ({type(exc).__name__})"
        finally:
            parts.discard()
        if parts.filed:  # the complete parts, whatever cut the body short
            await run_in_threadpool(self._record, parts)
        if status is None and not parts.ended:
            status, why = HTTPStatus.BAD_REQUEST, ("the body ended before its closing boundary" if outcomes
                                                   else "no part found: a missing or wrong boundary")
        key = await _key(opened)
        for outcome in outcomes:
            if outcome.status != SUCCESS:
                await run_in_threadpool(self._refused, key, outcome)
        return status, outcomes, why

    def _feed(self, parser: MultipartParser, parts: _Parts, data: bytes, key: object, study: str | None,
              outcomes: list[_Outcome]) -> None:
        """Parse ``data`` (writing and hashing part bytes) and file the parts it completes, adding their
        outcomes to ``outcomes``; in a worker thread, so that requests are parsed on several cores."""
        try:
            parser.write(data)
        finally:
            for incoming, outcome in parts.ready:
                outcomes.append(outcome)
                self._file(parts, incoming, outcome, key, study)
            parts.ready.clear()
            if len(parts.filed) >= _BATCH:
                self._record(parts)

    def _file(self, parts: _Parts, incoming: Incoming | None, outcome: _Outcome, key: object,
              study: str | None) -> None:
        """File one complete part in the spool (blocking: its fsync); it joins ``parts.filed``, or
        ``outcome`` says why not."""
        if incoming is None:  # refused while it arrived
            return
        try:
            incoming.close(fsync=False)
            try:
                meta = read_file_meta_info(incoming.path)
                syntax = str(meta.TransferSyntaxUID)
            except Exception as exc:
                raise NotUnderstood("the part is not a DICOM Part-10 file") from exc
            outcome.sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
            outcome.sop_uid = str(meta.get("MediaStorageSOPInstanceUID", ""))
            if syntax not in _ACCEPTED_SYNTAXES:
                raise Refused(TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer syntax not supported")
            header = read_header(incoming, syntax, self.max_inflated_bytes)
            outcome.sop_class = str(header.get("SOPClassUID", ""))
            outcome.sop_uid = str(header.get("SOPInstanceUID", ""))
            if outcome.sop_class not in _STORAGE_CLASSES:
                raise Refused(SOP_CLASS_NOT_SUPPORTED, "not a storage SOP class")
            stored = file_instance(self.spool, incoming, header, key, syntax, study_uid=study, sync_folder=False)
        except Exception as exc:
            refused = refusal(exc)
            outcome.status, outcome.reason = refused.status, refused.reason
            return
        finally:
            incoming.discard()
        parts.filed.append((stored, outcome))

    def _record(self, parts: _Parts) -> None:
        """Group commit of the filed parts: one fsync per spool folder, then their ledger rows in one
        transaction; no part is acknowledged before (the answer waits for the whole request)."""
        stored = [instance for instance, _ in parts.filed]
        try:
            self.spool.sync(instance.path for instance in stored)
            status, reason = record_instances(self.receiver, stored)
        except OSError as exc:
            refused = refusal(exc)
            status, reason = refused.status, refused.reason
        for _, outcome in parts.filed:
            outcome.status, outcome.reason = status, reason
        parts.filed.clear()

    def _rejected(self, peer: Peer, reason: str) -> None:
        try:
            self.receiver.association_rejected(peer, reason)
        except Exception:
            log.exception("STOW-RS refusal could not be recorded")

    def _refused(self, key: object, outcome: _Outcome) -> None:
        log.warning("STOW-RS instance refused", status=f"0x{outcome.status:04X}", reason=outcome.reason)
        try:
            self.receiver.instance_refused(key, outcome.sop_uid, outcome.status, outcome.reason)
        except Exception:
            log.exception("refusal could not be recorded")

    def _answer(self, status: int | None, outcomes: list[_Outcome], why: str, key: object) -> Response:
        stored = [o for o in outcomes if o.status == SUCCESS]
        failed = [o for o in outcomes if o.status != SUCCESS]
        if status is None:
            if not failed:
                status = HTTPStatus.OK
            elif stored:
                status = HTTPStatus.ACCEPTED
            elif all(o.status == OUT_OF_RESOURCES for o in failed):
                status = HTTPStatus.SERVICE_UNAVAILABLE
            else:
                status = HTTPStatus.CONFLICT
        end = RELEASED if status in (HTTPStatus.OK, HTTPStatus.ACCEPTED, HTTPStatus.CONFLICT) else f"aborted: {why}"
        headers = {"Cache-Control": "no-store"}
        if why:  # the body was cut short: what was filed before is answered, the part in progress is not kept
            headers["Warning"] = f'299 pleura "{why}"'
        return Response(_response_module(stored, failed), status, media_type=DICOM_JSON, headers=headers,
                        background=BackgroundTask(self._closed, key, end[:32]))

    def _closed(self, key: object, reason: str) -> None:
        try:
            self.receiver.association_closed(key, reason)
        except Exception:
            log.exception("STOW-RS request end could not be recorded")


def _response_module(stored: list[_Outcome], failed: list[_Outcome]) -> bytes:
    """The Store Instances Response Module (PS3.18 10.5.3.3) as DICOM JSON."""
    ds = Dataset()
    ds.ReferencedSOPSequence = [_item(o) for o in stored]
    if failed:
        ds.FailedSOPSequence = [_item(o, failure=True) for o in failed]
    return json.dumps(ds.to_json_dict()).encode()


def _item(outcome: _Outcome, failure: bool = False) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class
    item.ReferencedSOPInstanceUID = outcome.sop_uid
    if failure:
        item.FailureReason = outcome.status
    return item


class _NotRecorded(Exception):
    """The request's association could not be recorded: nothing of it is kept (503)."""


async def _key(opened: asyncio.Future) -> object:
    try:
        return await opened
    except Exception as exc:
        log.error("STOW-RS request could not be recorded", error=type(exc).__name__)
        raise _NotRecorded from exc


async def _drain(stream: AsyncIterator[bytes]) -> None:
    """Read and drop up to :data:`_DRAIN_LIMIT` bytes of a refused body for at most 5 s: a client still
    sending then reads the answer instead of a reset connection."""
    received = 0
    try:
        async with asyncio.timeout(5):
            async for chunk in stream:
                received += len(chunk)
                if received > _DRAIN_LIMIT:
                    return
    except (TimeoutError, ClientDisconnect):
        return


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """An answer to a request refused as a whole: nothing of it was read or kept."""
    return Response(f"{message}\n", status, media_type="text/plain; charset=utf-8",
                    headers={"Cache-Control": "no-store", **(headers or {})})
