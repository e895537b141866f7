"""MLLP (HL7 v2's Minimal Lower Layer Protocol): send one framed message, read the framed answer.

A frame is ``0x0B`` + payload + ``0x1C 0x0D``. The whole exchange has one deadline, so a peer
that answers slowly, partly or never cannot hold a sender past it.
"""

from __future__ import annotations

import socket
import ssl
import time

START, END = b"\x0b", b"\x1c\x0d"
MAX_FRAME = 1 << 20


class MllpError(OSError):
    """The exchange failed: no connection, a bad frame, a closed connection, no answer in time."""


def exchange(host: str, port: int, message: bytes, timeout: float, tls: ssl.SSLContext | None = None) -> bytes:
    """Send ``message`` in one frame and return the payload of the peer's answer."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as raw:
        sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        with sock:
            sock.sendall(START + message + END)
            return _read_frame(sock, deadline, timeout)


def _read_frame(sock: socket.socket, deadline: float, timeout: float) -> bytes:
    buffer = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MllpError(f"no complete acknowledgment within {timeout:g} s ({len(buffer)} bytes received)")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue  # the deadline check above reports it
        if not chunk:
            if not buffer:
                raise MllpError("the peer closed the connection without an acknowledgment")
            raise MllpError(f"the peer closed the connection mid-frame ({len(buffer)} bytes, no end block)")
        buffer += chunk
        if buffer[:1] != START:
            raise MllpError(f"the peer answered {len(buffer)} bytes that are not an MLLP frame "
                            f"(first byte 0x{buffer[0]:02X}, not the start block 0x0B)")
        end = buffer.find(END)
        if end >= 0:
            return bytes(buffer[1:end])
        if len(buffer) > MAX_FRAME:
            raise MllpError(f"the peer's answer passed {MAX_FRAME} bytes without an end block")
