"""The read-only admin console: server-rendered HTML from the audit views, no scripts, no external assets.

``/`` studies with state and timings (``?state=``, ``?limit=``), ``/study?uid=`` one study's
revisions, sources, deliveries and events, ``/failures`` (``?kind=``), ``/models``, ``/monitor``
each model against the final reports (``?windows=``; :mod:`worker.monitor`, which reads the ledger's
tables, records new alarms and refreshes the monitor gauges). Every value is HTML-escaped; the
views hold no patient names, IDs or birth dates.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from worker.ledger import audit
from worker.ledger.db import Ledger
from worker.web.server import Handler, Response, text

if TYPE_CHECKING:
    from worker.monitor.concordance import Record
    from worker.settings import Settings

Query = Mapping[str, list[str]]
Cell = Callable[[dict[str, Any]], str]  # returns HTML (escaped)

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2733;background:#f6f8fa}
header{background:#1d3557;color:#fff;padding:10px 16px;display:flex;gap:24px;align-items:baseline}
header b{font-size:18px}header a{color:#cfe3ff;text-decoration:none}main{padding:8px 16px}h1{margin:8px 0}
table{border-collapse:collapse;background:#fff;margin:8px 0 20px;font-size:13px}
th,td{padding:3px 6px;border-bottom:1px solid #e1e4e8;text-align:left;white-space:nowrap}
th{background:#eef1f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
td.w{white-space:normal;min-width:20em}.uid{font-family:ui-monospace,monospace;font-size:12px}
.s{padding:1px 6px;border-radius:3px;font-size:12px;font-weight:600;background:#e1e4e8}
.DONE,.DELIVERED,.SUCCEEDED{background:#d4f4dd;color:#145a2a}.FAILED{background:#fbd7d7;color:#8a1c1c}
.QUEUED,.PROCESSING,.RUNNING,.PENDING,.SENDING,.RECEIVING{background:#fff1c2;color:#6b4e00}
.sum a{text-decoration:none;color:inherit;margin-right:10px}
footer{color:#6a737d;font-size:12px;padding:0 16px 16px}
.alarm{background:#fbd7d7;color:#8a1c1c;padding:8px 12px;border-radius:4px;font-weight:600}
img{max-width:100%;background:#fff}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _time(value: datetime | None) -> str:
    return _e(value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")) if value else "-"


def _state(value: str | None) -> str:
    return f'<span class="s {_e(value)}">{_e(value)}</span>' if value else "-"


def _study_link(uid: str | None) -> str:
    if not uid:
        return "-"
    return f'<a class="uid" href="/study?uid={html.escape(uid, quote=True)}">{_e(uid)}</a>'


def _dur(key: str) -> Cell:
    return lambda r: _e(audit.human_seconds(r[key]))


def _table(columns: list[tuple[str, Cell, str]], rows: Iterable[dict[str, Any]], empty: str) -> str:
    """``columns``: (header, cell, css class: ``n`` numbers, ``w`` wrapping text, or "")."""
    rows = list(rows)
    if not rows:
        return f"<p>{_e(empty)}</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h, _, _ in columns)
    body = "".join("<tr>" + "".join(f'<td class="{css}">{cell(r)}</td>' for _, cell, css in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str, status: int = HTTPStatus.OK) -> Response:
    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)} · Pleura</title>'
           f"<style>{_STYLE}</style></head><body><header><b>Pleura</b>"
           '<a href="/">Studies</a><a href="/failures">Failures</a><a href="/models">Models</a>'
           '<a href="/monitor">Monitoring</a></header>'
           f"<main><h1>{_e(title)}</h1>{body}</main><footer>Read-only. Times in UTC. The ledger holds no "
           f"patient names, IDs or birth dates. Rendered {_time(datetime.now(UTC))}.</footer></body></html>")
    return text(status, doc, "text/html; charset=utf-8")


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


def _col(header: str, key: str, css: str = "") -> tuple[str, Cell, str]:
    """A column showing ``row[key]`` escaped, ``-`` when empty."""
    return header, lambda r: _e("-" if r[key] is None or r[key] == "" else r[key]), css


def _at(header: str, key: str) -> tuple[str, Cell, str]:
    return header, lambda r: _time(r[key]), ""


def _model(r: dict[str, Any]) -> str:
    return _e(f"{r['bundle_name']} {r['bundle_version']}") if r["bundle_name"] else "-"


def _sent(r: dict[str, Any]) -> str:
    failed = f" ({r['deliveries_failed']} failed)" if r["deliveries_failed"] else ""
    return _e(f"{r['deliveries_delivered']}/{r['deliveries']}{failed}")


_TIMING: list[tuple[str, Cell, str]] = [
    _col("Completed by", "completed_by"),
    ("Quiet", _dur("quiet_s"), "n"), ("Wait", _dur("wait_s"), "n"), ("Process", _dur("processing_s"), "n"),
    ("Deliver", _dur("delivery_s"), "n"), ("Total", _dur("total_s"), "n"), ("Sent", _sent, "n"),
]
_STUDIES = [
    _at("Last received", "last_received_at"),
    ("Study Instance UID", lambda r: _study_link(r["study_instance_uid"]), ""), _col("Rev", "revision", "n"),
    ("State", lambda r: _state(r["study_state"]), ""), _col("From", "calling_aes"), _col("Images", "instances", "n"),
    ("Model", _model, ""), _col("Tries", "attempts", "n"), *_TIMING,
]
_REVISIONS = [
    _col("Rev", "revision", "n"),
    ("State", lambda r: _state(r["study_state"] if r["is_current"] else r["job_state"]), ""),
    _at("Queued", "queued_at"), _at("Started", "started_at"), _at("Finished", "finished_at"),
    _at("Delivered", "delivered_at"), ("Model", _model, ""), _col("Backend", "backend"),
    _col("Tries", "attempts", "n"), *_TIMING, _col("Error", "error", "w"),
]
_SOURCES = [
    _col("Calling AE", "calling_ae"), _col("Called AE", "called_ae"), _col("Peer", "peer_host"),
    _col("Images", "instances", "n"), _col("Bytes", "bytes", "n"), _at("First", "first_received_at"),
    _at("Last", "last_received_at"),
]
_DELIVERIES = [
    _col("Rev", "revision", "n"), _col("Object", "object_kind"), _col("Destination", "destination"),
    ("State", lambda r: _state(r["state"]), ""), _col("Tries", "attempts", "n"), _col("Status", "peer_status"),
    _at("Delivered", "delivered_at"), ("Took", _dur("delivery_s"), "n"), _col("Last error", "last_error", "w"),
]
_EVENTS = [_at("At", "at"), _col("Event", "kind"), _col("Job", "job_id", "n"), _col("Detail", "detail", "w")]
_FAILURES = [
    _at("At", "at"), _col("Kind", "kind"), ("Study", lambda r: _study_link(r["study_instance_uid"]), ""),
    ("From", lambda r: _e(f"{r['calling_ae']}@{r['peer_host']}" if r["calling_ae"] else "-"), ""),
    _col("Destination", "destination"), _col("Tries", "attempts", "n"), _col("Status", "status"),
    _col("Reason", "reason", "w"),
]
_MODELS = [
    _col("Bundle", "bundle_name"), _col("Version", "bundle_version"), _col("Backend", "backend"),
    _col("Jobs", "jobs", "n"), _col("Studies", "studies", "n"), _at("First used", "first_used_at"),
    _at("Last used", "last_used_at"),
]
_FIGURES = ("sensitivity", "specificity", "ppv", "npv", "auc")
_MONITOR = [
    _col("Model", "model"), _col("Finding", "finding"), _at("Window end", "end"), _col("Pairs", "n", "n"),
    _col("Pos", "positives", "n"), _col("Neg", "negatives", "n"), _col("Excl.", "excluded", "n"),
    _col("Unlab.", "unlabelled", "n"),
    *(_col(f.upper() if len(f) == 3 else f.capitalize(), f) for f in _FIGURES),
    _col("Model card", "stated", "w"),
    ("Alarm", lambda r: f'<span class="s FAILED">{_e(r["alarms"])}</span>' if r["alarms"] else "-", ""),
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
                return _page("Bad request", f"<p>{_e(exc)}</p>", HTTPStatus.BAD_REQUEST)
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
        summary = "".join(f'<a href="/?state={_e(c["study_state"])}">{_state(c["study_state"])} {c["n"]}</a>'
                          for c in counts) or "no studies yet "
        shown = f"{len(rows)} most recent" + (f" in state {state.upper()}" if state else "")
        body = (f'<p class="sum">{summary}<a href="/">all</a></p><p>{_e(shown)}. '
                "Completed by: the rule that found the study complete (association: released and settled; "
                "quiet: no image for the quiet period; max_wait: arriving too long). Quiet: last image to queued, "
                "Wait: queued to started, Process: started to results, Deliver: results to all delivered.</p>"
                + _table(_STUDIES, rows, "no studies match"))
        return _page("Studies", body)

    def study(self, query: Query) -> Response:
        uid = _one(query, "uid")
        if uid is None:
            raise ValueError("give the study as /study?uid=STUDY_INSTANCE_UID")
        revisions = audit.rows(self.engine, audit.query("timeline", audit.Filters(study_uid=uid, limit=100)))
        if not revisions:
            return _page("Study not found", f"<p>No study {_e(uid)} in the ledger.</p>", HTTPStatus.NOT_FOUND)
        sources = audit.rows(self.engine, select(audit.SOURCES).where(audit.SOURCES.c.study_instance_uid == uid))
        deliveries = audit.rows(self.engine, audit.query("deliveries", audit.Filters(study_uid=uid, limit=500)))
        events = audit.rows(self.engine, select(audit.EVENTS).where(audit.EVENTS.c.study_instance_uid == uid)
                            .order_by(audit.EVENTS.c.at, audit.EVENTS.c.event_id))
        body = (f'<p class="uid">{_e(uid)}</p><h2>Revisions</h2>' + _table(_REVISIONS, revisions, "")
                + "<h2>Received from</h2>" + _table(_SOURCES, sources, "no instances")
                + "<h2>Deliveries</h2>" + _table(_DELIVERIES, deliveries, "no results produced yet")
                + "<h2>Events</h2>" + _table(_EVENTS, events, "no events"))
        return _page("Study", body)

    def failures(self, query: Query) -> Response:
        kind = _one(query, "kind")
        if kind is not None and kind not in audit.FAILURE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(audit.FAILURE_KINDS)}")
        rows = audit.rows(self.engine, audit.query("failures", audit.Filters(state=kind, limit=_limit(query, 100))))
        links = " · ".join(f'<a href="/failures?kind={k}">{k.replace("_", " ")}</a>' for k in audit.FAILURE_KINDS)
        body = f'<p><a href="/failures">all</a> · {links}</p>' + _table(_FAILURES, rows, "no failures recorded")
        return _page("Failures", body)

    def models(self, query: Query) -> Response:
        rows = audit.rows(self.engine, select(audit.MODELS).order_by(audit.MODELS.c.last_used_at.desc()))
        body = ("<p>Bundle versions that produced results, with how many jobs and studies.</p>"
                + _table(_MODELS, rows, "no model has produced results yet"))
        return _page("Models", body)

    def monitor(self, query: Query) -> Response:
        import base64

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
        banner = (f'<p class="alarm">Alarm: {len(alarms)} figures lie wholly below the model card: '
                  f"{_e('; '.join(alarms))}.</p>" if alarms else "")
        images = "".join(f"<h2>{_e(' '.join(key[:2]))} · {_e(key[2])}</h2><img alt=\"{_e(' '.join(key))} over time\" "
                         f'src="data:image/png;base64,{base64.b64encode(plots.png_bytes(rs)).decode()}">'
                         for key, rs in plots.grouped(records).items())
        body = (f"{banner}<p>Each analysed study with a final report is a pair: the model's highest probability "
                "of the finding over the study's images and its call against the report's label (uncertain left "
                f"out, not mentioned counted absent), in windows of {days:g} days by analysis time, the newest "
                "ending now. Figures with 95% intervals (Wilson; AUC: DeLong). An alarm: a figure's whole interval "
                "below the model card's value.</p>"
                + _table(_MONITOR, [_monitor_row(r) for r in records], "no analysed study in these windows")
                + images)
        return _page("Monitoring", body)


def console_routes(ledger: Ledger) -> dict[str, Handler]:
    """The console's pages, to add to a process's HTTP routes."""
    return Console(ledger).routes()
