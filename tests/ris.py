"""RIS peers for the notification tests, on 127.0.0.1, each in a thread of the test process.

- :class:`MllpPeer`: the ``hl7`` library's asyncio MLLP server (not our MLLP code), answering
  each ORU with the ACK its ``create_ack`` builds (AA by default; AR with a text; or closing the
  connection without an answer the first time it sees a control ID).
- :class:`RawPeer`: a socket that answers whatever bytes it is given (garbage, half a frame).
- :class:`FhirServer`: an HTTP server that keeps every POSTed body and answers a fixed status.

And the RIS as it sends final reports to Pleura (issue 19): :func:`oru` and :func:`send_hl7` (the
``hl7`` library's MLLP client; every ACK checked by hl7apy's strict validation),
:func:`diagnostic_report` (validated for FHIR R4B) and :func:`post_fhir`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7
import hl7.mllp
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from hl7.client import MLLPClient
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

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


#: the bearer token the report tests give Pleura (PLEURA_REPORTS_TOKEN_FILE) and send
TOKEN = "reports-token-for-the-test"


def oru(control_id: str, *, app: str = "RIS", accession: str = "", uid: str = "", status: str = "F",
        text: str = "Effusion.", kind: str = "ORU^R01^ORU_R01") -> str:
    """An ORU^R01 as a RIS sends a final report: accession in OBR-18 (and OBR-3), study UID in ZDS-1."""
    segments = [
        f"MSH|^~\\&|{app}|HOSPITAL|PLEURA|PLEURA|20261203101500||{kind}|{control_id}|P|2.5.1",
        "PID|1||RPT-0001^^^HOSPITAL||TEST^REPORTS",
        f"ORC|RE|{accession}|{accession}",
        f"OBR|1|{accession}|{accession}|71045^XR CHEST^CPT|||20261203093000|||||||||||{accession}||||"
        f"20261203101000+0000||RAD|{status}",
    ]
    segments += [f"OBX|{n}|TX|18782-3^Radiology Study observation^LN||{line}||||||{status}"
                 for n, line in enumerate([t for t in text.split("\n") if t], start=1)]
    if uid:
        segments.append(f"ZDS|{uid}^PACS^Application^DICOM")
    return "\r".join(segments) + "\r"


def send_hl7(port: int, message: str | bytes) -> hl7.Message | None:
    """One message over a fresh MLLP connection; its ACK (validated), or None when closed unanswered."""
    with MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(10)
        answer = client.send_message(message)
    if not answer:
        return None
    text = answer.decode().strip("\x0b\x1c\r")
    assert parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
    return hl7.parse(text)


def msa(ack: hl7.Message | None) -> tuple[str, str, str]:
    assert ack is not None, "no acknowledgment"
    segment = ack.segment("MSA")
    return str(segment(1)), str(segment(2)), str(segment(3)) if len(segment) > 3 else ""


def diagnostic_report(status: str = "final", *, accession: str = "", uid: str = "", text: str = "",
                      conclusion: str = "", rid: str | None = None) -> dict[str, Any]:
    """A DiagnosticReport as a RIS posts it (validated for R4B): the accession on ``basedOn``, the study
    UID on ``imagingStudy``, the text as a base64 ``presentedForm``."""
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "36643-5", "display": "XR Chest 2V"}]},
        "issued": "2026-12-03T10:20:00+00:00",
    }
    if rid:
        resource["id"] = rid
    if accession:
        resource["basedOn"] = [{"type": "ServiceRequest", "identifier": {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": accession}}]
    if uid:
        resource["imagingStudy"] = [{"type": "ImagingStudy", "identifier": {
            "system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}}]
    if text:
        resource["presentedForm"] = [{"contentType": "text/plain; charset=utf-8",
                                      "data": base64.b64encode(text.encode()).decode()}]
    if conclusion:
        resource["conclusion"] = conclusion
    DiagnosticReport.parse_obj(resource)
    return resource


def post_fhir(port: int, body: Any, token: str | None = TOKEN,
              content_type: str = "application/fhir+json") -> tuple[int, Message, dict[str, Any]]:
    """POST a DiagnosticReport: the status, the headers (looked up by name whatever its case) and the JSON body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/fhir/DiagnosticReport", data=data,
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())
