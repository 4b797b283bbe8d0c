"""Rollouts judged after the commit: health-gated phases and the failure limit (hawkBit's rollout groups with
success and error thresholds are the model).

A phase with a ``gate`` (``{"min_success_pct": P, "soak_s": S}``) starts only when at least P % of the devices
of the phases before it reported ``success`` — with our agent that means the trial boot passed its health check
and the slot was committed (device_hooks/agent.py reports ``success`` only from ``finish_success``, after the
verdict committed the slot) — and the success that reached the share is at least S seconds old. Until then its
devices wait with :data:`GATED` as their ``not_before``; once the share is reached the phase gets its start time
(that success + S, never before its own timer) and its devices that start time, so the poll's usual "has my
phase started?" comparison covers the soak: nothing needs to run when the soak ends.

The failure limit (``{"max_failed_pct": P, "on_failure": "pause" | "abort"}``) counts the devices with at
least one failed attempt — a rolled-back trial is a ``failure`` report of our agent (the reason in ``substate``),
an attempt retried counts too — as a share of the devices the deployment was handed to. Past the limit the
deployment is paused at once; with ``abort`` it is then aborted in a transaction of its own (see
:func:`check_failure_limit`).

The pure functions (:func:`gate_opens_at`, :func:`phase_starts`, :func:`over_limit`) take the clock as an
argument; the others run inside the transaction that holds the deployment's row lock
(:mod:`.deployments`'s lock order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .models import deployment_devices as dd
from .models import deployments as dep

#: ``not_before`` of the devices of a phase whose gate has not opened (9999-12-31T23:59:59Z: later than any
#: clock, and still a valid timestamp for whoever shows it)
GATED = 253_402_300_799.0
#: final statuses that say nothing about the release's health: left out of a gate's count
NOT_EVIDENCE = ("already-installed", "noartifact", "decommissioned", "aborted")
ON_FAILURE = ("pause", "abort")


def gate_opens_at(min_success_pct: float, soak_s: float, success_times: Sequence[float], counted: int
                  ) -> float | None:
    """When a gate opens: ``K = max(1, ceil(counted × min_success_pct / 100))`` successes are needed (at least
    one: a gate without evidence stays shut); None while there are fewer, else the K-th success's time (in
    ``success_times``, any order) plus ``soak_s``."""
    needed = max(1, math.ceil(counted * min_success_pct / 100 - 1e-9))
    if len(success_times) < needed:
        return None
    return sorted(success_times)[needed - 1] + soak_s


def gate_open(min_success_pct: float, soak_s: float, success_times: Sequence[float], counted: int, t: float) -> bool:
    """Whether the gate is open at time ``t`` (see :func:`gate_opens_at`)."""
    at = gate_opens_at(min_success_pct, soak_s, success_times, counted)
    return at is not None and at <= t


def phase_starts(phases: Sequence[Mapping[str, Any]], created: float, passed: Mapping[int, float]
                 ) -> list[float | None]:
    """Start times of the phases of a gated deployment (None: waiting for a gate). A phase's timer is its
    ``start_at`` or ``wait_s`` after the previous phase's start (the first: after ``created``); a gated phase
    starts at ``max(timer, passed[i])`` once its gate opened (``passed``: phase index -> opening time), and
    every phase after a phase without a start waits too. No phase starts before the one before it."""
    out: list[float | None] = []
    prev: float | None = created
    for i, p in enumerate(phases):
        if prev is None:
            out.append(None)
            continue
        start = float(p["start_at"]) if p.get("start_at") is not None else prev + float(p.get("wait_s") or 0)
        if p.get("gate"):
            if i not in passed:
                out.append(None)
                prev = None
                continue
            start = max(start, passed[i])
        start = max(start, prev) if i else start
        out.append(start)
        prev = start
    return out


def over_limit(failed: int, handed_out: int, max_failed_pct: float) -> bool:
    """The failure limit's test: ``failed × 100 / handed_out > max_failed_pct`` (nothing handed out: no)."""
    return handed_out > 0 and failed * 100.0 / handed_out > max_failed_pct


def current_phase(phases: Sequence[Mapping[str, Any]], t: float) -> int:
    """The phase a device joining at ``t`` goes to: the latest one started (start time at or before ``t``),
    else the first."""
    started = [i for i, p in enumerate(phases) if p.get("start_ts") is not None and float(p["start_ts"]) <= t]
    return started[-1] if started else 0


def open_gates(conn: Connection, deployment_id: str, phases: list[dict[str, Any]], created: float) -> None:
    """Schedule the gated phases whose gate is reached now (the deployment's row is locked by the caller):
    each gets its opening time (``gate_passed_ts``: the success that reached the share, plus its soak), the
    phases from it up to the next gate get their start times, and their waiting devices that ``not_before``."""
    passed = {i: float(p["gate_passed_ts"]) for i, p in enumerate(phases) if p.get("gate_passed_ts") is not None}
    changed = False
    while True:
        waiting = next((i for i, p in enumerate(phases) if p.get("gate") and i not in passed), None)
        if waiting is None:
            break
        before = (dd.c.deployment_id == deployment_id, dd.c.phase < waiting)
        counted = conn.execute(sa.select(sa.func.count()).where(*before, dd.c.status.not_in(NOT_EVIDENCE))).scalar()
        gate = phases[waiting]["gate"]
        needed = max(1, math.ceil(int(counted or 0) * float(gate["min_success_pct"]) / 100 - 1e-9))
        times = [float(r[0]) for r in conn.execute(
            sa.select(dd.c.finished).where(*before, dd.c.status == "success", dd.c.finished.is_not(None))
            .order_by(dd.c.finished).limit(needed))]
        at = gate_opens_at(float(gate["min_success_pct"]), float(gate["soak_s"]), times, int(counted or 0))
        if at is None:
            break
        passed[waiting] = at
        phases[waiting]["gate_passed_ts"] = at
        changed = True
    if not changed:
        return
    for i, start in enumerate(phase_starts(phases, created, passed)):
        if start is None or phases[i].get("start_ts") is not None:
            continue
        phases[i]["start_ts"] = start
        conn.execute(dd.update().where(dd.c.deployment_id == deployment_id, dd.c.phase == i,
                                       dd.c.status == "pending", dd.c.not_before >= GATED)
                     .values(not_before=start))
    conn.execute(dep.update().where(dep.c.id == deployment_id).values(phases=phases))


def failed_and_handed_out(conn: Connection, deployment_id: str) -> tuple[int, int]:
    """Devices with at least one failed attempt (``failure``, or retried after one), and devices the
    deployment was handed to (``next`` gave it, or they reported progress)."""
    this = dd.c.deployment_id == deployment_id
    failed = conn.execute(sa.select(sa.func.count()).where(
        this, sa.or_(dd.c.status == "failure", dd.c.attempts > 0))).scalar()
    handed = conn.execute(sa.select(sa.func.count()).where(this, sa.or_(
        dd.c.delivered_attempt.is_not(None),
        sa.and_(dd.c.started.is_not(None), dd.c.status.not_in(NOT_EVIDENCE))))).scalar()
    return int(failed or 0), int(handed or 0)


def check_failure_limit(conn: Connection, deployment_id: str) -> bool:
    """After a failed attempt: pause the deployment when its failure limit is passed, with the reason in
    ``status_reason``. Returns True when the limit says ``abort``: the caller aborts it in a transaction of its
    own once this one committed (aborting here would lock other devices' rows while holding the deployment's,
    against the lock order of :mod:`.deployments`); until then the deployment is paused, a safe state."""
    row = conn.execute(sa.select(dep.c.status, dep.c.failure_limit).where(dep.c.id == deployment_id)
                       .with_for_update()).first()
    if row is None or not row.failure_limit or row.status not in ("pending", "inprogress"):
        return False
    limit = row.failure_limit
    failed, handed = failed_and_handed_out(conn, deployment_id)
    if not over_limit(failed, handed, float(limit["max_failed_pct"])):
        return False
    action = limit.get("on_failure", "pause")
    reason = (f"failure limit: {failed} of {handed} device(s) handed out failed "
              f"({failed * 100.0 / handed:.1f}% > {float(limit['max_failed_pct']):g}%); "
              + ("aborted" if action == "abort" else "paused: resume with status inprogress"))
    conn.execute(dep.update().where(dep.c.id == deployment_id).values(status="paused", status_reason=reason))
    return bool(action == "abort")
