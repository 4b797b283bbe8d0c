"""dynamic deployments, the failure limit and the reason of a server-made pause

Revision ID: 0008
Revises: 0007
Create Date: 2027-01-05 10:00:00

``deployments`` gets ``dynamic`` (false for the rows already there: they behave as before), ``join_group``
(indexed: the poll's lookup of the open dynamic deployments of a device's group; NULL for every existing row),
``closed``, ``failure_limit`` (JSON) and ``status_reason``. Gates live in the ``phases`` JSON, which needs no
change. Plain types: SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dynamic', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('join_group', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('closed', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('failure_limit', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('status_reason', sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f('ix_deployments_join_group'), ['join_group'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deployments_join_group'))
        batch_op.drop_column('status_reason')
        batch_op.drop_column('failure_limit')
        batch_op.drop_column('closed')
        batch_op.drop_column('join_group')
        batch_op.drop_column('dynamic')
