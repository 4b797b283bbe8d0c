"""Read-only SQL for the dashboard. Every count is aggregated in the database (``GROUP BY``), every list is
limited, so a page costs a few indexed or single-pass queries whatever the fleet size. Works on SQLite and
PostgreSQL (the running version is read from the JSON inventory with SQLAlchemy's portable JSON accessor)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import deployments as rollout
from . import metrics
from .confighash import sync_state
from .device_logs import newest_messages
from .lastseen import is_stale, stale_clause
from .models import artifacts as art_t
from .models import auth_sets, devices
from .models import deployment_devices as dd
from .models import deployments as dep

PER_PAGE = 100
RECENT_DEPLOYMENTS = 8
TOP_VERSIONS = 30
HISTORY_LIMIT = 50
FAILURES_PER_PAGE = 100
LOG_LIMIT = 5000
DEVICE_STATUSES = ("accepted", "pending", "preauthorized", "rejected")
#: what the stock Mender client appends to the artifact name after a failed install that could not roll back
INCONSISTENT = "_INCONSISTENT"

#: the running version, as the device reports it in its inventory
running_artifact = metrics.running_artifact

#: per-device deployment statuses grouped into the segments of a progress bar, in drawing order
SEGMENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("success", "success", ("success",)),
    ("installed", "already installed", ("already-installed",)),
    ("failure", "failure", ("failure",)),
    ("skipped", "no artifact / aborted / decommissioned", ("noartifact", "aborted", "decommissioned")),
    ("active", "in progress", ("downloading", "installing", "rebooting", "pause_before_installing",
                               "pause_before_rebooting", "pause_before_committing")),
    ("pending", "pending", ("pending",)),
)
FINISHED = ("success", "failure", "already-installed", "noartifact")


@dataclass
class Progress:
    total: int
    stats: dict[str, int]
    #: (css class, label, count, x percent, width percent)
    segments: list[tuple[str, str, int, float, float]] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return sum(self.stats.get(s, 0) for s in FINISHED)

    @property
    def done_percent(self) -> int:
        final = sum(self.stats.get(s, 0) for s in rollout.TERMINAL)
        return int(100 * final / self.total) if self.total else 0

    @property
    def failure_rate(self) -> float | None:
        return 100.0 * self.stats.get("failure", 0) / self.finished if self.finished else None


def progress(stats: dict[str, int], total: int | None = None) -> Progress:
    n = total if total is not None else sum(stats.values())
    p = Progress(n, stats)
    x = 0.0
    for css, label, members in SEGMENTS:
        count = sum(stats.get(m, 0) for m in members)
        if count and n:
            width = 100.0 * count / n
            p.segments.append((css, label, count, round(x, 3), round(width, 3)))
            x += width
    return p


def statistics_many(conn: Connection, ids: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {i: dict.fromkeys(rollout.STATISTICS_KEYS, 0) for i in ids}
    if ids:
        rows = conn.execute(sa.select(dd.c.deployment_id, dd.c.status, sa.func.count())
                            .where(dd.c.deployment_id.in_(ids)).group_by(dd.c.deployment_id, dd.c.status))
        for deployment_id, status, count in rows:
            out[deployment_id][status] = out[deployment_id].get(status, 0) + int(count)
    return out


def identity_of(identity_json: str | None) -> dict[str, Any]:
    if not identity_json:
        return {}
    try:
        doc = json.loads(identity_json)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


# ---------------------------------------------------------------------------------------------------------
# Fleet overview


@dataclass(frozen=True)
class DeviceFilter:
    status: str | None = None
    group: str | None = None
    artifact: str | None = None
    #: True: only stale devices, False: only the others (see :mod:`.lastseen`)
    stale: bool | None = None
    #: now - stale_after
    cutoff: float = 0.0

    def where(self) -> list[Any]:
        clauses: list[Any] = []
        if self.stale is not None:
            clauses.append(stale_clause(self.cutoff) if self.stale else sa.not_(stale_clause(self.cutoff)))
        if self.status:
            clauses.append(devices.c.status == self.status)
        if self.group == "":
            clauses.append(devices.c.group_name.is_(None))
        elif self.group:
            clauses.append(devices.c.group_name == self.group)
        if self.artifact == "":
            clauses.append(running_artifact.is_(None))
        elif self.artifact:
            clauses.append(running_artifact == self.artifact)
        return clauses

    @property
    def active(self) -> bool:
        return (self.status is not None or self.group is not None or self.artifact is not None
                or self.stale is not None)


def fleet_counts(conn: Connection, cutoff: float) -> dict[str, Any]:
    """Devices by status, by running version, by group, and how many are stale at ``cutoff``."""
    by_status = dict.fromkeys(DEVICE_STATUSES, 0)
    for status, count in conn.execute(sa.select(devices.c.status, sa.func.count()).group_by(devices.c.status)):
        by_status[status] = int(count)
    versions = [(name, int(count)) for name, count in conn.execute(
        sa.select(running_artifact.label("artifact"), sa.func.count().label("n")).group_by(running_artifact)
        .order_by(sa.desc("n"), running_artifact).limit(TOP_VERSIONS + 1))]
    groups = [(name, int(count)) for name, count in conn.execute(
        sa.select(devices.c.group_name, sa.func.count().label("n")).group_by(devices.c.group_name)
        .order_by(sa.desc("n"), devices.c.group_name))]
    stale = int(conn.execute(sa.select(sa.func.count()).select_from(devices).where(stale_clause(cutoff))).scalar_one())
    return {"by_status": by_status, "total": sum(by_status.values()), "versions": versions[:TOP_VERSIONS],
            "more_versions": len(versions) > TOP_VERSIONS, "groups": groups, "stale": stale}


def device_rows(conn: Connection, flt: DeviceFilter, page: int, per_page: int = PER_PAGE) -> tuple[int, list[dict[str, Any]]]:
    where = flt.where()
    total = int(conn.execute(sa.select(sa.func.count()).select_from(devices).where(*where)).scalar_one())
    q = (sa.select(devices.c.id, devices.c.identity_json, devices.c.status, devices.c.group_name,
                   devices.c.device_type, running_artifact.label("artifact"), devices.c.last_seen, devices.c.updated)
         .where(*where).order_by(devices.c.created, devices.c.id).limit(per_page).offset((page - 1) * per_page))
    rows = [{"id": r.id, "identity": identity_of(r.identity_json), "status": r.status, "group": r.group_name,
             "device_type": r.device_type, "artifact": r.artifact, "last_seen": r.last_seen,
             "stale": is_stale(r.status, r.last_seen, r.updated, flt.cutoff)} for r in conn.execute(q)]
    return total, rows


def deployment_rows(conn: Connection, page: int = 1, per_page: int = RECENT_DEPLOYMENTS) -> tuple[int, list[dict[str, Any]]]:
    total = int(conn.execute(sa.select(sa.func.count()).select_from(dep)).scalar_one())
    rows = conn.execute(sa.select(dep).order_by(dep.c.created.desc(), dep.c.id)
                        .limit(per_page).offset((page - 1) * per_page)).all()
    stats = statistics_many(conn, [r.id for r in rows])
    return total, [{"row": r, "progress": progress(stats[r.id], r.device_count)} for r in rows]


# ---------------------------------------------------------------------------------------------------------
# One device


def device_detail(conn: Connection, device_id: str, cutoff: float) -> dict[str, Any] | None:
    row = conn.execute(sa.select(devices).where(devices.c.id == device_id)).first()
    if row is None:
        return None
    sets = conn.execute(sa.select(auth_sets.c.id, auth_sets.c.status, auth_sets.c.created, auth_sets.c.pubkey,
                                  auth_sets.c.cert_serial, auth_sets.c.cert_refused)
                        .where(auth_sets.c.device_id == device_id).order_by(auth_sets.c.created)).all()
    history = conn.execute(
        sa.select(dd.c.deployment_id, dd.c.status, dd.c.substate, dd.c.created, dd.c.started, dd.c.finished,
                  dd.c.attempts, dd.c.has_log, dd.c.phase, dep.c.name, dep.c.artifact_name,
                  dep.c.status.label("deployment_status"))
        .join(dep, dep.c.id == dd.c.deployment_id)
        .where(dd.c.device_id == device_id).order_by(dd.c.created.desc(), dep.c.created.desc())
        .limit(HISTORY_LIMIT)).all()
    last_log = None
    with_log = next((h for h in history if h.has_log), None)
    if with_log is not None:
        messages, dropped = log_messages(conn, with_log.deployment_id, device_id, limit=200)
        last_log = {"deployment_id": with_log.deployment_id, "name": with_log.name, "status": with_log.status,
                    "messages": messages, "dropped": dropped}
    inventory = row.inventory or {}
    return {"row": row, "identity": identity_of(row.identity_json), "auth_sets": sets, "history": history,
            "inventory": sorted(inventory.items()), "artifact": inventory.get("artifact_name"), "last_log": last_log,
            "stale": is_stale(row.status, row.last_seen, row.updated, cutoff), "config": sync_state(row.config_hash, inventory)}


def log_messages(conn: Connection, deployment_id: str, device_id: str, limit: int = LOG_LIMIT
                 ) -> tuple[list[dict[str, Any]], int]:
    """The newest ``limit`` messages of a device's deployment log (oldest first) and how many were left out;
    only the rows holding them are read."""
    return newest_messages(conn, deployment_id, device_id, limit)


# ---------------------------------------------------------------------------------------------------------
# One deployment


def deployment_detail(conn: Connection, deployment_id: str, failures_page: int, now: float) -> dict[str, Any] | None:
    row = conn.execute(sa.select(dep).where(dep.c.id == deployment_id)).first()
    if row is None:
        return None
    stats = rollout.statistics(conn, deployment_id)
    prog = progress(stats, row.device_count)
    per_phase: dict[int, dict[str, int]] = {}
    for phase, status, count in conn.execute(
            sa.select(dd.c.phase, dd.c.status, sa.func.count()).where(dd.c.deployment_id == deployment_id)
            .group_by(dd.c.phase, dd.c.status)):
        per_phase.setdefault(int(phase), {})[status] = int(count)
    phases = []
    current = None
    for i, p in enumerate(row.phases or []):
        started = p.get("start_ts") is not None and float(p["start_ts"]) <= now
        if started:
            current = i
        phases.append({"number": i + 1, "batch_size": p.get("batch_size"), "start_ts": p.get("start_ts"),
                       "device_count": p.get("device_count", 0), "started": started,
                       "progress": progress(per_phase.get(i, {}), int(p.get("device_count") or 0))})
    if current is not None:
        phases[current]["current"] = True
    next_phase = next((p for p in phases if not p["started"]), None)
    failures_total = stats.get("failure", 0)
    failures = conn.execute(
        sa.select(dd.c.device_id, dd.c.substate, dd.c.started, dd.c.finished, dd.c.has_log, dd.c.attempts,
                  dd.c.phase, devices.c.identity_json)
        .outerjoin(devices, devices.c.id == dd.c.device_id)
        .where(dd.c.deployment_id == deployment_id, dd.c.status == "failure")
        .order_by(dd.c.finished.desc(), dd.c.device_id)
        .limit(FAILURES_PER_PAGE).offset((failures_page - 1) * FAILURES_PER_PAGE)).all()
    artifacts = conn.execute(sa.select(art_t.c.id, art_t.c.name, art_t.c.size, art_t.c.device_types, art_t.c.signed,
                                       art_t.c.signed_by, art_t.c.created, art_t.c.description)
                             .where(art_t.c.name == row.artifact_name).order_by(art_t.c.created)).all()
    return {"row": row, "stats": {k: v for k, v in stats.items() if v}, "progress": prog, "phases": phases,
            "next_phase": next_phase, "failures": [{"row": f, "identity": identity_of(f.identity_json)} for f in failures],
            "failures_total": failures_total, "artifacts": artifacts}


def deployment_device(conn: Connection, deployment_id: str, device_id: str) -> Any:
    return conn.execute(
        sa.select(dd, dep.c.name, dep.c.artifact_name, devices.c.identity_json)
        .join(dep, dep.c.id == dd.c.deployment_id).outerjoin(devices, devices.c.id == dd.c.device_id)
        .where(dd.c.deployment_id == deployment_id, dd.c.device_id == device_id)).first()


# ---------------------------------------------------------------------------------------------------------
# What the action forms offer (read here, changed only through the management API's functions)

def artifact_choices(conn: Connection) -> list[dict[str, Any]]:
    """Each uploaded artifact name once, newest upload first, with the device types of its files."""
    by_name: dict[str, dict[str, Any]] = {}
    for r in conn.execute(sa.select(art_t.c.name, art_t.c.device_types, art_t.c.created)
                          .order_by(art_t.c.created.desc())):
        entry = by_name.setdefault(r.name, {"name": r.name, "device_types": set()})
        entry["device_types"].update(r.device_types or [])
    return [{"name": e["name"], "device_types": sorted(e["device_types"])} for e in by_name.values()]


def group_choices(conn: Connection) -> list[str]:
    return [r[0] for r in conn.execute(sa.select(devices.c.group_name).where(devices.c.group_name.is_not(None))
                                       .distinct().order_by(devices.c.group_name))]
