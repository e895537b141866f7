"""embedding archive

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 14:00:00

On PostgreSQL, creates the pgvector extension when the server has it (and the role may), and
then a ``pgvec vector`` column beside the float32 bytes; the archive searches with it and adds
one HNSW index per dimension on first use. Elsewhere only the bytes exist (exact search).
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: str | Sequence[str] | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('embeddings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('instance_id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('bundle_name', sa.String(length=128), nullable=False),
    sa.Column('bundle_version', sa.String(length=64), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('vector', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], ),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('instance_id', 'bundle_name', 'bundle_version')
    )
    with op.batch_alter_table('embeddings', schema=None) as batch_op:
        batch_op.create_index('ix_embeddings_bundle', ['bundle_name', 'bundle_version', 'dim'], unique=False)
        batch_op.create_index(batch_op.f('ix_embeddings_study_id'), ['study_id'], unique=False)
    if op.get_bind().dialect.name == 'postgresql' and _create_vector_extension():
        op.execute('ALTER TABLE embeddings ADD COLUMN pgvec vector')


def _create_vector_extension() -> bool:
    """``CREATE EXTENSION vector`` when the server offers it; False when it cannot be had."""
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).first():
        return True
    if not bind.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first():
        return False
    try:
        with bind.begin_nested():  # a refusal (e.g. not allowed to this role) must not abort the migration
            bind.execute(sa.text('CREATE EXTENSION IF NOT EXISTS vector'))
    except sa.exc.DBAPIError:
        return False
    return True


def downgrade() -> None:
    """Downgrade schema (the vector extension stays: other tables may use it)."""
    with op.batch_alter_table('embeddings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_embeddings_study_id'))
        batch_op.drop_index('ix_embeddings_bundle')

    op.drop_table('embeddings')
