"""The MLLP listener for final reports (``PLEURA_HL7_PORT``): HL7 v2 ``ORU^R01`` in, one ACK per message.

Frames (:mod:`worker.mllp`) are ``0x0B`` + message + ``0x1C 0x0D``; a connection may carry many. Limits: a message over
``PLEURA_HL7_MAX_MESSAGE_KB`` gets an AE (when its MSH can be read) and its connection is closed;
a sender that takes longer than ``PLEURA_HL7_TIMEOUT_SECONDS`` to complete a message, or stays
silent that long between messages, is disconnected. Bytes that are not a frame, or a frame without
a readable MSH-10, close the connection without an answer. With ``PLEURA_HL7_TLS`` the listener
speaks TLS only (the DICOM TLS files and policy, :mod:`dicom_node.tls`). Every refusal is a
``report_refused`` event; nothing is stored unless it is stored whole (:mod:`worker.reports.store`).
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import ssl
import threading
import time

import structlog
from sqlalchemy.exc import DBAPIError

from dicom_node.tls import server_context
from worker import mllp
from worker.reports import hl7_in
from worker.reports.hl7_in import Header, Hl7Error
from worker.reports.store import IncomingReport, Intake, ReportConflict
from worker.settings import Settings

log = structlog.get_logger(__name__)

#: after a NACK for an oversized message, what the sender still sends is read and dropped this long,
#: so that closing does not reset the connection before the NACK is read
_DRAIN_SECONDS = 2.0


class Senders:
    """``PLEURA_HL7_ALLOWED_SENDERS``: ``APP`` (MSH-3, from any host) or ``APP@host`` (from that address only;
    a host name is resolved now). No entries: anyone."""

    def __init__(self, entries: list[str]) -> None:
        self.rules: dict[str, set[str] | None] = {}
        for entry in entries:
            app, _, host = (part.strip() for part in entry.partition("@"))
            if not host:
                self.rules[app] = None
            elif self.rules.get(app, set()) is not None:
                self.rules[app] = (self.rules.get(app) or set()) | _addresses(host)

    def refusal(self, application: str, host: str) -> str | None:
        """Why ``application`` sending from ``host`` is refused, or None."""
        if not self.rules:
            return None
        if application not in self.rules:
            return f"sending application (MSH-3) {application[:40]!r} is not allowed (PLEURA_HL7_ALLOWED_SENDERS)"
        hosts = self.rules[application]
        if hosts is not None and host not in hosts:
            return f"sending application (MSH-3) {application[:40]!r} is not allowed from {host}"
        return None


class ReportListener:
    """A threaded MLLP server on ``host:port`` (0: any free port; :attr:`port` is the bound one)."""

    def __init__(self, intake: Intake, host: str, port: int, senders: Senders, max_bytes: int, timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.intake, self.senders, self.max_bytes, self.timeout, self.tls = intake, senders, max_bytes, timeout, tls
        listener = self

        class _Connection(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                listener._serve(self.request, self.client_address[0])

        self.server = socketserver.ThreadingTCPServer((host, port), _Connection, bind_and_activate=False)
        self.server.daemon_threads = True
        self.server.allow_reuse_address = True
        self.server.server_bind()
        self.server.server_activate()
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="pleura-hl7", daemon=True)

    def start(self) -> ReportListener:
        self._thread.start()
        log.info("hl7 report listener", port=self.port, tls=self.tls is not None,
                 allowed_senders=len(self.senders.rules) or "any")
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _serve(self, raw: socket.socket, host: str) -> None:
        raw.settimeout(self.timeout)
        try:
            sock = self.tls.wrap_socket(raw, server_side=True) if self.tls is not None else raw
        except (ssl.SSLError, OSError) as exc:
            log.warning("hl7 connection refused: TLS handshake failed", peer=host, error=type(exc).__name__)
            self.intake.refuse("hl7", host, f"TLS handshake failed ({type(exc).__name__})")
            raw.close()
            return
        with sock:
            buffer = bytearray()
            while self._next(sock, host, buffer):
                pass

    def _next(self, sock: socket.socket, host: str, buffer: bytearray) -> bool:
        """Read, answer and record one message; False when the connection is to be closed."""
        try:
            frame = self._read(sock, buffer)
        except _Closed as closed:
            if closed.reason:
                log.warning("hl7 connection closed", peer=host, reason=closed.reason)
                self.intake.refuse("hl7", host, closed.reason)
            return False
        except mllp.TooLarge as over:
            header = hl7_in.partial_header(over.head)
            reason = f"the message is larger than {self.max_bytes // 1024} KiB (PLEURA_HL7_MAX_MESSAGE_KB)"
            self.intake.refuse("hl7", host, reason, header.control_id if header else None)
            log.warning("hl7 message refused", peer=host, reason=reason)
            if header is not None and header.control_id:
                _send(sock, hl7_in.ack(header, "AE", reason))
            _drain(sock)
            return False
        answer, keep_open = self._answer(frame, host)
        if answer is not None:
            _send(sock, answer)
        return keep_open

    def _read(self, sock: socket.socket, buffer: bytearray) -> bytes:
        """The next frame's payload; waits at most ``timeout`` for it to begin and as long again for it to end."""
        while not buffer.lstrip(b"\r\n"):
            buffer.clear()
            chunk = _recv(sock, self.timeout)
            if not chunk:
                raise _Closed(None)  # closed or silent between messages: the sender's choice
            buffer += chunk
        del buffer[:len(buffer) - len(buffer.lstrip(b"\r\n"))]
        if buffer[:1] != mllp.START:
            raise _Closed(f"not an MLLP frame (first byte 0x{buffer[0]:02X}, not the start block 0x0B)")
        try:
            return mllp.read_frame(sock, buffer, time.monotonic() + self.timeout, self.max_bytes, _recv)
        except mllp.Incomplete as incomplete:
            if incomplete.closed:
                raise _Closed(f"the sender closed the connection mid-message ({len(buffer)} bytes, no end block)") \
                    from None
            raise _Closed(f"the message was not complete within {self.timeout:g} s "
                          f"({len(buffer)} bytes received); disconnected") from None

    def _answer(self, payload: bytes, host: str) -> tuple[bytes | None, bool]:
        """The acknowledgment of one message and whether the connection stays open."""
        try:
            header = hl7_in.read_header(payload)
        except Hl7Error as exc:
            self.intake.refuse("hl7", host, exc.reason)
            log.warning("hl7 message refused", peer=host, reason=exc.reason)
            return None, False
        if not header.control_id:
            reason = "MSH-10 (message control ID) is empty: the message cannot be acknowledged"
            self.intake.refuse("hl7", host, reason)
            log.warning("hl7 message refused", peer=host, reason=reason)
            return None, False
        sender = f"{header.sending_application}@{host}"
        refusal = self.senders.refusal(header.sending_application, host)
        if refusal is not None:
            return self._nack(header, sender, "AR", refusal, None), False
        try:
            parsed = hl7_in.read_report(payload)
            stored = self.intake.store(IncomingReport(
                "hl7", sender, header.control_id[:200], parsed.status, parsed.text, parsed.accession_number,
                parsed.study_instance_uid, parsed.reported_at))
        except Hl7Error as exc:
            return self._nack(header, sender, exc.code, exc.reason, exc.error), True
        except ReportConflict as exc:
            return self._nack(header, sender, "AE", str(exc), hl7_in.DUPLICATE), True
        except Exception as exc:  # the ledger or the labeler failed: nothing was stored, the sender retries
            log.error("hl7 report not stored", peer=host, control_id=header.control_id, error=type(exc).__name__)
            cause = "database unavailable" if isinstance(exc, DBAPIError) else type(exc).__name__
            reason = f"the report could not be stored now ({cause}); send it again"
            return self._nack(header, sender, "AE", reason, hl7_in.INTERNAL), True
        log.info("hl7 report acknowledged", peer=host, control_id=header.control_id, report_id=stored.report_id,
                 resend=not stored.created, matched=stored.study_id is not None)
        return hl7_in.ack(header, "AA"), True

    def _nack(self, header: Header, sender: str, code: str, reason: str, error: str | None) -> bytes:
        self.intake.refuse("hl7", sender, reason, header.control_id, code=code)
        log.warning("hl7 message refused", sender=sender, control_id=header.control_id, code=code, reason=reason)
        return hl7_in.ack(header, code, reason, error)


def start(settings: Settings, intake: Intake) -> ReportListener:
    """The listener ``settings`` describe, started (``hl7_port`` must be set)."""
    if settings.hl7_port is None:
        raise ValueError("PLEURA_HL7_PORT is not set")
    tls = None
    if settings.hl7_tls:
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            raise ValueError("PLEURA_HL7_TLS needs PLEURA_TLS_CERT_FILE and PLEURA_TLS_KEY_FILE")
        tls = server_context(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file,
                             settings.tls_require_peer_cert)
    return ReportListener(intake, settings.hl7_host, settings.hl7_port, Senders(settings.hl7_allowed_senders),
                          settings.hl7_max_message_kb * 1024, settings.hl7_timeout_seconds, tls).start()


class _Closed(Exception):
    """The connection ends; ``reason`` None: nothing went wrong (closed or idle between messages)."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason)
        self.reason = reason


def _recv(sock: socket.socket, timeout: float) -> bytes | None:
    """:func:`worker.mllp.recv`, with a reset or a TLS error read as the connection closed."""
    try:
        return mllp.recv(sock, timeout)
    except OSError:
        return b""


def _send(sock: socket.socket, message: bytes) -> None:
    try:
        sock.sendall(mllp.frame(message))
    except OSError as exc:
        log.warning("hl7 acknowledgment not sent", error=type(exc).__name__)


def _drain(sock: socket.socket) -> None:
    deadline = time.monotonic() + _DRAIN_SECONDS
    while (remaining := deadline - time.monotonic()) > 0 and _recv(sock, remaining):
        pass


def _addresses(host: str) -> set[str]:
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        return {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
