"""worker.web.server on a real port: GET, HEAD and POST routes (plain and chunked bodies, too large,
too slow), errors in handlers, unknown paths, and HTTPS from certificate files (dicom_node.tls)."""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.pki import authority
from worker.settings import Settings
from worker.web.server import HttpEndpoints, PostRoute, Request, Response, server_tls, text


def _echo(request: Request) -> Response:
    if request.body is None:
        return text(413, "too large\n")
    return text(200, f"{len(request.body)} bytes of {request.headers.get('content-type')}\n")


def _broken(_query: object) -> Response:
    raise RuntimeError("a bug")


@pytest.fixture
def server() -> Iterator[HttpEndpoints]:
    endpoints = HttpEndpoints("127.0.0.1", 0, {"/hello": lambda q: text(200, f"hello {q.get('n', ['?'])[0]}\n"),
                                               "/broken": _broken},
                              {"/echo": PostRoute(_echo, max_bytes=1000, timeout=1.0)}).start()
    yield endpoints
    endpoints.stop()


def _get(port: int, method: str, path: str, body: object = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})  # type: ignore[arg-type]
    answer = conn.getresponse()
    return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()


def test_routes_bodies_and_errors(server: HttpEndpoints) -> None:
    status, headers, body = _get(server.port, "GET", "/hello?n=7")
    assert (status, body, headers["cache-control"]) == (200, b"hello 7\n", "no-store")
    status, headers, body = _get(server.port, "HEAD", "/hello")
    assert (status, body, headers["content-length"]) == (200, b"", "8")
    assert _get(server.port, "GET", "/nowhere")[::2] == (404, b"not found\n")
    assert _get(server.port, "GET", "/broken")[::2] == (500, b"internal error (RuntimeError)\n")
    assert _get(server.port, "POST", "/echo", b"x" * 10, {"Content-Type": "text/plain"})[::2] == (
        200, b"10 bytes of text/plain\n")
    chunked = iter([b"a" * 300, b"b" * 300])  # no Content-Length: chunked transfer encoding
    assert _get(server.port, "POST", "/echo", chunked)[::2] == (200, b"600 bytes of None\n")
    assert _get(server.port, "POST", "/echo", b"x" * 5000)[::2] == (413, b"too large\n")


def test_a_body_that_stalls_gets_408(server: HttpEndpoints) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part")
        assert sock.recv(4096).startswith(b"HTTP/1.1 408 ")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_https_from_the_tls_files(tmp_path: Path) -> None:
    pki = authority(tmp_path / "pki", "trusted")
    settings = Settings(data_dir=tmp_path, tls_cert_file=pki.server.cert, tls_key_file=pki.server.key,
                        tls_ca_file=pki.ca.cert)
    endpoints = HttpEndpoints("127.0.0.1", 0, {"/healthz": lambda _q: text(200, "ok\n")},
                              tls=server_tls(settings)).start()
    try:
        client = ssl.create_default_context(cafile=str(pki.ca.cert))
        conn = http.client.HTTPSConnection("localhost", endpoints.port, timeout=10, context=client)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[union-attr]
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(pki.ca.cert))
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(ssl.SSLError):  # BCP 195: nothing below TLS 1.2
            http.client.HTTPSConnection("localhost", endpoints.port, timeout=10, context=old).request("GET", "/")
        with pytest.raises(http.client.RemoteDisconnected):  # plain HTTP is not served
            _get(endpoints.port, "GET", "/healthz")
    finally:
        endpoints.stop()
    with pytest.raises(SystemExit, match="PLEURA_TLS_CERT_FILE"):
        server_tls(Settings(data_dir=tmp_path))
