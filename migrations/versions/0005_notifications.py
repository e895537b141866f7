"""RIS notifications (HL7 v2 ORU over MLLP, FHIR R4)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 01:00:00

``notifications``: one row per (analysed result, RIS destination) with its state, attempts,
control ID, the peer's answer and times (``worker.notify``). The audit view ``v_notifications``
shows them; ``v_failures`` gains the notifications that ended FAILED (kind
``notification_failed``; replaced in place on PostgreSQL, so an auditor role's grant stays).
The views hold no patient data: the messages do, the ledger does not.
"""
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _audit_views():  # type: ignore[no-untyped-def]
    """Migration 0003, whose view definitions this one extends."""
    spec = importlib.util.spec_from_file_location('audit_views_0003', Path(__file__).with_name('0003_audit_views.py'))
    assert spec is not None and spec.loader is not None
    views = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(views)
    return views


def _sql():  # type: ignore[no-untyped-def]
    views = _audit_views()
    return views, views._Sql(op.get_bind().dialect.name)


def _notifications() -> str:
    _views, sql = _sql()
    return f"""
SELECT n.id AS notification_id, s.id AS study_id, s.study_instance_uid, j.id AS job_id, j.revision,
       n.protocol, n.destination, n.state, CASE WHEN n.triage THEN 1 ELSE 0 END AS triage, n.control_id,
       n.attempts, n.peer_answer, n.last_error, j.bundle_name, j.bundle_version, n.created_at, n.released_at,
       n.last_attempt_at, n.delivered_at,
       {sql.seconds('n.released_at', 'n.delivered_at')} AS notify_s,
       {sql.seconds('j.finished_at', 'n.delivered_at')} AS result_to_notified_s
FROM notifications n
JOIN jobs j ON j.id = n.job_id
JOIN studies s ON s.id = j.study_id"""


def _failures() -> str:
    views, sql = _sql()
    base = views._definitions(sql)['v_failures']
    text, int_ = 'CAST(NULL AS VARCHAR(300))', 'CAST(NULL AS INTEGER)'
    return base + f"""
UNION ALL
SELECT COALESCE(n.last_attempt_at, n.created_at), 'notification_failed', s.id, s.study_instance_uid, j.id,
       {int_}, {text}, {text}, CAST(n.protocol || ' ' || n.destination AS VARCHAR(300)), {text}, n.attempts,
       n.peer_answer,
       n.last_error, j.bundle_name, j.bundle_version
FROM notifications n
JOIN jobs j ON j.id = n.job_id
JOIN studies s ON s.id = j.study_id
WHERE n.state = 'FAILED'"""


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('notifications',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('sr_output_id', sa.Integer(), nullable=False),
    sa.Column('protocol', sa.String(length=8), nullable=False),
    sa.Column('destination', sa.String(length=300), nullable=False),
    sa.Column('control_id', sa.String(length=20), nullable=False),
    sa.Column('triage', sa.Boolean(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('released_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lease_owner', sa.String(length=255), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('peer_answer', sa.String(length=16), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.ForeignKeyConstraint(['sr_output_id'], ['output_objects.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'destination')
    )
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_notifications_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_notifications_state'), ['state'], unique=False)
    op.execute(f'CREATE VIEW v_notifications AS {_notifications()}')
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f'CREATE OR REPLACE VIEW v_failures AS {_failures()}')
    else:
        op.execute('DROP VIEW v_failures')
        op.execute(f'CREATE VIEW v_failures AS {_failures()}')


def downgrade() -> None:
    """Downgrade schema."""
    views, sql = _sql()
    op.execute('DROP VIEW v_notifications')
    op.execute('DROP VIEW v_failures')
    op.execute(f"CREATE VIEW v_failures AS {views._definitions(sql)['v_failures']}")
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_notifications_state'))
        batch_op.drop_index(batch_op.f('ix_notifications_job_id'))
    op.drop_table('notifications')
