"""the SBOM and provenance of each artifact (issue 17)

Revision ID: 0012
Revises: 0011
Create Date: 2027-01-26 10:00:00

Two tables keyed by the artifact (deleted with it): ``artifact_sboms`` (the CycloneDX document as uploaded, its
sha256 and size, and its packages ``[[name, version, purl], ...]`` read once at upload) and
``artifact_provenance`` (the DSSE envelope as uploaded, the release key that verified it, the subject that is
the artifact). In the database rather than the artifact store: they are small (kilobytes to a few MB), every
server process reads them for the package lists and diffs, and PostgreSQL serves them to all of them. No
rows for existing artifacts: their SBOMs are uploaded afterwards. Plain types: SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('artifact_sboms',
    sa.Column('artifact_id', sa.String(length=36), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('document', sa.Text(), nullable=False),
    sa.Column('packages', sa.JSON(), nullable=False),
    sa.Column('created', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'], name=op.f('fk_artifact_sboms_artifact_id_artifacts'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('artifact_id', name=op.f('pk_artifact_sboms'))
    )
    op.create_table('artifact_provenance',
    sa.Column('artifact_id', sa.String(length=36), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('envelope', sa.Text(), nullable=False),
    sa.Column('signed_by', sa.String(length=255), nullable=True),
    sa.Column('subject', sa.String(length=512), nullable=False),
    sa.Column('created', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'],
                            name=op.f('fk_artifact_provenance_artifact_id_artifacts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('artifact_id', name=op.f('pk_artifact_provenance'))
    )


def downgrade() -> None:
    op.drop_table('artifact_provenance')
    op.drop_table('artifact_sboms')
