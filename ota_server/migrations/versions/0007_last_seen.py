"""devices.last_seen: when the device last made an authenticated request

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-28 10:00:00

``last_seen`` (epoch seconds, NULL: never) is written in batches from every authenticated device request
(``ota_server/lastseen.py``); the index on ``(status, last_seen)`` counts and lists the stale devices. Rows already
there start from ``inventory_updated``, the last device request that the schema recorded before. (0006 is on
another branch: the chain is fixed when the branches are merged.)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_seen', sa.Double(), nullable=True))
        batch_op.create_index('ix_devices_status_last_seen', ['status', 'last_seen'], unique=False)
    op.execute("UPDATE devices SET last_seen = inventory_updated")


def downgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_index('ix_devices_status_last_seen')
        batch_op.drop_column('last_seen')
