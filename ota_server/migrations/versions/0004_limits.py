"""deployment log quota: message count and charged size per uploaded log

Revision ID: 0004
Revises: 0001
Create Date: 2026-12-14 10:00:00

The chain (0002, 0003 on other branches) is fixed when the branches are merged: this revision only adds two
columns to ``deployment_logs`` and fills them for the rows already there.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deployment_logs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('message_count', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('size', sa.BigInteger(), server_default='0', nullable=False))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("UPDATE deployment_logs SET "
                   "message_count = CASE WHEN json_typeof(messages) = 'array' THEN json_array_length(messages) ELSE 0 END, "
                   "size = octet_length(messages::text)")
    else:
        op.execute("UPDATE deployment_logs SET message_count = coalesce(json_array_length(messages), 0), "
                   "size = length(CAST(messages AS BLOB))")


def downgrade() -> None:
    with op.batch_alter_table('deployment_logs', schema=None) as batch_op:
        batch_op.drop_column('size')
        batch_op.drop_column('message_count')
