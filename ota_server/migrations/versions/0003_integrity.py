"""integrity: a unique index behind the artifact conflict check; the attempt a device was last handed

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-02 09:00:00

- ``artifact_targets`` (name, device type, source image) is the primary key that makes two concurrent uploads
  of conflicting artifacts impossible (the check before the insert only gives the nicer message). It is filled
  from the existing artifacts; if they already hold a conflict (possible before this revision, when two uploads
  raced), the upgrade stops before changing anything and names the artifacts to delete.
- ``deployment_devices.delivered_attempt``: the attempt ``next`` last handed to the device, so that a report
  about an attempt that already failed (a resent ``failure``) cannot use up another retry. Devices that already
  reported progress are taken as handed their current attempt.

The revision chain (``down_revision``) is fixed when the branches adding migrations are merged.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from ota_common.errors import UserError

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

ROOTFS_CHECKSUM = "rootfs-image.checksum"
MAX_KEY = 256

_artifacts = sa.table(
    "artifacts", sa.column("id", sa.String), sa.column("name", sa.String), sa.column("device_types", sa.JSON),
    sa.column("info", sa.JSON), sa.column("created", sa.Double))


def _source(info: Any) -> str:
    depends = (info or {}).get("artifact_depends") or {}
    value = depends.get(ROOTFS_CHECKSUM) if isinstance(depends, dict) else None
    return value if isinstance(value, str) else ""


def _targets() -> list[dict[str, str]]:
    """One row per (artifact, device type); raises UserError naming every conflict already in the table."""
    rows: dict[tuple[str, str, str], str] = {}
    conflicts: list[str] = []
    too_long: list[str] = []
    for a in op.get_bind().execute(sa.select(_artifacts).order_by(_artifacts.c.created)):
        source = _source(a.info)
        for device_type in sorted(set(a.device_types or [])):
            key = (a.name, str(device_type), source)
            if max(len(k) for k in key) > MAX_KEY:
                too_long.append(a.id)
            elif key in rows:
                what = f" (a delta from image {source[:16]}…)" if source else ""
                conflicts.append(f"{a.name}{what} for device type {device_type}: artifacts {rows[key]} and {a.id}")
            else:
                rows[key] = a.id
    if conflicts or too_long:
        lines = [f"  {c}" for c in conflicts] + [f"  artifact {i}: name, device type or source longer than "
                                                 f"{MAX_KEY} characters" for i in too_long]
        raise UserError(
            "cannot add the unique index on artifacts (migration 0003): the database already holds artifacts that "
            "conflict (uploaded at the same moment before this version):\n" + "\n".join(lines) + "\n"
            "delete one artifact of each pair (the later one is usually the duplicate) with the server you upgrade "
            "from (DELETE /api/management/v1/deployments/artifacts/ID), or in SQL (DELETE FROM artifacts WHERE "
            "id = '...'), then migrate again; nothing was changed")
    return [{"name": k[0], "device_type": k[1], "source": k[2], "artifact_id": v} for k, v in rows.items()]


def upgrade() -> None:
    targets = _targets()  # first: a refusal leaves the database untouched
    op.create_table(
        'artifact_targets',
        sa.Column('name', sa.String(length=256), nullable=False),
        sa.Column('device_type', sa.String(length=256), nullable=False),
        sa.Column('source', sa.String(length=256), nullable=False),
        sa.Column('artifact_id', sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'],
                                name=op.f('fk_artifact_targets_artifact_id_artifacts'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('name', 'device_type', 'source', name=op.f('pk_artifact_targets')),
    )
    with op.batch_alter_table('artifact_targets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_artifact_targets_artifact_id'), ['artifact_id'], unique=False)
    if targets:
        op.bulk_insert(sa.table('artifact_targets', sa.column('name'), sa.column('device_type'),
                                sa.column('source'), sa.column('artifact_id')), targets)

    with op.batch_alter_table('deployment_devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('delivered_attempt', sa.Integer(), nullable=True))
    dd = sa.table('deployment_devices', sa.column('status'), sa.column('attempts'), sa.column('delivered_attempt'))
    op.execute(dd.update().where(dd.c.status != 'pending').values(delivered_attempt=dd.c.attempts))


def downgrade() -> None:
    with op.batch_alter_table('deployment_devices', schema=None) as batch_op:
        batch_op.drop_column('delivered_attempt')
    with op.batch_alter_table('artifact_targets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_artifact_targets_artifact_id'))
    op.drop_table('artifact_targets')
