"""The HTTP side of a Pleura process: health, readiness, metrics and read-only pages.

One small threaded server per process (``PLEURA_HTTP_PORT``; 0 turns it off). Routes are
exact paths mapped to handlers ``(query) -> Response``; only GET and HEAD are served.
Handlers must never put patient names, IDs or birth dates in a response.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import structlog

log = structlog.get_logger("pleura.http")


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


Handler = Callable[[Mapping[str, list[str]]], Response]


def text(status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    return Response(status, content_type, body.encode())


class HttpEndpoints:
    """Serves ``routes`` on ``host:port`` from a daemon thread; :attr:`port` is the bound port."""

    def __init__(self, host: str, port: int, routes: Mapping[str, Handler]) -> None:
        self.routes = dict(routes)
        self.server = ThreadingHTTPServer((host, port), _handler_class(self.routes))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="pleura-http", daemon=True)

    def start(self) -> HttpEndpoints:
        self._thread.start()
        log.info("http endpoints listening", port=self.port, paths=sorted(self.routes))
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler_class(routes: Mapping[str, Handler]) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        server_version = "pleura"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._respond(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._respond(head=True)

        def _respond(self, head: bool) -> None:
            url = urlsplit(self.path)
            handler = routes.get(url.path)
            try:
                response = handler(parse_qs(url.query)) if handler else text(HTTPStatus.NOT_FOUND, "not found\n")
            except Exception as exc:  # a failing page must not take the process down
                log.error("http handler failed", path=url.path, error=type(exc).__name__)
                response = text(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(exc).__name__})\n")
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head:
                self.wfile.write(response.body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (scrapes are not news)
            pass

    return _Handler
