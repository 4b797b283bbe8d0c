"""dynamic deployments to an inventory filter

Revision ID: 0011
Revises: 0010
Create Date: 2027-01-19 10:00:00

``deployments`` gets ``join_filter`` (JSON ``{attribute: value}``: the inventory filter a deployment targets;
NULL for every existing row and for deployments without a filter). No index of its own: the open dynamic
deployments are found through ``ix_deployments_join_group`` (``join_group`` is NULL once a deployment stops taking
joiners), and a JSON column cannot be indexed on PostgreSQL. Plain types: SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('join_filter', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.drop_column('join_filter')
