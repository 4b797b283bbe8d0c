"""instant fleet rollback: what each device ran before a deployment, per-device target artifacts, the kind

Revision ID: 0010
Revises: 0009
Create Date: 2027-01-12 10:00:00

``deployment_devices`` gets ``from_artifact`` (the device's inventory ``artifact_name`` when the deployment was
handed to it; NULL for the rows already there: unknown, such devices are skipped by a rollback) and
``target_artifact`` (the artifact this device is sent instead of the deployment's, set by rollback deployments
only). ``deployments`` gets ``kind`` (``software`` for every existing row, ``rollback``) and ``rollback_of``
(the deployment a rollback undoes). Plain types: SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deployment_devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('from_artifact', sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column('target_artifact', sa.String(length=256), nullable=True))
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='software', nullable=False))
        batch_op.add_column(sa.Column('rollback_of', sa.String(length=36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.drop_column('rollback_of')
        batch_op.drop_column('kind')
    with op.batch_alter_table('deployment_devices', schema=None) as batch_op:
        batch_op.drop_column('target_artifact')
        batch_op.drop_column('from_artifact')
