"""The agent's persistent state, typed: the deployment in progress and its phase, the status reports not yet
taken by the server (one queue per deployment), and the facts that must survive a reboot.

It lives in ``<state_dir>/state.json`` on ``/data``, which is writable and survives updates, so it is
validated like any other input when read: a value that does not fit (a deployment id that is not a UUID, a
slot that is not 2 or 3, a phase we do not know) makes the whole file unusable; it is moved aside and the
agent starts from an empty state instead of acting on it. The layout is the previous agent version's
(flat ``phase``/``deployment``/``target_part`` keys, one outbox list) with a few more keys it ignores, so each
reads the other's file: a device updating from it finishes its deployment, and a trial that rolls back to a
slot with the previous agent has it report the rollback.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import validate
from .slots import PART_A, PART_B
from .state import read_json, write_json

log = logging.getLogger(__name__)

KEEP_FINISHED = 50  # deployment ids remembered as done: a replayed one is refused


class Phase(enum.Enum):
    """Where the deployment in progress is. Idle is "no deployment"."""

    DOWNLOADING = "downloading"  # nothing verified yet: no artifact script may run
    INSTALLING = "installing"  # the header is verified: its scripts are stored, the slot is being written
    ARMED = "armed"  # the slot is written and verified; the boot state points at it (or is about to)


class Slot(enum.IntEnum):
    """The A/B slots by their partition number."""

    A = PART_A
    B = PART_B

    @property
    def other(self) -> Slot:
        return Slot.B if self is Slot.A else Slot.A

    @property
    def label(self) -> str:
        return self.name


@dataclass
class Report:
    status: str
    substate: str = ""
    log: bool = False  # upload the deployment's log first


@dataclass
class Current:
    """The deployment in progress."""

    id: str
    artifact_name: str
    uri: str
    phase: Phase
    target: Slot
    source: Slot
    allow_downgrade: bool = False
    local_path: str = ""
    verified: bool = False  # the artifact header of this deployment passed its signature check
    boot_id: str = ""  # the boot in which the slot was armed
    armed_at: float = 0.0
    arm_attempts: int = 0


@dataclass
class AgentState:
    current: Current | None = None
    outbox: dict[str, list[Report]] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    no_delta_for: str = ""  # rootfs checksum of an image a delta failed on: ask for full artifacts
    config_refused: str = ""  # why the server's last configuration was not applied

    def finish(self, dep_id: str) -> None:
        """``dep_id`` is over: remembered as finished; it stops being the current deployment if it was."""
        if self.current is not None and self.current.id == dep_id:
            self.current = None
        if dep_id not in self.finished:
            self.finished = [*self.finished, dep_id][-KEEP_FINISHED:]

    # -- serialisation: the flat layout of the previous agent, so that both read each other's file (a trial
    # that rolls back to a slot with the previous agent finds its deployment and its queued reports there)
    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "outbox": [{"deployment": dep, **asdict(r)} for dep, reports in self.outbox.items() for r in reports],
            "finished": self.finished, "no_delta_for": self.no_delta_for or None,
            "config_refused": self.config_refused}
        if self.finished:
            doc["last_deployment"] = self.finished[-1]
        cur = self.current
        if cur is not None:
            doc.update(phase=cur.phase.value, target_part=int(cur.target), from_part=int(cur.source),
                       deployment={"id": cur.id, "artifact_name": cur.artifact_name, "uri": cur.uri,
                                   "allow_downgrade": cur.allow_downgrade, "local_path": cur.local_path})
            if cur.phase is Phase.ARMED:
                doc.update(boot_id=cur.boot_id, armed_at=cur.armed_at, arm_attempts=cur.arm_attempts)
        return {k: v for k, v in doc.items() if v is not None}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AgentState:
        """Raises ``ValueError`` (or ``TypeError``/``KeyError``) for anything that does not fit."""
        current = None
        dep = doc.get("deployment")
        if doc.get("phase") is not None:
            dep = _dict(dep)
            phase = Phase(doc["phase"])
            current = Current(
                id=validate.deployment_id(dep["id"], local_ok=True),
                artifact_name=_str(dep.get("artifact_name", ""), allow_empty=True),
                uri=_str(dep.get("uri", ""), allow_empty=True), phase=phase,
                target=Slot(int(doc["target_part"])), source=Slot(int(doc.get("from_part", 5 - int(doc["target_part"])))),
                allow_downgrade=_bool(dep.get("allow_downgrade", False)),
                local_path=_str(dep.get("local_path", ""), allow_empty=True),
                # the header of a deployment past downloading was verified (its scripts stored from it)
                verified=phase is not Phase.DOWNLOADING, boot_id=_str(doc.get("boot_id", ""), allow_empty=True),
                armed_at=_finite(doc.get("armed_at", 0.0)), arm_attempts=_count(doc.get("arm_attempts", 0)))
        outbox: dict[str, list[Report]] = {}
        for item in _list(doc.get("outbox", [])):
            item = _dict(item)
            outbox.setdefault(validate.deployment_id(item["deployment"]), []).append(_report(item))
        finished = [validate.deployment_id(d, local_ok=True) for d in _list(doc.get("finished", []))]
        last = doc.get("last_deployment")
        if isinstance(last, str) and last not in finished:  # written by the previous agent
            finished.append(validate.deployment_id(last, local_ok=True))
        return cls(current, outbox, finished[-KEEP_FINISHED:], _str(doc.get("no_delta_for") or "", allow_empty=True),
                   _str(doc.get("config_refused", ""), allow_empty=True))


class StateStore:
    """``state.json``: loaded once, saved atomically after every change (``save``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        doc = read_json(path)
        try:
            self.state = AgentState.from_json(doc) if doc else AgentState()
        except (ValueError, TypeError, KeyError, validate.UntrustedInput) as e:
            aside = path.with_name(f"{path.name}.invalid-{int(time.time())}")
            log.error("state file %s does not fit the agent's state (%s); moved aside to %s, starting empty",
                      path, e, aside)
            os.replace(path, aside)
            self.state = AgentState()

    def save(self) -> None:
        write_json(self.path, self.state.to_json())


def _str(v: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(v, str) or (not v and not allow_empty) or len(v) > 8192:
        raise ValueError(f"expected a string, got {str(v)[:40]!r}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {str(v)[:40]!r}")
    return v


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise ValueError("expected a list")
    return v


def _finite(v: Any) -> float:
    f = float(v)
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {v!r}")
    return f


def _count(v: Any) -> int:
    n = int(v)
    if n < 0 or n > 1_000_000:
        raise ValueError(f"expected a small count, got {v!r}")
    return n


def _dict(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError("expected an object")
    return v


def _report(r: Any) -> Report:
    r = _dict(r)
    return Report(_str(r["status"]), _str(r.get("substate", ""), allow_empty=True), _bool(r.get("log", False)))


__all__ = ["AgentState", "Current", "Phase", "Report", "Slot", "StateStore"]
