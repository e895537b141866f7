"""MLLP (HL7 v2's Minimal Lower Layer Protocol): framing, and the client side of one exchange.

A frame is ``0x0B`` + payload + ``0x1C 0x0D``. :func:`read_frame` completes one frame from a
socket by a deadline, for the RIS notifications Pleura sends (:func:`exchange`) and the final
reports it takes in (:mod:`worker.reports.mllp`). An exchange has one deadline, so a peer that
answers slowly, partly or never cannot hold a sender past it.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

START, END = b"\x0b", b"\x1c\x0d"
#: the largest answer :func:`exchange` reads
MAX_FRAME = 1 << 20


class MllpError(OSError):
    """The exchange failed: no connection, a bad frame, a closed connection, no answer in time."""


class Incomplete(Exception):
    """The frame's end block did not come: the peer ``closed`` the connection, or the deadline passed."""

    def __init__(self, closed: bool) -> None:
        super().__init__("closed" if closed else "deadline passed")
        self.closed = closed


class TooLarge(Exception):
    """The frame passed its size limit; ``head`` is its first 4 KiB (enough for an HL7 header)."""

    def __init__(self, head: bytes) -> None:
        super().__init__("frame too large")
        self.head = head


def frame(message: bytes) -> bytes:
    """``message`` in one MLLP frame."""
    return START + message + END


def recv(sock: socket.socket, timeout: float) -> bytes | None:
    """Up to 64 KiB; b'' when the peer closed, None when nothing came within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None


def read_frame(sock: socket.socket, buffer: bytearray, deadline: float, max_bytes: int,
               receive: Callable[[socket.socket, float], bytes | None] = recv) -> bytes:
    """Complete the frame that ``buffer`` begins (its first byte is the start block) by ``deadline``;
    return its payload and remove the frame from ``buffer``. Raises :class:`Incomplete` or :class:`TooLarge`."""
    while (end := buffer.find(END)) < 0:
        if len(buffer) - 1 > max_bytes:
            raise TooLarge(bytes(buffer[1:4097]))
        remaining = deadline - time.monotonic()
        chunk = receive(sock, remaining) if remaining > 0 else None
        if not chunk:
            raise Incomplete(closed=chunk is not None)
        buffer += chunk
    if end - 1 > max_bytes:
        raise TooLarge(bytes(buffer[1:4097]))
    payload = bytes(buffer[1:end])
    del buffer[:end + len(END)]
    return payload


def exchange(host: str, port: int, message: bytes, timeout: float, tls: ssl.SSLContext | None = None) -> bytes:
    """Send ``message`` in one frame and return the payload of the peer's answer."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as raw:
        sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        with sock:
            sock.sendall(frame(message))
            return _answer(sock, deadline, timeout)


def _answer(sock: socket.socket, deadline: float, timeout: float) -> bytes:
    buffer = bytearray()
    first = recv(sock, max(deadline - time.monotonic(), 0.001))
    if first is None:
        raise MllpError(f"no complete acknowledgment within {timeout:g} s (0 bytes received)")
    if not first:
        raise MllpError("the peer closed the connection without an acknowledgment")
    buffer += first
    if buffer[:1] != START:
        raise MllpError(f"the peer answered {len(buffer)} bytes that are not an MLLP frame "
                        f"(first byte 0x{buffer[0]:02X}, not the start block 0x0B)")
    try:
        return read_frame(sock, buffer, deadline, MAX_FRAME)
    except Incomplete as incomplete:
        if incomplete.closed:
            raise MllpError(f"the peer closed the connection mid-frame ({len(buffer)} bytes, no end block)") from None
        raise MllpError(f"no complete acknowledgment within {timeout:g} s ({len(buffer)} bytes received)") from None
    except TooLarge:
        raise MllpError(f"the peer's answer passed {MAX_FRAME} bytes without an end block") from None
