"""The HTTP side of a Pleura process: health, readiness, metrics, read-only pages, reports in.

One small threaded server per process (``PLEURA_HTTP_PORT``; 0 turns it off). Routes are
exact paths mapped to handlers ``(query) -> Response``, served for GET and HEAD; POST routes
(:class:`PostRoute`) take a :class:`Request` whose body is read up to the route's size limit.
Handlers must never put patient names, IDs or birth dates in a response.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
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
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Mapping[str, list[str]]], Response]


@dataclass(frozen=True)
class Request:
    """A POST: ``body`` None when it is longer than the route's ``max_bytes`` (then it is not kept)."""

    path: str
    headers: Message
    body: bytes | None
    client: str


@dataclass(frozen=True)
class PostRoute:
    """A POST handler; its body may take ``timeout`` seconds to arrive, a slower client is disconnected."""

    handler: Callable[[Request], Response]
    max_bytes: int
    timeout: float


#: most of an oversized body read (and dropped) so that the client is answered, not reset
_DRAIN_LIMIT = 16 * 2**20


def text(status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    return Response(status, content_type, body.encode())


class HttpEndpoints:
    """Serves ``routes`` on ``host:port`` from a daemon thread; :attr:`port` is the bound port."""

    def __init__(self, host: str, port: int, routes: Mapping[str, Handler],
                 posts: Mapping[str, PostRoute] | None = None) -> None:
        self.routes, self.posts = dict(routes), dict(posts or {})
        self.server = ThreadingHTTPServer((host, port), _handler_class(self.routes, self.posts))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="pleura-http", daemon=True)

    def start(self) -> HttpEndpoints:
        self._thread.start()
        log.info("http endpoints listening", port=self.port, paths=sorted(self.routes), posts=sorted(self.posts))
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler_class(routes: Mapping[str, Handler], posts: Mapping[str, PostRoute]) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        server_version = "pleura"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._respond(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._respond(head=True)

        def do_POST(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            route = posts.get(url.path)
            length = self.headers.get("Content-Length", "")
            if route is None:
                self.close_connection = True
                self._send(text(HTTPStatus.NOT_FOUND, "not found\n"), head=False)
                return
            if "Transfer-Encoding" in self.headers or not length.isdigit():
                self.close_connection = True
                self._send(text(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required\n"), head=False)
                return
            size, body = int(length), None
            self.connection.settimeout(route.timeout)
            try:
                if size <= route.max_bytes:
                    body = self.rfile.read(size)
                else:
                    self.close_connection = True
                    self._drop(size)
            except TimeoutError:
                log.warning("http request body not received in time", path=url.path, timeout_s=route.timeout)
                self.close_connection = True
                return
            if body is not None and len(body) < size:
                self.close_connection = True  # the client went away mid-body
                return
            request = Request(url.path, self.headers, body, self.client_address[0])
            self._send(self._call(url.path, lambda: route.handler(request)), head=False)

        def _drop(self, size: int) -> None:
            left = min(size, _DRAIN_LIMIT)
            while left > 0 and (chunk := self.rfile.read1(min(left, 65536))):
                left -= len(chunk)

        def _respond(self, head: bool) -> None:
            url = urlsplit(self.path)
            handler = routes.get(url.path)
            if handler is None:
                self._send(text(HTTPStatus.NOT_FOUND, "not found\n"), head)
                return
            self._send(self._call(url.path, lambda: handler(parse_qs(url.query))), head)

        def _call(self, path: str, handle: Callable[[], Response]) -> Response:
            try:
                return handle()
            except Exception as exc:  # a failing page must not take the process down
                log.error("http handler failed", path=path, error=type(exc).__name__)
                return text(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(exc).__name__})\n")

        def _send(self, response: Response, head: bool) -> None:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in response.headers:
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(response.body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (scrapes are not news)
            pass

    return _Handler
