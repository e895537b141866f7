"""``pleura audit [timeline|deliveries|failures|notifications]`` and ``pleura audit role NAME``.

Reads only the audit views, so it also works logged in as the auditor role. Times are UTC;
``--since``/``--until`` take an ISO date or time (naive means UTC) or a duration back from
now (``90s``, ``30m``, ``24h``, ``7d``, ``2w``).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from worker.ledger import audit
from worker.settings import Settings

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 characters, no backslash or control


def parse_when(value: str, now: datetime) -> datetime:
    """An aware UTC datetime from ISO text or a duration back from ``now``."""
    match = _DURATION.match(value)
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise audit.AuditError(f"{value!r} is neither an ISO date/time (2026-11-24, 2026-11-24T14:00Z) "
                               "nor a duration back from now (30m, 24h, 7d)") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def filters(args: argparse.Namespace, now: datetime) -> audit.Filters:
    """Checked filters from the command line; :class:`audit.AuditError` names the bad one."""
    def when(option: str, value: str | None) -> datetime | None:
        try:
            return parse_when(value, now) if value else None
        except audit.AuditError as exc:
            raise audit.AuditError(f"{option}: {exc}") from None

    since, until = when("--since", args.since), when("--until", args.until)
    if since and until and since >= until:
        raise audit.AuditError(f"--since ({since:%Y-%m-%d %H:%M:%S}) must be before --until "
                               f"({until:%Y-%m-%d %H:%M:%S}) (UTC)")
    if args.calling_ae is not None and not _AE.match(args.calling_ae):
        raise audit.AuditError(f"--calling-ae {args.calling_ae!r} is not an AE title (1-16 characters)")
    state = None
    if args.state is not None:
        allowed = {"timeline": audit.TIMELINE_STATES, "deliveries": audit.DELIVERY_STATES,
                   "failures": audit.FAILURE_KINDS, "notifications": audit.NOTIFICATION_STATES}[args.view]
        state = args.state.lower() if args.view == "failures" else args.state.upper()
        if state not in allowed:
            option = "--kind" if args.view == "failures" else "--state"
            raise audit.AuditError(f"{option} {args.state!r} is not one of {', '.join(allowed)}")
    model, version = None, None
    if args.model is not None:
        model, _, version = args.model.partition(":")
        if not model.strip() or (":" in args.model and not version.strip()):
            raise audit.AuditError(f"--model {args.model!r} is not NAME or NAME:VERSION")
    if args.limit < 1:
        raise audit.AuditError(f"--limit must be at least 1, not {args.limit}")
    return audit.Filters(since=since, until=until, calling_ae=args.calling_ae, state=state, model=model,
                         model_version=version or None, limit=args.limit)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _short_time(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _clip(value: str | None, width: int = 60) -> str:
    value = " ".join((value or "-").split())
    return value if len(value) <= width else value[: width - 1] + "…"


def _model(row: dict[str, Any]) -> str:
    return f"{row['bundle_name']} {row['bundle_version']}" if row["bundle_name"] else "-"


# per view: (header, cell text, right-aligned)
_COLUMNS: dict[str, list[tuple[str, Any, bool]]] = {
    "timeline": [
        ("RECEIVED (UTC)", lambda r: _short_time(r["last_received_at"]), False),
        ("STUDY INSTANCE UID", lambda r: r["study_instance_uid"], False),
        ("REV", lambda r: str(r["revision"]), True),
        ("STATE", lambda r: r["study_state"] if r["is_current"] else r["job_state"], False),
        ("FROM", lambda r: r["calling_aes"] or "-", False),
        ("IMG", lambda r: str(r["instances"]), True),
        ("MODEL", _model, False),
        ("TRIES", lambda r: str(r["attempts"]), True),
        ("COMPLETED BY", lambda r: r["completed_by"] or "-", False),
        ("QUIET", lambda r: audit.human_seconds(r["quiet_s"]), True),
        ("WAIT", lambda r: audit.human_seconds(r["wait_s"]), True),
        ("PROCESS", lambda r: audit.human_seconds(r["processing_s"]), True),
        ("DELIVER", lambda r: audit.human_seconds(r["delivery_s"]), True),
        ("TOTAL", lambda r: audit.human_seconds(r["total_s"]), True),
        ("SENT", lambda r: f"{r['deliveries_delivered']}/{r['deliveries']}"
         + (f" ({r['deliveries_failed']} failed)" if r["deliveries_failed"] else ""), False),
    ],
    "deliveries": [
        ("CREATED (UTC)", lambda r: _short_time(r["created_at"]), False),
        ("STUDY INSTANCE UID", lambda r: r["study_instance_uid"], False),
        ("OBJ", lambda r: r["object_kind"], False),
        ("DESTINATION", lambda r: r["destination"], False),
        ("STATE", lambda r: r["state"], False),
        ("TRIES", lambda r: str(r["attempts"]), True),
        ("STATUS", lambda r: r["peer_status"] or "-", False),
        ("TOOK", lambda r: audit.human_seconds(r["delivery_s"]), True),
        ("LAST ERROR", lambda r: _clip(r["last_error"]), False),
    ],
    "failures": [
        ("AT (UTC)", lambda r: _short_time(r["at"]), False),
        ("KIND", lambda r: r["kind"], False),
        ("STUDY INSTANCE UID", lambda r: r["study_instance_uid"] or "-", False),
        ("FROM", lambda r: f"{r['calling_ae']}@{r['peer_host']}" if r["calling_ae"] else "-", False),
        ("DESTINATION", lambda r: r["destination"] or "-", False),
        ("TRIES", lambda r: str(r["attempts"]) if r["attempts"] is not None else "-", True),
        ("STATUS", lambda r: r["status"] or "-", False),
        ("REASON", lambda r: _clip(r["reason"], 80), False),
    ],
    "notifications": [
        ("CREATED (UTC)", lambda r: _short_time(r["created_at"]), False),
        ("STUDY INSTANCE UID", lambda r: r["study_instance_uid"], False),
        ("REV", lambda r: str(r["revision"]), True),
        ("TO", lambda r: f"{r['protocol']} {r['destination']}", False),
        ("TRIAGE", lambda r: "FLAG" if r["triage"] else "-", False),
        ("STATE", lambda r: r["state"], False),
        ("TRIES", lambda r: str(r["attempts"]), True),
        ("ANSWER", lambda r: r["peer_answer"] or "-", False),
        ("CONTROL ID", lambda r: r["control_id"], False),
        ("AFTER SR", lambda r: audit.human_seconds(r["notify_s"]), True),
        ("LAST ERROR", lambda r: _clip(r["last_error"]), False),
    ],
}


def table(view: str, rows: list[dict[str, Any]]) -> str:
    """Aligned columns for a terminal, durations human-readable."""
    if not rows:
        return f"no {view} rows match"
    columns = _COLUMNS[view]
    cells = [[cell(r) for _, cell, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if right else v.ljust(w)
                         for v, w, (_, _, right) in zip(values, widths, columns, strict=True)).rstrip()

    return "\n".join([line([h for h, _, _ in columns]), *(line(c) for c in cells)])


def cmd_audit(settings: Settings, args: argparse.Namespace) -> None:
    from sqlalchemy.exc import DBAPIError

    from worker.ledger.db import Ledger

    try:
        checked = filters(args, datetime.now(UTC))
    except audit.AuditError as exc:
        sys.exit(f"error: {exc}")
    ledger = Ledger(settings.effective_database_url)
    try:
        found = audit.rows(ledger.engine, audit.query(args.view, checked))
    except DBAPIError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        sys.exit(f"error: cannot read the audit view ({first}); is the schema current (`pleura db upgrade`)?")
    finally:
        ledger.close()
    if args.format == "json":
        print(json.dumps([{k: _cell(v) if isinstance(v, datetime) else v for k, v in r.items()} for r in found],
                         indent=2, default=str))
    elif args.format == "csv":
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow([c.name for c in audit.TABLES[args.view].columns])
        out.writerows([_cell(r[c.name]) for c in audit.TABLES[args.view].columns] for r in found)
    else:
        print(table(args.view, found))


def cmd_role(settings: Settings, args: argparse.Namespace) -> None:
    from sqlalchemy.exc import DBAPIError

    from worker.ledger.db import Ledger

    password = None
    if args.password_file is not None:
        try:
            lines = args.password_file.read_text().splitlines()
        except OSError as exc:
            sys.exit(f"error: cannot read the password file: {exc}")
        password = lines[0] if lines else ""
        if not password:
            sys.exit(f"error: the password file {args.password_file} is empty")
    ledger = Ledger(settings.effective_database_url)
    try:
        views = audit.grant_auditor(ledger.engine, args.name, args.login or password is not None, password)
    except audit.AuditError as exc:
        sys.exit(f"error: {exc}")
    except DBAPIError as exc:
        sys.exit(f"error: {str(exc.orig).strip().splitlines()[0] if exc.orig else exc}")
    finally:
        ledger.close()
    login = "LOGIN" if args.login or password is not None else "NOLOGIN"
    print(f"role {args.name} ({login}): SELECT on {', '.join(views)}; no access to the ledger tables")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``audit`` to the ``pleura`` parser; bare ``pleura audit`` is ``pleura audit timeline``."""
    text = "the audit trail: arrivals, processing, deliveries, failures"
    p = sub.add_parser("audit", help=text, description=f"{text}; bare `pleura audit` is `pleura audit timeline`.")
    p.set_defaults(func=cmd_audit, view="timeline", since=None, until=None, calling_ae=None, state=None,
                   model=None, limit=50, format="table")
    views = p.add_subparsers(dest="view", metavar="{timeline,deliveries,failures,notifications,role}")
    views.default = "timeline"  # bare `pleura audit`
    for view, text in (("timeline", "each study revision: arrivals, queue, processing, delivery, durations"),
                       ("deliveries", "each output object sent to each destination"),
                       ("failures", "quarantined jobs, failed deliveries and notifications, refused instances, "
                        "rejected associations"),
                       ("notifications", "each analysed result told to each RIS (HL7 v2, FHIR)")):
        v = views.add_parser(view, help=text, description=text)
        v.add_argument("--since", help="ISO date/time (UTC unless given) or a duration back from now: 24h, 7d")
        v.add_argument("--until", help="same forms as --since (exclusive)")
        v.add_argument("--calling-ae", help="studies sent by this AE title")
        if view == "failures":
            v.add_argument("--kind", dest="state", help=", ".join(audit.FAILURE_KINDS))
        else:
            v.add_argument("--state", help=", ".join({"timeline": audit.TIMELINE_STATES,
                                                      "deliveries": audit.DELIVERY_STATES}.get(
                                                          view, audit.NOTIFICATION_STATES)))
        v.add_argument("--model", help="bundle NAME or NAME:VERSION")
        v.add_argument("--limit", type=int, default=50, help="newest N rows (default 50)")
        output = v.add_mutually_exclusive_group()
        output.add_argument("--format", choices=["table", "csv", "json"], default="table",
                            help="a table for the terminal (default), CSV, or JSON")
        output.add_argument("--json", dest="format", action="store_const", const="json",
                            help="print the rows as a JSON list (same as --format json)")
        v.set_defaults(func=cmd_audit)
    text = "create or update the read-only auditor role (PostgreSQL)"
    r = views.add_parser("role", help=text, description=f"{text}: it may read the audit views, not the ledger.")
    r.add_argument("name", help="role name, e.g. pleura_auditor")
    r.add_argument("--login", action="store_true", help="the role may log in (implied by --password-file)")
    r.add_argument("--password-file", type=Path, help="file holding the role's password (first line)")
    r.set_defaults(func=cmd_role)
