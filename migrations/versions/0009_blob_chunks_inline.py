"""blob chunks of one heap page each, stored in the row (PLEURA_STORAGE=database)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08 01:30:00

From this revision ``blob_chunks.data`` holds 8000 bytes a row, stored uncompressed in the row
(``STORAGE PLAIN``): a 1 MiB row was cut by TOAST into about 500 rows of a second table, each with
an entry in its index, so the server wrote three tables for one; rows of one page each are
written by COPY in batches (bench.ingest, docs/performance.md). Rows of 1 MiB written before stay
out of line and are read as before.
"""
from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0009'
down_revision: str | Sequence[str] | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE PLAIN')


def downgrade() -> None:
    """Downgrade schema: rows written since stay as they are (a page each), readable by 0008's code."""
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL')
