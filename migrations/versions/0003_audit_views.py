"""audit views

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 10:00:00

Read-only views for auditors (``pleura audit``, the admin console, plain SQL), the same
columns on PostgreSQL and SQLite; dialect differences (seconds between two timestamps, string
aggregation, JSON event details) are written per dialect below. The views hold no patient
names, IDs or birth dates: the ledger does not store them. docs/audit/README.md describes
every column.
"""
from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS = ('v_study_sources', 'v_study_timeline', 'v_deliveries', 'v_failures', 'v_models', 'v_events')


class _Sql:
    """The few expressions that PostgreSQL and SQLite spell differently."""

    def __init__(self, dialect: str) -> None:
        self.pg = dialect == 'postgresql'

    def seconds(self, start: str, end: str) -> str:
        if self.pg:
            return f'CAST(ROUND(CAST(EXTRACT(EPOCH FROM ({end} - {start})) AS NUMERIC), 3) AS DOUBLE PRECISION)'
        return f'ROUND((julianday({end}) - julianday({start})) * 86400.0, 3)'

    def agg(self, column: str) -> str:
        """Distinct values joined with commas."""
        return f"string_agg(DISTINCT {column}, ',')" if self.pg else f'group_concat(DISTINCT {column})'

    def detail(self, key: str) -> str:
        """A text field of an event's JSON ``detail``."""
        return f"(CAST(e.detail AS json) ->> '{key}')" if self.pg else f"json_extract(e.detail, '$.{key}')"

    def hex_status(self, column: str) -> str:
        if self.pg:
            return f"'0x' || upper(lpad(to_hex({column}), 4, '0'))"
        return f"CASE WHEN {column} IS NOT NULL THEN printf('0x%04X', {column}) END"


def _definitions(sql: _Sql) -> dict[str, str]:
    text, int_ = 'CAST(NULL AS VARCHAR(300))', 'CAST(NULL AS INTEGER)'
    return {
        # what arrived from whom: one row per (study, calling AE, peer)
        'v_study_sources': """
SELECT i.study_id, s.study_instance_uid, a.calling_ae, a.called_ae, a.peer_host,
       count(*) AS instances, sum(i.size_bytes) AS bytes,
       min(i.received_at) AS first_received_at, max(i.received_at) AS last_received_at
FROM instances i
JOIN studies s ON s.id = i.study_id
LEFT JOIN associations a ON a.id = i.association_id
GROUP BY i.study_id, s.study_instance_uid, a.calling_ae, a.called_ae, a.peer_host""",
        # one row per job (study revision), plus the current revision of a study not queued yet
        'v_study_timeline': f"""
SELECT t.*,
       {sql.seconds('t.last_received_at', 't.queued_at')} AS quiet_s,
       {sql.seconds('t.queued_at', 't.started_at')} AS wait_s,
       {sql.seconds('t.started_at', 't.finished_at')} AS processing_s,
       {sql.seconds('t.finished_at', 't.delivered_at')} AS delivery_s,
       {sql.seconds('t.last_received_at', 't.delivered_at')} AS total_s
FROM (
  SELECT s.id AS study_id, s.study_instance_uid, r.revision,
         CASE WHEN r.revision = s.revision THEN 1 ELSE 0 END AS is_current,
         s.state AS study_state, j.id AS job_id, j.state AS job_state,
         src.calling_aes, COALESCE(src.instances, 0) AS instances,
         s.first_received_at,
         COALESCE((SELECT max(i.received_at) FROM instances i
                   WHERE i.study_id = s.id AND i.received_at <= j.created_at),
                  s.last_received_at) AS last_received_at,
         j.created_at AS queued_at, att.started_at, j.finished_at,
         CASE WHEN dl.total > 0 AND dl.delivered = dl.total THEN dl.last_delivered_at END AS delivered_at,
         j.bundle_name, j.bundle_version, j.backend, COALESCE(j.attempts, 0) AS attempts,
         COALESCE(dl.total, 0) AS deliveries, COALESCE(dl.delivered, 0) AS deliveries_delivered,
         COALESCE(dl.failed, 0) AS deliveries_failed, dl.destinations, j.error
  FROM studies s
  JOIN (SELECT id AS job_id, study_id, revision FROM jobs
        UNION ALL
        SELECT {int_}, st.id, st.revision FROM studies st
        WHERE NOT EXISTS (SELECT 1 FROM jobs jj WHERE jj.study_id = st.id AND jj.revision = st.revision)
       ) r ON r.study_id = s.id
  LEFT JOIN jobs j ON j.id = r.job_id
  LEFT JOIN (SELECT job_id, min(started_at) AS started_at FROM attempts GROUP BY job_id) att ON att.job_id = j.id
  LEFT JOIN (SELECT o.job_id, count(*) AS total,
                    sum(CASE WHEN d.state = 'DELIVERED' THEN 1 ELSE 0 END) AS delivered,
                    sum(CASE WHEN d.state = 'FAILED' THEN 1 ELSE 0 END) AS failed,
                    max(d.delivered_at) AS last_delivered_at, {sql.agg('d.destination')} AS destinations
             FROM output_objects o JOIN deliveries d ON d.output_object_id = o.id
             GROUP BY o.job_id) dl ON dl.job_id = j.id
  LEFT JOIN (SELECT i.study_id, count(*) AS instances, {sql.agg('a.calling_ae')} AS calling_aes
             FROM instances i LEFT JOIN associations a ON a.id = i.association_id
             GROUP BY i.study_id) src ON src.study_id = s.id
) t""",
        'v_deliveries': f"""
SELECT d.id AS delivery_id, s.id AS study_id, s.study_instance_uid, j.id AS job_id, j.revision,
       o.kind AS object_kind, o.sop_instance_uid AS object_uid, d.destination, d.state, d.attempts,
       {sql.hex_status('d.peer_status')} AS peer_status, d.last_error, j.bundle_name, j.bundle_version,
       o.created_at, d.last_attempt_at, d.delivered_at,
       {sql.seconds('o.created_at', 'd.delivered_at')} AS delivery_s
FROM deliveries d
JOIN output_objects o ON o.id = d.output_object_id
JOIN jobs j ON j.id = o.job_id
JOIN studies s ON s.id = j.study_id""",
        # quarantined jobs, deliveries failed for good, refused instances, rejected associations
        'v_failures': f"""
SELECT j.finished_at AS at, 'job_failed' AS kind, s.id AS study_id, s.study_instance_uid, j.id AS job_id,
       {int_} AS delivery_id, {text} AS calling_ae, {text} AS peer_host, {text} AS destination,
       {text} AS sop_instance_uid, j.attempts, {text} AS status, j.error AS reason,
       j.bundle_name, j.bundle_version
FROM jobs j JOIN studies s ON s.id = j.study_id
WHERE j.state = 'FAILED'
UNION ALL
SELECT COALESCE(d.last_attempt_at, o.created_at), 'delivery_failed', s.id, s.study_instance_uid, j.id,
       d.id, {text}, {text}, d.destination, o.sop_instance_uid, d.attempts, {sql.hex_status('d.peer_status')},
       d.last_error, j.bundle_name, j.bundle_version
FROM deliveries d
JOIN output_objects o ON o.id = d.output_object_id
JOIN jobs j ON j.id = o.job_id
JOIN studies s ON s.id = j.study_id
WHERE d.state = 'FAILED'
UNION ALL
SELECT e.at, 'instance_refused', {int_}, {text}, {int_}, {int_}, a.calling_ae, a.peer_host, {text},
       {sql.detail('sop_instance_uid')}, {int_}, {sql.detail('status')}, {sql.detail('reason')}, {text}, {text}
FROM events e
LEFT JOIN associations a ON a.id = CAST({sql.detail('association_id')} AS INTEGER)
WHERE e.kind = 'instance_refused'
UNION ALL
SELECT e.at, 'association_rejected', {int_}, {text}, {int_}, {int_}, {sql.detail('calling_ae')},
       {sql.detail('peer_host')}, {text}, {text}, {int_}, {text}, {sql.detail('reason')}, {text}, {text}
FROM events e
WHERE e.kind = 'association_rejected'""",
        'v_models': """
SELECT j.bundle_name, j.bundle_version, j.backend, count(*) AS jobs, count(DISTINCT j.study_id) AS studies,
       min(j.finished_at) AS first_used_at, max(j.finished_at) AS last_used_at
FROM jobs j
WHERE j.bundle_name IS NOT NULL
GROUP BY j.bundle_name, j.bundle_version, j.backend""",
        'v_events': """
SELECT e.id AS event_id, e.at, e.kind, e.study_id, s.study_instance_uid, e.job_id, e.detail
FROM events e LEFT JOIN studies s ON s.id = e.study_id""",
    }


def upgrade() -> None:
    """Create the audit views."""
    definitions = _definitions(_Sql(op.get_bind().dialect.name))
    for name in VIEWS:
        op.execute(f'CREATE VIEW {name} AS {definitions[name]}')


def downgrade() -> None:
    """Drop the audit views."""
    for name in reversed(VIEWS):
        op.execute(f'DROP VIEW IF EXISTS {name}')
