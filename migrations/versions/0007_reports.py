"""final reports from the RIS, for concordance monitoring

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 06:00:00

``reports``: radiology reports received over HL7 v2 (ORU^R01 over MLLP) or FHIR R4
(DiagnosticReport), matched to their study by Accession Number or Study Instance UID, with the
labels their text gave per finding (``worker.reports``). ``studies.accession_sha256``: the hash
of the study's Accession Number (``worker.reports.accession_key``), by which reports are matched;
the number itself is not kept.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: str | Sequence[str] | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('accession_sha256', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_studies_accession_sha256'), ['accession_sha256'], unique=False)
    op.create_table('reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=8), nullable=False),
    sa.Column('sender', sa.String(length=300), nullable=False),
    sa.Column('message_id', sa.String(length=200), nullable=False),
    sa.Column('accession_sha256', sa.String(length=64), nullable=True),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('study_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('labels', sa.Text(), nullable=False),
    sa.Column('labeler', sa.String(length=64), nullable=False),
    sa.Column('reported_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('matched_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('superseded_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('source', 'message_id')
    )
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reports_accession_sha256'), ['accession_sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_reports_received_at'), ['received_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_reports_study_id'), ['study_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_reports_study_instance_uid'), ['study_instance_uid'], unique=False)
    # audit view: one row per matched report, with its labels and never its text (docs/audit/README.md)
    op.execute('''CREATE VIEW v_reports AS
SELECT r.id AS report_id, r.study_id, s.study_instance_uid, r.source, r.status, r.labeler, r.labels,
       r.reported_at, r.received_at, r.matched_at, r.superseded_at
FROM reports r
JOIN studies s ON s.id = r.study_id''')


def downgrade() -> None:
    """Downgrade schema."""
    op.execute('DROP VIEW v_reports')
    op.drop_table('reports')
    # plain DROP INDEX and ALTER TABLE DROP COLUMN (SQLite 3.35+): a batch rebuild of studies would break the views
    op.drop_index('ix_studies_accession_sha256', table_name='studies')
    op.drop_column('studies', 'accession_sha256')
