"""completion from the association, lease owners for recovery

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 12:00:00

``study_arrivals`` records which association carried each study revision (the completion rule
of ``worker.assemble.completion``); ``studies.receiving_since`` when the current revision began;
``jobs.completed_by`` which rule queued it; ``deliveries.lease_owner`` the process sending it,
so that its successor can take the lease back at once (``worker.assemble.recovery``). The audit view
``v_study_timeline`` gains a last column ``completed_by`` (replaced in place on PostgreSQL,
so an auditor role's grant stays).
"""
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _audit_views():  # type: ignore[no-untyped-def]
    """Migration 0003, whose view definitions this one extends."""
    spec = importlib.util.spec_from_file_location('audit_views_0003', Path(__file__).with_name('0003_audit_views.py'))
    assert spec is not None and spec.loader is not None
    views = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(views)
    return views


def _definitions() -> dict[str, str]:
    views = _audit_views()
    return views._definitions(views._Sql(op.get_bind().dialect.name))


def _timeline_with_completed_by() -> str:
    timeline = _definitions()['v_study_timeline']
    return f'SELECT tl.*, jc.completed_by FROM ({timeline}) tl LEFT JOIN jobs jc ON jc.id = tl.job_id'


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('study_arrivals',
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('association_id', sa.Integer(), nullable=False),
    sa.Column('instances', sa.Integer(), nullable=False),
    sa.Column('last_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['association_id'], ['associations.id'], ),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('study_id', 'revision', 'association_id')
    )
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('receiving_since', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('completed_by', sa.String(length=16), nullable=True))
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_owner', sa.String(length=255), nullable=True))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f'CREATE OR REPLACE VIEW v_study_timeline AS {_timeline_with_completed_by()}')
    else:
        op.execute('DROP VIEW v_study_timeline')
        op.execute(f'CREATE VIEW v_study_timeline AS {_timeline_with_completed_by()}')


def downgrade() -> None:
    """Downgrade schema: the audit views are dropped while SQLite rebuilds the tables, then made as 0003 made them."""
    names = _audit_views().VIEWS
    for name in reversed(names):
        op.execute(f'DROP VIEW IF EXISTS {name}')
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_column('lease_owner')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('completed_by')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('receiving_since')
    op.drop_table('study_arrivals')
    definitions = _definitions()
    for name in names:
        op.execute(f'CREATE VIEW {name} AS {definitions[name]}')
