"""Which HTTP routes each Pleura process serves (``PLEURA_HTTP_HOST``/``PLEURA_HTTP_PORT``)."""

from __future__ import annotations

from typing import Any

from worker.observability.http import Handler, HttpEndpoints, text
from worker.settings import Settings


def start_http(settings: Settings, rt: Any, role: str) -> HttpEndpoints | None:
    """Start the endpoints of a ``serve``, ``listen`` or ``worker`` process; None when the port is unset."""
    if settings.http_port is None:
        return None
    routes: dict[str, Handler] = {"/healthz": lambda _query: text(200, "ok\n")}
    try:
        return HttpEndpoints(settings.http_host, settings.http_port, routes).start()
    except OSError as exc:
        raise SystemExit(f"error: cannot serve HTTP on {settings.http_host}:{settings.http_port}: {exc}") from exc
