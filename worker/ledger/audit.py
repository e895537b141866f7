"""The audit views (migration 0003) as tables to query, their filters, and the auditor role.

``pleura audit`` and the admin console read only these views, so whatever they show an
auditor can also get with plain SQL, logged in as the read-only role made by
:func:`grant_auditor`. docs/audit/README.md describes the views column by column.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, DateTime, Engine, MetaData, Select, Table, and_, or_, select, text
from sqlalchemy.types import NullType

from worker.ledger.models import DeliveryState, JobState, NotificationState, StudyState

_META = MetaData()


def _view(name: str, *columns: str) -> Table:
    """Timestamps (``at``, ``*_at``) are typed so that SQLite's text comes back as datetimes."""
    return Table(name, _META, *(Column(c, DateTime(timezone=True) if c == "at" or c.endswith("_at") else NullType)
                                for c in columns))


SOURCES = _view("v_study_sources", "study_id", "study_instance_uid", "calling_ae", "called_ae", "peer_host",
                "instances", "bytes", "first_received_at", "last_received_at")
TIMELINE = _view("v_study_timeline", "study_id", "study_instance_uid", "revision", "is_current", "study_state",
                 "job_id", "job_state", "calling_aes", "instances", "first_received_at", "last_received_at",
                 "queued_at", "started_at", "finished_at", "delivered_at", "bundle_name", "bundle_version", "backend",
                 "attempts", "deliveries", "deliveries_delivered", "deliveries_failed", "destinations", "error",
                 "quiet_s", "wait_s", "processing_s", "delivery_s", "total_s", "completed_by")
DELIVERIES = _view("v_deliveries", "delivery_id", "study_id", "study_instance_uid", "job_id", "revision",
                   "object_kind", "object_uid", "destination", "state", "attempts", "peer_status", "last_error",
                   "bundle_name", "bundle_version", "created_at", "last_attempt_at", "delivered_at", "delivery_s")
FAILURES = _view("v_failures", "at", "kind", "study_id", "study_instance_uid", "job_id", "delivery_id", "calling_ae",
                 "peer_host", "destination", "sop_instance_uid", "attempts", "status", "reason", "bundle_name",
                 "bundle_version")
MODELS = _view("v_models", "bundle_name", "bundle_version", "backend", "jobs", "studies", "first_used_at",
               "last_used_at")
EVENTS = _view("v_events", "event_id", "at", "kind", "study_id", "study_instance_uid", "job_id", "detail")
NOTIFICATIONS = _view("v_notifications", "notification_id", "study_id", "study_instance_uid", "job_id", "revision",
                      "protocol", "destination", "state", "triage", "control_id", "attempts", "peer_answer",
                      "last_error", "bundle_name", "bundle_version", "created_at", "released_at", "last_attempt_at",
                      "delivered_at", "notify_s", "result_to_notified_s")
REPORTS = _view("v_reports", "report_id", "study_id", "study_instance_uid", "source", "status", "labeler", "labels",
                "reported_at", "received_at", "matched_at", "superseded_at")
VIEWS = (SOURCES, TIMELINE, DELIVERIES, FAILURES, MODELS, EVENTS, NOTIFICATIONS, REPORTS)

# what ``--since``/``--until`` compare, and the newest-first order, per view
TIME_COLUMN = {"timeline": TIMELINE.c.last_received_at, "deliveries": DELIVERIES.c.created_at,
               "failures": FAILURES.c.at, "notifications": NOTIFICATIONS.c.created_at}
TABLES = {"timeline": TIMELINE, "deliveries": DELIVERIES, "failures": FAILURES, "notifications": NOTIFICATIONS}
TIMELINE_STATES = sorted({v for k, v in vars(StudyState).items() if k.isupper()}
                         | {v for k, v in vars(JobState).items() if k.isupper()})
DELIVERY_STATES = sorted(getattr(DeliveryState, k) for k in dir(DeliveryState) if k.isupper())
NOTIFICATION_STATES = sorted(getattr(NotificationState, k) for k in dir(NotificationState) if k.isupper())
FAILURE_KINDS = ["association_rejected", "delivery_failed", "instance_refused", "job_failed", "notification_failed"]


class AuditError(ValueError):
    """A request the audit cannot answer as asked (bad filter, wrong database)."""


@dataclass(frozen=True)
class Filters:
    since: datetime | None = None
    until: datetime | None = None
    calling_ae: str | None = None
    state: str | None = None  # study/job state (timeline), delivery state, or failure kind
    model: str | None = None
    model_version: str | None = None
    study_uid: str | None = None
    current_only: bool = False  # timeline: only each study's latest revision
    limit: int = 50


def query(view: str, filters: Filters) -> Select:
    """Newest first, filtered; ``view`` is ``timeline``, ``deliveries``, ``failures`` or ``notifications``."""
    table, when = TABLES[view], TIME_COLUMN[view]
    stmt = select(table)
    if filters.since:
        stmt = stmt.where(when >= filters.since.astimezone(UTC))
    if filters.until:
        stmt = stmt.where(when < filters.until.astimezone(UTC))
    if filters.calling_ae:
        from_ae = table.c.study_id.in_(select(SOURCES.c.study_id).where(SOURCES.c.calling_ae == filters.calling_ae))
        stmt = stmt.where(or_(from_ae, table.c.calling_ae == filters.calling_ae) if view == "failures" else from_ae)
    if filters.state:
        if view == "timeline":
            stmt = stmt.where(or_(and_(TIMELINE.c.is_current == 1, TIMELINE.c.study_state == filters.state),
                                  TIMELINE.c.job_state == filters.state))
        else:
            stmt = stmt.where((FAILURES.c.kind if view == "failures" else table.c.state) == filters.state)
    if filters.model:
        stmt = stmt.where(table.c.bundle_name == filters.model)
    if filters.model_version:
        stmt = stmt.where(table.c.bundle_version == filters.model_version)
    if filters.study_uid:
        stmt = stmt.where(table.c.study_instance_uid == filters.study_uid)
    if filters.current_only and view == "timeline":
        stmt = stmt.where(TIMELINE.c.is_current == 1)
    # ties: a study's revisions newest first; the objects of one result in the order they were made
    tie = {"timeline": [TIMELINE.c.revision.desc()], "deliveries": [DELIVERIES.c.delivery_id],
           "notifications": [NOTIFICATIONS.c.notification_id]}.get(view, [])
    order = [when.desc(), *tie]
    return stmt.order_by(*order).limit(filters.limit)


def rows(engine: Engine, stmt: Select) -> list[dict[str, Any]]:
    """The rows as dicts; timestamps aware UTC (SQLite returns them naive)."""
    with engine.connect() as conn:
        return [{k: v.replace(tzinfo=UTC) if isinstance(v, datetime) and v.tzinfo is None else v
                 for k, v in row.items()} for row in conn.execute(stmt).mappings()]


def human_seconds(value: float | None) -> str:
    """``0.42 s``, ``12.3 s``, ``4 min 05 s``, ``2 h 07 min``, ``3 d 04 h``; ``-`` for none."""
    if value is None:
        return "-"
    seconds = float(value)
    if abs(seconds) < 10:
        return f"{seconds:.2f} s"
    if abs(seconds) < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1)):
        if whole >= size:
            return f"{whole // size} {unit} {whole % size // sub_size:02d} {sub}"
    return f"{whole} s"


def grant_auditor(engine: Engine, role: str, login: bool, password: str | None) -> list[str]:
    """Create or update ``role``: SELECT on the audit views, nothing on the tables (PostgreSQL).

    A view runs with its owner's rights, so the role reads the views without any grant on the
    tables behind them. Returns the views granted. Refuses the role that owns the tables, the
    current user and superusers (they would keep reading everything).
    """
    if engine.dialect.name != "postgresql":
        raise AuditError("an auditor role exists on PostgreSQL only (an embedded SQLite ledger is a file: "
                         "give auditors a read-only copy or file permission)")
    quote = engine.dialect.identifier_preparer.quote
    name = quote(role)
    with engine.begin() as conn:
        schema, database, me = conn.execute(text("SELECT current_schema(), current_database(), current_user")).one()
        existing = conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
        owns = conn.scalar(text("SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
                                "WHERE r.rolname = :r"), {"r": role})
        if role == me or owns or (existing and existing.rolsuper):
            raise AuditError(f"role {role!r} owns tables, is a superuser or is the current user: it cannot be "
                             "made a read-only auditor; choose another name")
        verb = "ALTER" if existing else "CREATE"
        conn.execute(text(f"{verb} ROLE {name} {'LOGIN' if login else 'NOLOGIN'} NOSUPERUSER NOCREATEDB "
                          "NOCREATEROLE NOINHERIT"))
        if password is not None:  # psycopg2 binds the literal client-side (ALTER ROLE takes no parameters)
            conn.execute(text(f"ALTER ROLE {name} PASSWORD :password"), {"password": password})
        conn.execute(text(f"GRANT CONNECT ON DATABASE {quote(database)} TO {name}"))
        conn.execute(text(f"GRANT USAGE ON SCHEMA {quote(schema)} TO {name}"))
        conn.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA {quote(schema)} FROM {name}"))
        for view in VIEWS:
            conn.execute(text(f"GRANT SELECT ON {quote(view.name)} TO {name}"))
    return [view.name for view in VIEWS]
