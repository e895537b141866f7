"""database storage in chunks written with COPY (PLEURA_STORAGE=database)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 21:40:00

``blob_chunks``: the bytes of a blob in pieces of 1 MiB, written with ``COPY ... (FORMAT binary)``
and stored uncompressed out of line (``STORAGE EXTERNAL``). A large object (0006) costs the server
three times the CPU for the same bytes: each 2 KB page of ``pg_largeobject`` is offered to pglz,
which pixel data defeats (bench.ingest, docs/performance.md). Blobs kept before this revision stay
large objects (``blobs.lo_oid``) and are read and removed as such.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0008'
down_revision: str | Sequence[str] | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('blob_chunks',
    sa.Column('blob_id', sa.Integer(), nullable=False),
    sa.Column('n', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['blob_id'], ['blobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('blob_id', 'n')
    )
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL')


def downgrade() -> None:
    """Downgrade schema; the bytes kept in chunks go with the table (their blobs are marked purged)."""
    op.execute('UPDATE blobs SET purged_at = CURRENT_TIMESTAMP WHERE lo_oid IS NULL AND purged_at IS NULL')
    op.drop_table('blob_chunks')
