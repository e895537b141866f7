"""Which HTTP routes each Pleura process serves (``PLEURA_HTTP_HOST``/``PLEURA_HTTP_PORT``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from worker.console.pages import console_routes
from worker.observability import readiness
from worker.observability.metrics import LedgerCollector
from worker.settings import Settings
from worker.web.server import Handler, HttpEndpoints, PostRoute, Response, server_tls, text

if TYPE_CHECKING:
    from worker.reports.store import Intake

#: Roles whose /metrics also count the ledger (studies by state, queue depth). Every process
#: would report the same figures, so only the ones that run the sweeper do.
LEDGER_GAUGE_ROLES = ("serve", "listen")


def start_http(settings: Settings, rt: Any, role: str, reports: Intake | None = None) -> HttpEndpoints | None:
    """Start the endpoints of a ``serve``, ``listen`` or ``worker`` process; None when the port is unset.
    ``serve`` and ``listen`` also take FHIR DiagnosticReports through ``reports`` (None: they answer that
    FHIR reports are off)."""
    if settings.http_port is None:
        return None
    probe = readiness.probe_engine(settings.effective_database_url)
    routes: dict[str, Handler] = {
        "/healthz": lambda _query: text(200, "ok\n"),
        "/readyz": readiness.page(readiness.checks_for(role, rt, probe)),
        "/metrics": _metrics(LedgerCollector(probe) if role in LEDGER_GAUGE_ROLES else None),
    }
    posts: dict[str, PostRoute] = {}
    if role in ("serve", "listen"):  # the read-only admin console, and final reports in
        from worker.reports import fhir_in

        routes.update(console_routes(rt.ledger))
        posts[fhir_in.PATH] = fhir_in.route(settings, reports)
    try:
        return HttpEndpoints(settings.http_host, settings.http_port, routes, posts,
                             tls=server_tls(settings) if settings.http_tls else None).start()
    except OSError as exc:
        raise SystemExit(f"error: cannot serve HTTP on {settings.http_host}:{settings.http_port}: {exc}") from exc



def _metrics(ledger: LedgerCollector | None) -> Handler:
    """The process's own metrics (default registry), then the ledger's gauges read at this scrape."""
    registry = CollectorRegistry(auto_describe=False)
    if ledger is not None:
        registry.register(ledger)

    def handler(_query: object) -> Response:
        return Response(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY) + generate_latest(registry))

    return handler
