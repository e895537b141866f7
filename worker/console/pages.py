"""The read-only admin console: server-rendered HTML from the audit views, no scripts, no external assets.

``/`` studies with state and timings (``?state=``, ``?limit=``), ``/study?uid=`` one study's
revisions, sources, deliveries and events, ``/failures`` (``?kind=``), ``/models``, ``/monitor``
each model against the final reports (``?windows=``; :mod:`worker.monitor`, which reads the ledger's
tables, records new alarms and refreshes the monitor gauges). The markup is in ``templates/``, which
autoescape every value; the views hold no patient names, IDs or birth dates.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NamedTuple

from jinja2 import Environment, PackageLoader, StrictUndefined
from sqlalchemy import func, select

from worker.ledger import audit
from worker.ledger.db import Ledger
from worker.web.server import Handler, Response, text

if TYPE_CHECKING:
    from worker.monitor.concordance import Record
    from worker.settings import Settings

Query = Mapping[str, list[str]]

_TEMPLATES = Environment(loader=PackageLoader("worker.console", "templates"), autoescape=True,
                         undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_TEMPLATES.filters["utc"] = lambda value: value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
_TEMPLATES.filters["human_seconds"] = audit.human_seconds


class Column(NamedTuple):
    """A table column: ``row[key]`` shown as ``kind`` (text, time, state, study, duration, alarm: the
    template ``tables.html`` renders each); ``css``: ``n`` numbers, ``w`` wrapping text, or ""."""

    header: str
    key: str
    kind: str = "text"
    css: str = ""


def _page(template: str, status: int = HTTPStatus.OK, **context: Any) -> Response:
    html = _TEMPLATES.get_template(template).render(now=datetime.now(UTC), **context)
    return text(status, html, "text/html; charset=utf-8")


def _one(query: Query, key: str) -> str | None:
    values = query.get(key)
    return values[0].strip() if values and values[0].strip() else None


def _limit(query: Query, default: int) -> int:
    value = _one(query, "limit")
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise ValueError("limit must be a whole number from 1 to 1000")
    return int(value)


def _at(header: str, key: str) -> Column:
    return Column(header, key, "time")


def _dur(header: str, key: str) -> Column:
    return Column(header, key, "duration", "n")


def _timeline_row(r: dict[str, Any]) -> dict[str, Any]:
    """A timeline row with what its columns show combined: the model, the deliveries, the revision's state."""
    failed = f" ({r['deliveries_failed']} failed)" if r["deliveries_failed"] else ""
    return {**r, "model": f"{r['bundle_name']} {r['bundle_version']}" if r["bundle_name"] else None,
            "sent": f"{r['deliveries_delivered']}/{r['deliveries']}{failed}",
            "shown_state": r["study_state"] if r["is_current"] else r["job_state"]}


_TIMING = [
    Column("Completed by", "completed_by"), _dur("Quiet", "quiet_s"), _dur("Wait", "wait_s"),
    _dur("Process", "processing_s"), _dur("Deliver", "delivery_s"), _dur("Total", "total_s"),
    Column("Sent", "sent", css="n"),
]
_STUDIES = [
    _at("Last received", "last_received_at"), Column("Study Instance UID", "study_instance_uid", "study"),
    Column("Rev", "revision", css="n"), Column("State", "study_state", "state"), Column("From", "calling_aes"),
    Column("Images", "instances", css="n"), Column("Model", "model"), Column("Tries", "attempts", css="n"), *_TIMING,
]
_REVISIONS = [
    Column("Rev", "revision", css="n"), Column("State", "shown_state", "state"), _at("Queued", "queued_at"),
    _at("Started", "started_at"), _at("Finished", "finished_at"), _at("Delivered", "delivered_at"),
    Column("Model", "model"), Column("Backend", "backend"), Column("Tries", "attempts", css="n"), *_TIMING,
    Column("Error", "error", css="w"),
]
_SOURCES = [
    Column("Calling AE", "calling_ae"), Column("Called AE", "called_ae"), Column("Peer", "peer_host"),
    Column("Images", "instances", css="n"), Column("Bytes", "bytes", css="n"), _at("First", "first_received_at"),
    _at("Last", "last_received_at"),
]
_DELIVERIES = [
    Column("Rev", "revision", css="n"), Column("Object", "object_kind"), Column("Destination", "destination"),
    Column("State", "state", "state"), Column("Tries", "attempts", css="n"), Column("Status", "peer_status"),
    _at("Delivered", "delivered_at"), _dur("Took", "delivery_s"), Column("Last error", "last_error", css="w"),
]
_EVENTS = [_at("At", "at"), Column("Event", "kind"), Column("Job", "job_id", css="n"),
           Column("Detail", "detail", css="w")]
_FAILURES = [
    _at("At", "at"), Column("Kind", "kind"), Column("Study", "study_instance_uid", "study"), Column("From", "from"),
    Column("Destination", "destination"), Column("Tries", "attempts", css="n"), Column("Status", "status"),
    Column("Reason", "reason", css="w"),
]
_MODELS = [
    Column("Bundle", "bundle_name"), Column("Version", "bundle_version"), Column("Backend", "backend"),
    Column("Jobs", "jobs", css="n"), Column("Studies", "studies", css="n"), _at("First used", "first_used_at"),
    _at("Last used", "last_used_at"),
]
_FIGURES = ("sensitivity", "specificity", "ppv", "npv", "auc")
_MONITOR = [
    Column("Model", "model"), Column("Finding", "finding"), _at("Window end", "end"), Column("Pairs", "n", css="n"),
    Column("Pos", "positives", css="n"), Column("Neg", "negatives", css="n"), Column("Excl.", "excluded", css="n"),
    Column("Unlab.", "unlabelled", css="n"),
    *(Column(f.upper() if len(f) == 3 else f.capitalize(), f) for f in _FIGURES),
    Column("Model card", "stated", css="w"), Column("Alarm", "alarms", "alarm"),
]


def _monitor_row(r: Record) -> dict[str, Any]:
    return {"model": f"{r.bundle} {r.version}", "finding": r.finding, "end": r.end, "n": r.n,
            "positives": r.positives, "negatives": r.negatives, "excluded": r.excluded, "unlabelled": r.unlabelled,
            **{f: str(r.figures[f]) if r.figures[f] else None for f in _FIGURES}, "alarms": ", ".join(r.alarms),
            "stated": ", ".join(f"{f} {v:.2f}" for f, v in r.stated.items()) or "none stated: no alarm"}


class Console:
    """The console's handlers over one ledger (the process's own database connection)."""

    def __init__(self, ledger: Ledger, settings: Settings | None = None) -> None:
        self.ledger, self.engine = ledger, ledger.engine
        self.settings = settings  # None: the process's runtime settings

    def routes(self) -> dict[str, Handler]:
        return {"/": self._guard(self.studies), "/study": self._guard(self.study),
                "/failures": self._guard(self.failures), "/models": self._guard(self.models),
                "/monitor": self._guard(self.monitor)}

    @staticmethod
    def _guard(page: Callable[[Query], Response]) -> Handler:
        def handler(query: Query) -> Response:
            try:
                return page(query)
            except ValueError as exc:  # a bad query parameter: say which
                return _page("message.html", HTTPStatus.BAD_REQUEST, title="Bad request", message=str(exc))
        return handler

    def studies(self, query: Query) -> Response:
        state = _one(query, "state")
        if state is not None and state.upper() not in audit.TIMELINE_STATES:
            raise ValueError(f"state must be one of {', '.join(audit.TIMELINE_STATES)}")
        limit = _limit(query, 50)
        rows = audit.rows(self.engine, audit.query("timeline", audit.Filters(
            state=state.upper() if state else None, current_only=True, limit=limit)))
        counts = audit.rows(self.engine, select(audit.TIMELINE.c.study_state, func.count().label("n"))
                            .where(audit.TIMELINE.c.is_current == 1).group_by(audit.TIMELINE.c.study_state)
                            .order_by(audit.TIMELINE.c.study_state))
        return _page("studies.html", columns=_STUDIES, rows=[_timeline_row(r) for r in rows], counts=counts,
                     state=state.upper() if state else None)

    def study(self, query: Query) -> Response:
        uid = _one(query, "uid")
        if uid is None:
            raise ValueError("give the study as /study?uid=STUDY_INSTANCE_UID")
        revisions = audit.rows(self.engine, audit.query("timeline", audit.Filters(study_uid=uid, limit=100)))
        if not revisions:
            return _page("message.html", HTTPStatus.NOT_FOUND, title="Study not found",
                         message=f"No study {uid} in the ledger.")
        sources = audit.rows(self.engine, select(audit.SOURCES).where(audit.SOURCES.c.study_instance_uid == uid))
        deliveries = audit.rows(self.engine, audit.query("deliveries", audit.Filters(study_uid=uid, limit=500)))
        events = audit.rows(self.engine, select(audit.EVENTS).where(audit.EVENTS.c.study_instance_uid == uid)
                            .order_by(audit.EVENTS.c.at, audit.EVENTS.c.event_id))
        columns = {"revisions": _REVISIONS, "sources": _SOURCES, "deliveries": _DELIVERIES, "events": _EVENTS}
        return _page("study.html", uid=uid, columns=columns, revisions=[_timeline_row(r) for r in revisions],
                     sources=sources, deliveries=deliveries, events=events)

    def failures(self, query: Query) -> Response:
        kind = _one(query, "kind")
        if kind is not None and kind not in audit.FAILURE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(audit.FAILURE_KINDS)}")
        rows = audit.rows(self.engine, audit.query("failures", audit.Filters(state=kind, limit=_limit(query, 100))))
        rows = [{**r, "from": f"{r['calling_ae']}@{r['peer_host']}" if r["calling_ae"] else None} for r in rows]
        return _page("failures.html", kinds=audit.FAILURE_KINDS, columns=_FAILURES, rows=rows)

    def models(self, query: Query) -> Response:
        rows = audit.rows(self.engine, select(audit.MODELS).order_by(audit.MODELS.c.last_used_at.desc()))
        return _page("models.html", columns=_MODELS, rows=rows)

    def monitor(self, query: Query) -> Response:
        from worker import runtime
        from worker.monitor import concordance, plots

        windows = _one(query, "windows") or "6"
        if not windows.isdigit() or not 1 <= int(windows) <= 24:
            raise ValueError("windows must be a whole number from 1 to 24")
        settings = self.settings or runtime.current().settings
        days = settings.monitor_window_days
        records = concordance.run(self.ledger, settings, concordance.Options(days, int(windows)))
        alarms = [f"{r.bundle} {r.version} {r.finding} {f} (window ending {r.end:%Y-%m-%d %H:%M})"
                  for r in records for f in r.alarms]
        graphs = [{"model": f"{name} {version}", "finding": finding,
                   "png": base64.b64encode(plots.png_bytes(rs)).decode()}
                  for (name, version, finding), rs in plots.grouped(records).items()]
        return _page("monitor.html", alarms=alarms, days=days, columns=_MONITOR,
                     rows=[_monitor_row(r) for r in records], plots=graphs)


def console_routes(ledger: Ledger) -> dict[str, Handler]:
    """The console's pages, to add to a process's HTTP routes."""
    return Console(ledger).routes()
