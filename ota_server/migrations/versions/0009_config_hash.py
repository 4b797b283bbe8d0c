"""devices.config_hash: the hash of the device's effective configuration, sent with every ``next`` answer

Revision ID: 0009
Revises: 0008
Create Date: 2027-01-05 10:00:00

``config_hash`` (sha256 hex; NULL: the empty configuration's) is recomputed by the server whenever the device's
variables, its group's variables or its group change (``ota_server/confighash.py``). Rows already there get it
here, with the same rule written out in this file (a migration does not follow later code): the canonical JSON
of the group's variables overridden by the device's own, a secret as ``{"secret": <stored token>}``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def _hash(merged: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(merged, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('config_hash', sa.String(length=64), nullable=True))
    conn = op.get_bind()
    values: dict[tuple[str, str], dict[str, Any]] = {}
    for scope, owner, name, value, secret in conn.execute(sa.text(
            "SELECT scope, owner, name, value, secret FROM config_values WHERE scope IN ('device', 'group')")):
        values.setdefault((scope, owner), {})[name] = {"secret": value} if secret else value
    empty = _hash({})
    updates = []
    for device_id, group in conn.execute(sa.text("SELECT id, group_name FROM devices")):
        merged = dict(values.get(("group", group), {})) if group else {}
        merged.update(values.get(("device", device_id), {}))
        h = _hash(merged)
        if h != empty:
            updates.append({"h": h, "id": device_id})
    if updates:
        conn.execute(sa.text("UPDATE devices SET config_hash = :h WHERE id = :id"), updates)


def downgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_column('config_hash')
