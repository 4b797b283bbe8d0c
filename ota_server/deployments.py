"""Rollout logic shared by the device and management APIs: phases, per-device statuses, the failure threshold.

Per-device statuses are Mender's. ``pending`` devices wait for their phase (``not_before``) and for the
deployment not to be paused; a device reporting ``failure`` while it has retries left goes back to
``pending``. Final statuses (``TERMINAL``) never change again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .models import deployment_devices as dd
from .models import deployments as dep
from .timeutil import now

TERMINAL = frozenset({"success", "failure", "already-installed", "noartifact", "aborted", "decommissioned"})
REPORTABLE = frozenset({
    "downloading", "installing", "rebooting", "success", "failure", "already-installed",
    "pause_before_installing", "pause_before_rebooting", "pause_before_committing",
})
STATISTICS_KEYS = (
    "pending", "downloading", "installing", "rebooting", "success", "failure", "already-installed", "aborted",
    "noartifact", "pause_before_installing", "pause_before_rebooting", "pause_before_committing", "decommissioned",
)
#: deployment statuses in which devices still get work
OPEN = ("pending", "inprogress", "paused")


def plan_phases(device_ids: Sequence[str], phases: Sequence[dict[str, Any]], created: float
                ) -> tuple[list[dict[str, Any]], list[tuple[str, int, float]]]:
    """Assign devices to phases in the given order. ``phases`` items: ``batch_size`` (percent, ignored for
    the last, which takes the rest) and ``start_ts`` (epoch) or ``wait_s`` (after the previous phase's start,
    the first phase's after creation). Every phase but the last gets ``floor(n * batch_size / 100)`` devices,
    at least one while devices remain. Returns (phase descriptions, [(device_id, phase, not_before)])."""
    if not phases:
        phases = [{"batch_size": 100}]
    n = len(device_ids)
    out: list[dict[str, Any]] = []
    assignment: list[tuple[str, int, float]] = []
    start = created
    pos = 0
    for i, p in enumerate(phases):
        start = float(p["start_ts"]) if p.get("start_ts") is not None else start + float(p.get("wait_s") or 0)
        last = i == len(phases) - 1
        count = n - pos if last else min(n - pos, max(1 if n - pos > 0 else 0, math.floor(n * p["batch_size"] / 100)))
        batch = 100 - sum(int(q["batch_size"]) for q in phases[:-1]) if last else int(p["batch_size"])
        for device_id in device_ids[pos:pos + count]:
            assignment.append((device_id, i, start))
        pos += count
        out.append({"id": i + 1, "batch_size": batch, "start_ts": start, "device_count": count})
    return out, assignment


def statistics(conn: Connection, deployment_id: str) -> dict[str, int]:
    stats = dict.fromkeys(STATISTICS_KEYS, 0)
    rows = conn.execute(
        sa.select(dd.c.status, sa.func.count()).where(dd.c.deployment_id == deployment_id).group_by(dd.c.status)
    )
    for status, count in rows:
        stats[status] = stats.get(status, 0) + int(count)
    return stats


def after_final(conn: Connection, deployment_id: str) -> None:
    """A device of this deployment reached a final status: pause on too many failures, finish when no device
    is left."""
    row = conn.execute(sa.select(dep.c.status, dep.c.failure_threshold).where(dep.c.id == deployment_id)).first()
    if row is None or row.status not in OPEN:
        return
    still_active = conn.execute(
        sa.select(dd.c.device_id).where(dd.c.deployment_id == deployment_id, dd.c.active.is_(True)).limit(1)
    ).first()
    if still_active is None:
        conn.execute(dep.update().where(dep.c.id == deployment_id, dep.c.status.in_(OPEN))
                     .values(status="finished", finished=now()))
        return
    if row.failure_threshold is not None and row.status != "paused":
        stats = statistics(conn, deployment_id)
        finished = stats["success"] + stats["failure"] + stats["already-installed"] + stats["noartifact"]
        if finished and stats["failure"] * 100.0 / finished > row.failure_threshold:
            conn.execute(dep.update().where(dep.c.id == deployment_id, dep.c.status.in_(("pending", "inprogress")))
                         .values(status="paused"))


def set_device_final(conn: Connection, deployment_id: str, device_id: str, status: str, substate: str | None) -> None:
    t = now()
    conn.execute(
        dd.update().where(dd.c.deployment_id == deployment_id, dd.c.device_id == device_id, dd.c.active.is_(True))
        .values(status=status, substate=substate, active=False, finished=t, started=sa.func.coalesce(dd.c.started, t))
    )
    after_final(conn, deployment_id)


def mark_started(conn: Connection, deployment_id: str) -> None:
    conn.execute(dep.update().where(dep.c.id == deployment_id, dep.c.status == "pending").values(status="inprogress"))


def decommission_device(conn: Connection, device_id: str) -> None:
    """The device is gone: its unfinished deployments count it as ``decommissioned``."""
    ids = [r[0] for r in conn.execute(
        sa.select(dd.c.deployment_id).where(dd.c.device_id == device_id, dd.c.active.is_(True)))]
    for deployment_id in ids:
        set_device_final(conn, deployment_id, device_id, "decommissioned", "device decommissioned")


def abort(conn: Connection, deployment_id: str) -> None:
    t = now()
    conn.execute(dd.update().where(dd.c.deployment_id == deployment_id, dd.c.active.is_(True))
                 .values(status="aborted", active=False, finished=t))
    conn.execute(dep.update().where(dep.c.id == deployment_id).values(status="aborted", finished=t))
