"""RIS peers for the notification tests, on 127.0.0.1, each in a thread of the test process.

- :class:`MllpPeer`: the ``hl7`` library's asyncio MLLP server (not our MLLP code), answering
  each ORU with the ACK its ``create_ack`` builds (AA by default; AR with a text; or closing the
  connection without an answer the first time it sees a control ID).
- :class:`RawPeer`: a socket that answers whatever bytes it is given (garbage, half a frame).
- :class:`FhirServer`: an HTTP server that keeps every POSTed body and answers a fixed status.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hl7
import hl7.mllp

from tests.support import free_port


@dataclass
class Received:
    at: float  # time.time()
    text: str  # the message as received, segments separated by CR


@dataclass
class MllpPeer:
    """``mode``: ``ack`` (AA), ``ar`` (AR with ``text``), ``drop_first`` (no answer, connection closed,
    the first time a control ID arrives; AA after)."""

    mode: str = "ack"
    text: str = "Patient not found in the RIS"
    tls: ssl.SSLContext | None = None
    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mllp-peer-{self.port}", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> MllpPeer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("MLLP peer did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(hl7.mllp.start_hl7_server(
            self._client, host="127.0.0.1", port=self.port, encoding="utf-8", ssl=self.tls))
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.received.append(Received(time.time(), str(message)))
                control = str(message.segment("MSH")(10))
                if self.mode == "drop_first" and [str(hl7.parse(r.text).segment("MSH")(10))
                                                  for r in self.received].count(control) == 1:
                    writer.close()
                    return
                if self.mode == "ar":
                    ack = str(message.create_ack("AR")).rstrip("\r") + f"|{self.text}\r"  # MSA-3
                    writer.writeblock(ack.encode())
                else:
                    writer.writemessage(message.create_ack("AA"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def control_ids(self) -> list[str]:
        return [str(hl7.parse(r.text).segment("MSH")(10)) for r in self.received]

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class RawPeer:
    """Reads what it is sent, answers ``reply`` and then closes, or holds the connection ``hold`` seconds."""

    def __init__(self, reply: bytes, hold: float = 0.0) -> None:
        self.reply, self.hold, self.port, self.connections = reply, hold, free_port(), 0
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        threading.Thread(target=self._serve, name=f"raw-peer-{self.port}", daemon=True).start()

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\x1c\x0d" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            conn.sendall(self.reply)
            self._stop.wait(self.hold)

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()


class FhirServer:
    """Keeps each POST (path, headers, JSON body) and answers ``status`` with ``body``."""

    def __init__(self, status: int = 200, body: dict | None = None) -> None:
        self.status, self.body = status, body or {"resourceType": "Bundle", "type": "transaction-response"}
        self.posts: list[tuple[float, str, dict[str, str], dict]] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", 0))
                peer.posts.append((time.time(), self.path, dict(self.headers), json.loads(self.rfile.read(length))))
                answer = json.dumps(peer.body).encode()
                self.send_response(peer.status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, name=f"fhir-{self.port}", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
