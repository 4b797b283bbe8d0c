"""hosts of an Ansible import that no device matched yet (pre-staged configuration)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-20 10:00:00

``staged_hosts``: one row per host name, with the ``DEVICE_ID`` it names (also matched) and its group; its
variables are ``config_values`` rows of scope ``staged`` (secrets encrypted as every secret is). A device whose id
or identity matches gets them when it is accepted, and the row goes. Plain types: SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('staged_hosts',
    sa.Column('host', sa.String(length=64), nullable=False),
    sa.Column('device_key', sa.String(length=128), nullable=True),
    sa.Column('group_name', sa.String(length=64), nullable=True),
    sa.Column('created', sa.Double(), nullable=False),
    sa.Column('updated', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('host', name=op.f('pk_staged_hosts'))
    )
    with op.batch_alter_table('staged_hosts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_staged_hosts_device_key'), ['device_key'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('staged_hosts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_staged_hosts_device_key'))
    op.drop_table('staged_hosts')
    op.execute("DELETE FROM config_values WHERE scope = 'staged'")
