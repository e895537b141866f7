"""bytes in the database (PLEURA_STORAGE=database)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 01:10:00

``blobs``: one PostgreSQL large object per instance content (``sha256:<hex>``) and per result
object (``sop:<UID>``), so that listeners and workers on different hosts share no filesystem
(``worker.storage``), keyed by name. ``studies.purged_at``: when retention removed the bytes of
the study's instances and results (``PLEURA_RETENTION_HOURS``; the rows stay).
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('blobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=80), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('lo_oid', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('purged_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('purged_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema; on PostgreSQL the large objects go with their rows."""
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('SELECT lo_unlink(lo_oid) FROM blobs WHERE lo_oid IS NOT NULL')
    op.drop_table('blobs')
    # a plain ALTER TABLE DROP COLUMN (SQLite 3.35+): a batch rebuild of studies would break the audit views
    op.drop_column('studies', 'purged_at')
