"""named API tokens, the audit log, device tokens bound to their auth set

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-14 09:00:00

- ``api_tokens``: named management tokens (scope read/operate/admin), only their SHA-256 stored;
- ``audit_log``: every management change (who, method, path, summary, when);
- ``devices.auth_set_id`` / ``devices.token_epoch``: a device token names the auth set and the epoch it was
  issued for, and is refused once either changed. Existing accepted devices get their accepted auth set here;
  tokens issued before this revision carry no epoch and are refused (devices authenticate again on the 401).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('scope', sa.String(length=16), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('created', sa.Double(), nullable=False),
    sa.Column('created_by', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('name', name=op.f('uq_api_tokens_name'))
    )
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('ts', sa.Double(), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('method', sa.String(length=16), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('summary', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_ts'), ['ts'], unique=False)

    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('auth_set_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('token_epoch', sa.Integer(), server_default='0', nullable=False))
    op.execute("UPDATE devices SET auth_set_id = (SELECT a.id FROM auth_sets a WHERE a.device_id = devices.id "
               "AND a.status = 'accepted' ORDER BY a.created LIMIT 1) WHERE status = 'accepted'")


def downgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_column('token_epoch')
        batch_op.drop_column('auth_set_id')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_ts'))
    op.drop_table('audit_log')
    op.drop_table('api_tokens')
