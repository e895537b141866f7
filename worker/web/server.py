"""The HTTP server of a Pleura process: Starlette routes served by uvicorn from a daemon thread.

Routes are exact paths. GET (and HEAD) handlers take the query, ``(query) -> Response``; POST
routes (:class:`PostRoute`) take a :class:`Request` whose body is read (plain or chunked) up to the
route's size limit within its timeout. Both are plain functions run in a worker thread, so they
may block on the ledger. Extra ASGI routes (DICOMweb) are mounted beside them. HTTPS with the
BCP 195 context of ``dicom_node.tls`` when certificate files are given. Handlers must never put
patient names, IDs or birth dates in a response.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response as StarletteResponse
from starlette.routing import BaseRoute, Route

from dicom_node.tls import server_context
from worker.settings import Settings

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
    headers: Headers
    body: bytes | None
    client: str


@dataclass(frozen=True)
class PostRoute:
    """A POST handler; its body may take ``timeout`` seconds to arrive, a slower client gets 408."""

    handler: Callable[[Request], Response]
    max_bytes: int
    timeout: float


#: most of an oversized body read (and dropped) so that the client is answered, not reset
_DRAIN_LIMIT = 16 * 2**20


def text(status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    return Response(status, content_type, body.encode())


def _http(response: Response) -> StarletteResponse:
    return StarletteResponse(response.body, response.status, media_type=response.content_type,
                             headers={"Cache-Control": "no-store", **dict(response.headers)})


async def _call(path: str, handle: Callable[[], Response]) -> StarletteResponse:
    try:
        return _http(await run_in_threadpool(handle))
    except Exception as exc:  # a failing page must not take the process down
        log.error("http handler failed", path=path, error=type(exc).__name__)
        return _http(text(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(exc).__name__})\n"))


def _get(path: str, handler: Handler) -> Route:
    async def endpoint(request: StarletteRequest) -> StarletteResponse:
        query = parse_qs(request.url.query)
        return await _call(path, lambda: handler(query))

    return Route(path, endpoint, methods=["GET", "HEAD"])


def _post(path: str, route: PostRoute) -> Route:
    async def endpoint(request: StarletteRequest) -> StarletteResponse:
        body, received = bytearray(), 0
        try:
            async with asyncio.timeout(route.timeout):
                async for chunk in request.stream():
                    received += len(chunk)
                    if received <= route.max_bytes:
                        body += chunk
                    elif received > _DRAIN_LIMIT:  # read (and drop) a bounded excess so the client is answered
                        break
        except TimeoutError:
            log.warning("http request body not received in time", path=path, timeout_s=route.timeout)
            return _http(text(HTTPStatus.REQUEST_TIMEOUT, "the request body did not arrive in time\n"))
        except ClientDisconnect:
            return _http(text(HTTPStatus.BAD_REQUEST, "the client went away mid-body\n"))
        client = request.client.host if request.client else ""
        call = Request(path, request.headers, bytes(body) if received <= route.max_bytes else None, client)
        return await _call(path, lambda: route.handler(call))

    return Route(path, endpoint, methods=["POST"])


async def _not_found(request: StarletteRequest, exc: Exception) -> StarletteResponse:
    return _http(text(HTTPStatus.NOT_FOUND, "not found\n"))


async def _not_allowed(request: StarletteRequest, exc: Exception) -> StarletteResponse:
    return _http(text(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed\n"))


class HttpEndpoints:
    """Serves ``routes`` (GET), ``posts`` and ``extra`` ASGI routes on ``host:port`` from a daemon
    thread, over TLS with ``tls``; :attr:`port` is the bound port (``port`` 0: any free one). With
    ``listen_socket`` (bound already, before several processes were forked) each serves on it."""

    def __init__(self, host: str, port: int, routes: Mapping[str, Handler],
                 posts: Mapping[str, PostRoute] | None = None, extra: Sequence[BaseRoute] = (),
                 tls: ssl.SSLContext | None = None, name: str = "http",
                 listen_socket: socket.socket | None = None) -> None:
        self.routes, self.posts, self.name = dict(routes), dict(posts or {}), name
        self.extra = [getattr(route, "path", "") for route in extra]
        app = Starlette(routes=[*(_get(p, h) for p, h in self.routes.items()),
                                *(_post(p, r) for p, r in self.posts.items()), *extra],
                        exception_handlers={404: _not_found, 405: _not_allowed})
        self.server = uvicorn.Server(uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", server_header=False, date_header=False,
            ssl_context_factory=(lambda _config, _default: tls) if tls is not None else None))
        self.socket = listen_socket or socket.create_server((host, port))
        self.port = self.socket.getsockname()[1]
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                        name=f"pleura-{name}", daemon=True)

    def start(self) -> HttpEndpoints:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise OSError(f"the {self.name} server did not start")
        log.info(f"{self.name} endpoints listening", port=self.port, paths=sorted(self.routes),
                 posts=sorted(self.posts) + self.extra, tls=self.server.config.is_ssl)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self.socket.close()


def server_tls(settings: Settings, require_peer_cert: bool = False) -> ssl.SSLContext:
    """The HTTPS context from the DICOM TLS files; a client certificate from PLEURA_TLS_CA_FILE is
    checked when given, and with ``require_peer_cert`` a client without one is refused (mutual TLS)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise SystemExit("error: HTTPS needs PLEURA_TLS_CERT_FILE and PLEURA_TLS_KEY_FILE")
    try:
        return server_context(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file,
                              require_peer_cert=require_peer_cert)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
