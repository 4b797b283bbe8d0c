"""zero-touch enrolment: revoked device certificates, and the certificate an auth set came with

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-28 10:00:00

``revoked_certificates``: one row per revoked device certificate of the fleet CA (serial as lower-case hex; the
SHA-256 of its public key, as ``auth_sets.pubkey_hash``, and its ``DEVICE_ID`` when known; why, who, when).
``auth_sets`` gains ``cert_serial`` (the certificate that accepted it, or the last one refused) and
``cert_refused`` (why that one was refused), so that the pending list shows the operator why a device waits.
Plain types and added columns only: SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('revoked_certificates',
    sa.Column('serial', sa.String(length=40), nullable=False),
    sa.Column('pubkey_hash', sa.String(length=64), nullable=True),
    sa.Column('device_id', sa.String(length=64), nullable=True),
    sa.Column('reason', sa.String(length=256), nullable=False),
    sa.Column('revoked_by', sa.String(length=128), nullable=False),
    sa.Column('revoked', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('serial', name=op.f('pk_revoked_certificates'))
    )
    with op.batch_alter_table('revoked_certificates', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_revoked_certificates_pubkey_hash'), ['pubkey_hash'], unique=False)
    with op.batch_alter_table('auth_sets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cert_serial', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('cert_refused', sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f('ix_auth_sets_cert_serial'), ['cert_serial'], unique=False)
        batch_op.create_index(batch_op.f('ix_auth_sets_pubkey_hash'), ['pubkey_hash'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('auth_sets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_auth_sets_pubkey_hash'))
        batch_op.drop_index(batch_op.f('ix_auth_sets_cert_serial'))
        batch_op.drop_column('cert_refused')
        batch_op.drop_column('cert_serial')
    with op.batch_alter_table('revoked_certificates', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_revoked_certificates_pubkey_hash'))
    op.drop_table('revoked_certificates')
