"""Rollout logic shared by the device and management APIs: phases, per-device statuses, the failure threshold,
and which artifact a device is offered (the full one, or a delta from the image it runs).

Per-device statuses are Mender's. ``pending`` devices wait for their phase (``not_before``) and for the
deployment not to be paused; a device reporting ``failure`` while it has retries left goes back to
``pending``. Statuses only move forward (:data:`PROGRESS`); final statuses (``TERMINAL``) never change again.

Concurrency (several server processes on PostgreSQL, READ COMMITTED): every transaction that moves a device's
status locks that device's ``deployment_devices`` row first (``SELECT ... FOR UPDATE`` or the ``UPDATE``
itself), and only then, if the deployment itself may move, the ``deployments`` row. That one order (device
rows, then the deployment row; several deployment rows in id order) cannot deadlock, and the deployment row
lock makes "is anyone left?" and the failure ratio be computed by one transaction at a time, each seeing every
earlier one committed: the deployment finishes exactly once. A device joining a dynamic deployment
(:func:`join`: accepted later, moved into the group, or its inventory now matching the filter) locks the
deployment row and then inserts its own new row, which nobody else can hold: joins of
the same device at once add it once, and joins and final reports take turns on the deployment row. On SQLite, write transactions are serial anyway
(``BEGIN IMMEDIATE``) and ``FOR UPDATE`` is left out of the SQL.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import gates
from .db import driver_execute
from .errors import APIError, bad_request, found_or_404
from .metrics import OUTCOMES, count_outcome
from .models import deployment_devices as dd
from .models import deployments as dep
from .models import devices
from .timeutil import now

#: ``join_group`` of a dynamic deployment to all devices (not a valid group name)
ALL_GROUPS = "*"

TERMINAL = frozenset({"success", "failure", "already-installed", "noartifact", "aborted", "decommissioned"})
REPORTABLE = frozenset({
    "downloading", "installing", "rebooting", "success", "failure", "already-installed",
    "pause_before_installing", "pause_before_rebooting", "pause_before_committing",
})
for _final in TERMINAL:
    OUTCOMES.labels(_final)  # every outcome is exported from the start, at 0
STATISTICS_KEYS = (
    "pending", "downloading", "installing", "rebooting", "success", "failure", "already-installed", "aborted",
    "noartifact", "pause_before_installing", "pause_before_rebooting", "pause_before_committing", "decommissioned",
)
#: deployment statuses in which devices still get work
OPEN = ("pending", "inprogress", "paused")
#: Mender's order of a device's progress (the client's states: download, install, reboot, commit, each
#: optionally paused before by an update control map); every final status comes after all of them
PROGRESS = {
    "pending": 0, "downloading": 1, "pause_before_installing": 2, "installing": 3, "pause_before_rebooting": 4,
    "rebooting": 5, "pause_before_committing": 6,
}
FINAL_RANK = len(PROGRESS)


#: the provide that names the image a device runs, and that a delta artifact depends on
ROOTFS_CHECKSUM = "rootfs-image.checksum"


def rank(status: str) -> int:
    """Position of a status in :data:`PROGRESS`; final statuses rank last."""
    return PROGRESS.get(status, FINAL_RANK)


def plan_phases(device_ids: Sequence[str], phases: Sequence[dict[str, Any]], created: float
                ) -> tuple[list[dict[str, Any]], list[tuple[str, int, float]]]:
    """Assign devices to phases in the given order. ``phases`` items: ``batch_size`` (percent, ignored for
    the last, which takes the rest) and ``start_ts`` (epoch) or ``wait_s`` (after the previous phase's start,
    the first phase's after creation), and optionally a ``gate`` (:mod:`.gates`: such a phase and the ones after
    it get their start when the gate opens). Every phase but the last gets ``floor(n * batch_size / 100)``
    devices, at least one while devices remain. Returns (phase descriptions, [(device_id, phase, not_before)])."""
    if not phases:
        phases = [{"batch_size": 100}]
    if any(p.get("gate") for p in phases):
        return _plan_gated(device_ids, phases, created)
    out: list[dict[str, Any]] = []
    assignment: list[tuple[str, int, float]] = []
    start = created
    pos = 0
    for i, (p, (batch, count)) in enumerate(zip(phases, _counts(len(device_ids), phases), strict=True)):
        start = float(p["start_ts"]) if p.get("start_ts") is not None else start + float(p.get("wait_s") or 0)
        for device_id in device_ids[pos:pos + count]:
            assignment.append((device_id, i, start))
        pos += count
        out.append({"id": i + 1, "batch_size": batch, "start_ts": start, "device_count": count})
    return out, assignment


def _counts(n: int, phases: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """(batch_size, device count) of each phase, as :func:`plan_phases` splits ``n`` devices."""
    out = []
    pos = 0
    for i, p in enumerate(phases):
        last = i == len(phases) - 1
        count = n - pos if last else min(n - pos, max(1 if n - pos > 0 else 0, math.floor(n * p["batch_size"] / 100)))
        batch = 100 - sum(int(q["batch_size"]) for q in phases[:-1]) if last else int(p["batch_size"])
        out.append((batch, count))
        pos += count
    return out


def _plan_gated(device_ids: Sequence[str], phases: Sequence[dict[str, Any]], created: float
                ) -> tuple[list[dict[str, Any]], list[tuple[str, int, float]]]:
    """:func:`plan_phases` when a phase has a ``gate``: the same split, start times from
    :func:`.gates.phase_starts` (None from the first gated phase on), and each phase keeps its timer
    (``wait_s``, ``start_at``) and gate, from which the starts are computed again when a gate opens."""
    spec = [{"wait_s": p.get("wait_s"), "start_at": p.get("start_ts"), "gate": p.get("gate")} for p in phases]
    starts = gates.phase_starts(spec, created, {})
    out: list[dict[str, Any]] = []
    assignment: list[tuple[str, int, float]] = []
    pos = 0
    for i, ((batch, count), start) in enumerate(zip(_counts(len(device_ids), phases), starts, strict=True)):
        for device_id in device_ids[pos:pos + count]:
            assignment.append((device_id, i, gates.GATED if start is None else start))
        pos += count
        doc: dict[str, Any] = {"id": i + 1, "batch_size": batch, "start_ts": start, "device_count": count, **spec[i]}
        if doc["gate"] is None:
            del doc["gate"]
        out.append(doc)
    return out, assignment


def is_waiting(device_status: str, not_before: float, deployment_status: str, t: float) -> bool:
    """Whether a device's row of a deployment has nothing for ``next`` at time ``t``: the device is ``pending``
    and its phase has not started yet (``not_before``) or the deployment is not running (paused)."""
    return device_status == "pending" and (not_before > t or deployment_status not in ("pending", "inprogress"))


def source_checksum(info: dict[str, Any]) -> str | None:
    """The ``rootfs-image.checksum`` an artifact depends on (a delta: installable only on that image)."""
    value = (info.get("artifact_depends") or {}).get(ROOTFS_CHECKSUM)
    return value if isinstance(value, str) else None


def _update_modules(value: Any) -> set[str]:
    if isinstance(value, str):
        return {v for v in value.replace(",", " ").split() if v}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, str)}
    return set()


def choose_artifact(conn: Connection, device_id: str, provides: dict[str, Any], fitting: Sequence[Any]) -> Any:
    """Of the artifacts with the deployment's name that fit the device type (rows with ``info``): a delta whose
    source is the image the device runs (its ``rootfs-image.checksum`` provide equals the delta's depends) when
    the device says it installs that payload type (inventory ``update_modules``, as the Mender client reports
    update modules), else the full artifact, else None. An artifact that depends on another image is never
    offered otherwise. The device's inventory is read only when there is such a delta."""
    full = next((a for a in fitting if source_checksum(a.info) is None), None)
    running = provides.get(ROOTFS_CHECKSUM)
    deltas = [a for a in fitting if running and source_checksum(a.info) == running]
    if deltas:
        inventory = conn.execute(sa.select(devices.c.inventory).where(devices.c.id == device_id)).scalar() or {}
        modules = _update_modules(inventory.get("update_modules")) | {"rootfs-image"}
        for a in deltas:
            types = {u.get("type_info", {}).get("type") for u in a.info.get("updates", [])}
            if types and types <= modules:
                return a
    return full


def statistics(conn: Connection, deployment_id: str) -> dict[str, int]:
    stats = dict.fromkeys(STATISTICS_KEYS, 0)
    rows = conn.execute(
        sa.select(dd.c.status, sa.func.count()).where(dd.c.deployment_id == deployment_id).group_by(dd.c.status)
    )
    for status, count in rows:
        stats[status] = stats.get(status, 0) + int(count)
    return stats


def after_final(conn: Connection, deployment_id: str, status: str) -> None:
    """A device of this deployment reached the final ``status``: open the gates it reached (:mod:`.gates`), pause
    on too many failures, finish when no device is left (a dynamic deployment: once it is also closed). The
    deployment row is locked first (see the module's docstring): the transactions of devices finishing at the
    same moment pass here one after the other, the last one sees nobody left. The failure ratio is counted only
    after a ``failure``: no other final status raises it (a success lowers it), so a deployment resumed above its
    threshold goes on until its next failure, and a rollout's successes cost no count of the deployment's rows."""
    row = conn.execute(sa.select(dep.c.status, dep.c.failure_threshold, dep.c.join_group, dep.c.phases,
                                 dep.c.created).where(dep.c.id == deployment_id).with_for_update()).first()
    if row is None or row.status not in OPEN:
        return
    if any(p.get("gate") and p.get("gate_passed_ts") is None for p in row.phases or []):
        gates.open_gates(conn, deployment_id, [dict(p) for p in row.phases], row.created)
    still_active = conn.execute(
        sa.select(dd.c.device_id).where(dd.c.deployment_id == deployment_id, dd.c.active.is_(True)).limit(1)
    ).first()
    if still_active is None and row.join_group is None:  # a dynamic deployment waits for joiners until closed
        conn.execute(dep.update().where(dep.c.id == deployment_id, dep.c.status.in_(OPEN))
                     .values(status="finished", finished=now()))
        return
    if status == "failure" and row.failure_threshold is not None and row.status != "paused":
        stats = statistics(conn, deployment_id)
        finished = stats["success"] + stats["failure"] + stats["already-installed"] + stats["noartifact"]
        if finished and stats["failure"] * 100.0 / finished > row.failure_threshold:
            conn.execute(dep.update().where(dep.c.id == deployment_id, dep.c.status.in_(("pending", "inprogress")))
                         .values(status="paused"))


def set_device_final(conn: Connection, deployment_id: str, device_id: str, status: str, substate: str | None,
                     only_from: Sequence[str] | None = None) -> bool:
    """Give the device its final status (when it is still active, and in one of ``only_from`` if given) and
    let the deployment move. Returns whether the device's row changed."""
    t = now()
    q = dd.update().where(dd.c.deployment_id == deployment_id, dd.c.device_id == device_id, dd.c.active.is_(True))
    if only_from is not None:
        q = q.where(dd.c.status.in_(list(only_from)))
    changed = conn.execute(q.values(status=status, substate=substate, active=False, finished=t,
                                    started=sa.func.coalesce(dd.c.started, t))).rowcount > 0
    if changed:
        count_outcome(conn, status)
        after_final(conn, deployment_id, status)
    return changed


def mark_started(conn: Connection, deployment_id: str) -> None:
    conn.execute(dep.update().where(dep.c.id == deployment_id, dep.c.status == "pending").values(status="inprogress"))


def hand_out(conn: Connection, deployment_id: str, device_id: str, running: str | None = None) -> None:
    """``next`` gives the deployment to the device: remember which attempt it was handed (reports about older
    attempts are ignored from now on) and what the device ran then (``running``, its ``artifact_name``: kept from
    the first hand-out, since a failed attempt leaves the device on it; a rollback sends it back there), and
    start the deployment."""
    conn.execute(dd.update().where(
        dd.c.deployment_id == deployment_id, dd.c.device_id == device_id, dd.c.active.is_(True),
        dd.c.status == "pending",
        sa.or_(dd.c.delivered_attempt.is_(None), dd.c.delivered_attempt != dd.c.attempts),
    ).values(delivered_attempt=dd.c.attempts, from_artifact=sa.func.coalesce(dd.c.from_artifact, running)))
    mark_started(conn, deployment_id)


@dataclass(frozen=True)
class Report:
    """What a device's status report did: ``stored`` (the status moved forward), ``retry`` (a failure with a
    retry left: back to pending), ``final`` (a final status), ``ignored`` (a repeat, an older status, or a report
    about an attempt that already failed)."""

    outcome: str
    status: str
    #: the failure limit says abort: the caller aborts the deployment in a new transaction
    #: (:func:`.gates.check_failure_limit`)
    abort: bool = False


#: a report's device row and its deployment's status, read first (locked on PostgreSQL: ``FOR UPDATE OF dd``)
REPORT_ROW_SQL = (
    "SELECT dd.status, dd.active, dd.attempts, dd.delivered_attempt, d.status, d.retries FROM deployment_devices dd "
    "JOIN deployments d ON d.id = dd.deployment_id WHERE dd.deployment_id = ? AND dd.device_id = ?"
)
#: a progress report that moves the device forward
PROGRESS_SQL = ("UPDATE deployment_devices SET status = ?, substate = ?, started = COALESCE(started, ?) "
                "WHERE deployment_id = ? AND device_id = ?")
#: a repeated progress report with a substate
SUBSTATE_SQL = "UPDATE deployment_devices SET substate = ? WHERE deployment_id = ? AND device_id = ?"


class ReportRow(NamedTuple):
    """What a status report is decided on: the device's row (locked) and its deployment's status."""

    status: str
    active: bool
    attempts: int
    delivered_attempt: int | None
    dep_status: str
    retries: int


class Step(enum.Enum):
    """What a status report does (:func:`classify_report`)."""

    IGNORE = "ignore"  #: nothing
    SUBSTATE = "substate"  #: a repeat that brings a new substate
    FORWARD = "forward"  #: the device moves forward in :data:`PROGRESS`
    WRITE = "write"  #: needs the database: a failure with a retry left, a final status (the deployment may move)


def classify_report(row: ReportRow, status: str, substate: str | None) -> Step:
    """What the report ``status`` (with ``substate``) does to the device's ``row`` (the rules of
    :func:`report_status`). Pure: the database is neither read nor written.

    Raises:
        APIError: 409 once the deployment was aborted, 400 for a different final status after a final one.
    """
    if row.status == "aborted" or row.dep_status == "aborted":
        raise APIError(409, "the deployment was aborted")
    if not row.active:
        if status != row.status and status in TERMINAL:
            raise bad_request(f"the deployment already finished on this device with status {row.status}")
        return Step.IGNORE
    if row.attempts > 0 and row.delivered_attempt != row.attempts:
        return Step.IGNORE  # about the attempt that failed: the device has not asked `next` since
    if status in TERMINAL:
        return Step.WRITE  # (a failure with a retry left, or a final status)
    if rank(status) < rank(row.status):
        return Step.IGNORE
    if status == row.status:
        return Step.IGNORE if substate is None else Step.SUBSTATE
    return Step.FORWARD


def write_report(conn: Connection, row: ReportRow, deployment_id: str, device_id: str, status: str,
                 substate: str | None) -> Report:
    """Apply a report that :func:`classify_report` classed :attr:`Step.WRITE` (the device's row locked): a
    ``failure`` with a retry left sends the device back to ``pending``; a final status ends the device's
    attempt and lets the deployment move (:func:`set_device_final`)."""
    if status == "failure" and row.attempts < row.retries:
        conn.execute(dd.update().where(dd.c.deployment_id == deployment_id, dd.c.device_id == device_id).values(
            status="pending", attempts=row.attempts + 1, not_before=now(),
            substate=f"attempt {row.attempts + 1} failed ({substate or 'no details'}); retrying"))
        return Report("retry", "pending", gates.check_failure_limit(conn, deployment_id))
    set_device_final(conn, deployment_id, device_id, status, substate)
    return Report("final", status, status == "failure" and gates.check_failure_limit(conn, deployment_id))


def report_status(conn: Connection, deployment_id: str, device_id: str, status: str, substate: str | None) -> Report:
    """A status report of the device (a status in :data:`REPORTABLE`), applied under a lock on the device's row.

    Statuses only move forward in :data:`PROGRESS` order: a report that goes backwards, repeats the current
    status or repeats the final status is acknowledged and ignored (a repeat may update the substate). After a
    ``failure`` that used a retry, reports are ignored until ``next`` hands the device its new attempt, so a
    resent ``failure`` cannot use up a second retry. (A group commit applies many at once with the same rules:
    :mod:`.reportbatch`.)

    Raises APIError: 404 when this is not the device's deployment, 409 once it was aborted, 400 for a
    different final status after a final one."""
    found = driver_execute(conn, REPORT_ROW_SQL + (" FOR UPDATE OF dd" if conn.dialect.name == "postgresql" else ""),
                           (deployment_id, device_id))[0]
    row = ReportRow(*found_or_404(found[0] if found else None, "deployment for this device"))
    step = classify_report(row, status, substate)
    if step == Step.WRITE:
        return write_report(conn, row, deployment_id, device_id, status, substate)
    if step == Step.IGNORE:
        return Report("ignored", row.status)
    # progress (most reports): plain statements through the driver (see db.driver_execute)
    if step == Step.SUBSTATE:
        driver_execute(conn, SUBSTATE_SQL, (substate, deployment_id, device_id))
        return Report("ignored", row.status)
    driver_execute(conn, PROGRESS_SQL, (status, substate, now(), deployment_id, device_id))
    if row.dep_status == "pending":  # read above; a deployment never goes back to pending
        mark_started(conn, deployment_id)
    return Report("stored", status)


def decommission_device(conn: Connection, device_id: str) -> None:
    """The device is gone: its unfinished deployments count it as ``decommissioned`` (in deployment id order,
    the lock order of the module's docstring)."""
    ids = [r[0] for r in conn.execute(
        sa.select(dd.c.deployment_id).where(dd.c.device_id == device_id, dd.c.active.is_(True))
        .order_by(dd.c.deployment_id))]
    for deployment_id in ids:
        set_device_final(conn, deployment_id, device_id, "decommissioned", "device decommissioned")


def abort(conn: Connection, deployment_id: str) -> bool:
    """Abort an open deployment: its devices not yet final become ``aborted``. The devices' rows are locked in
    device id order first (two aborts at once cannot deadlock), then the deployment moves only if it is still
    open. Returns False when it had already ended (an ended deployment has no active device: nothing
    changed)."""
    t = now()
    conn.execute(sa.select(dd.c.device_id).where(dd.c.deployment_id == deployment_id, dd.c.active.is_(True))
                 .order_by(dd.c.device_id).with_for_update())
    aborted = conn.execute(dd.update().where(dd.c.deployment_id == deployment_id, dd.c.active.is_(True))
                           .values(status="aborted", active=False, finished=t)).rowcount
    if aborted:
        count_outcome(conn, "aborted", aborted)
    return conn.execute(dep.update().where(dep.c.id == deployment_id, dep.c.status.in_(OPEN))
                        .values(status="aborted", finished=t, join_group=None)).rowcount > 0


def resume(conn: Connection, deployment_id: str, values: dict[str, Any]) -> bool:
    """Resume a paused deployment (an atomic conditional update). Returns False when it was not paused."""
    return conn.execute(dep.update().where(dep.c.id == deployment_id, dep.c.status == "paused")
                        .values(status="inprogress", status_reason=None, **values)).rowcount > 0


# ---------------------------------------------------------------------------------------------------------
# Dynamic deployments: devices that join the target later


#: the open dynamic deployments that would take the device and do not have it yet, in id order (the lock
#: order), with their inventory filter (NULL: none) and the device's inventory to check it against
#: (:func:`joinable`); ``?``: :data:`ALL_GROUPS`, the device id. One probe of ``ix_deployments_join_group`` per
#: group value, one primary-key probe of ``deployment_devices`` per open dynamic deployment found (usually none).
JOINABLE_SQL = (
    "SELECT dp.id, dp.join_filter, d.inventory FROM devices d JOIN deployments dp ON dp.join_group IN "
    "(d.group_name, ?) WHERE d.id = ? AND d.status = 'accepted' AND NOT EXISTS (SELECT 1 FROM deployment_devices x "
    "WHERE x.deployment_id = dp.id AND x.device_id = d.id) ORDER BY dp.id"
)
#: :data:`JOINABLE_SQL` limited to the deployments to an inventory filter (what an inventory write may change)
JOINABLE_FILTER_SQL = JOINABLE_SQL.replace(" ORDER BY", " AND dp.join_filter IS NOT NULL ORDER BY")


def _json(value: Any) -> Any:
    """A JSON column read through a driver directly: text on SQLite, already decoded by psycopg."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def matches_filter(inventory: Any, wanted: Any) -> bool:
    """Whether an inventory has every attribute of a deployment's filter equal to its value (string equality:
    a number or a list in the inventory never matches). No filter (None) matches every device."""
    if not wanted:
        return True
    if not isinstance(inventory, dict):
        return False
    return all(isinstance(inventory.get(name), str) and inventory[name] == value for name, value in wanted.items())


def joinable(rows: Sequence[Sequence[Any]]) -> list[str]:
    """The deployment ids of :data:`JOINABLE_SQL` rows whose filter the device's inventory matches: checked
    before any lock is taken, so a device that matches none of them costs one read, not a write."""
    return [r[0] for r in rows if matches_filter(_json(r[2]), _json(r[1]))]


def join(conn: Connection, deployment_id: str, device_id: str) -> bool:
    """Add a device that joined the target (accepted later, moved into the group, or whose inventory now matches
    the filter) to an open dynamic deployment, in its current phase (:func:`.gates.current_phase`). Everything is
    checked again under the deployment's row lock: it still takes joiners, the device is accepted and in its
    target, and not in it yet (two polls of one device at once add it once). Returns whether it was added."""
    row = conn.execute(sa.select(dep.c.status, dep.c.join_group, dep.c.join_filter, dep.c.phases)
                       .where(dep.c.id == deployment_id).with_for_update()).first()
    if row is None or row.join_group is None or row.status not in OPEN:
        return False
    device = conn.execute(sa.select(devices.c.status, devices.c.group_name, devices.c.inventory)
                          .where(devices.c.id == device_id)).first()
    if device is None or device.status != "accepted" or row.join_group not in (ALL_GROUPS, device.group_name):
        return False
    if not matches_filter(device.inventory, row.join_filter):
        return False
    if conn.execute(sa.select(dd.c.status).where(dd.c.deployment_id == deployment_id,
                                                 dd.c.device_id == device_id)).first() is not None:
        return False
    t = now()
    phases = [dict(p) for p in row.phases]
    phase = gates.current_phase(phases, t)
    start = phases[phase]["start_ts"]
    conn.execute(dd.insert().values(deployment_id=deployment_id, device_id=device_id, status="pending", active=True,
                                    phase=phase, not_before=gates.GATED if start is None else float(start),
                                    attempts=0, created=t, has_log=False))
    phases[phase]["device_count"] = int(phases[phase]["device_count"]) + 1
    conn.execute(dep.update().where(dep.c.id == deployment_id)
                 .values(device_count=dep.c.device_count + 1, phases=phases))
    return True


def join_open(conn: Connection, device_id: str, filtered_only: bool = False) -> list[str]:
    """Add the device to every open dynamic deployment of its target that does not have it yet (deployment rows
    locked in id order); ``filtered_only``: only those to an inventory filter (after an inventory write).
    Returns the ids of the deployments it joined."""
    sql = JOINABLE_FILTER_SQL if filtered_only else JOINABLE_SQL
    rows = conn.execute(sa.text(sql.replace("?", ":all", 1).replace("?", ":device")),
                        {"all": ALL_GROUPS, "device": device_id}).all()
    return [i for i in joinable(rows) if join(conn, i, device_id)]


def close(conn: Connection, deployment_id: str) -> bool:
    """Close an open dynamic deployment: it takes no more joiners; it finishes once no device is left (at once
    when none is). Returns False when it is not an open dynamic deployment."""
    row = conn.execute(sa.select(dep.c.status, dep.c.join_group).where(dep.c.id == deployment_id)
                       .with_for_update()).first()
    if row is None or row.join_group is None or row.status not in OPEN:
        return False
    t = now()
    conn.execute(dep.update().where(dep.c.id == deployment_id).values(join_group=None, closed=t))
    if conn.execute(sa.select(dd.c.device_id).where(dd.c.deployment_id == deployment_id, dd.c.active.is_(True))
                    .limit(1)).first() is None:
        conn.execute(dep.update().where(dep.c.id == deployment_id).values(status="finished", finished=t))
    return True
