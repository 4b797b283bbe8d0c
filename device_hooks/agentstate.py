"""The agent's persistent state, typed: the deployment in progress and its phase, the status reports not yet
taken by the server (one queue per deployment), and the facts that must survive a reboot.

It lives in ``<state_dir>/state.json`` on ``/data``, which is writable and survives updates, so it is
validated like any other input when read: a value that does not fit (a deployment id that is not a UUID, a
slot that is not 2 or 3, a phase we do not know) makes the whole file unusable; it is moved aside and the
agent starts from an empty state instead of acting on it. The layout written by the previous agent version
(flat ``phase``/``deployment``/``target_part`` keys, one outbox list) is read too, so a device updating from
it finishes its deployment.
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

FORMAT = 2
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
        self.current = None
        if dep_id not in self.finished:
            self.finished = [*self.finished, dep_id][-KEEP_FINISHED:]

    # -- serialisation
    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"format": FORMAT, "current": None, "outbox": [], "finished": self.finished,
                               "no_delta_for": self.no_delta_for, "config_refused": self.config_refused}
        if self.current is not None:
            cur = asdict(self.current)
            cur.update(phase=self.current.phase.value, target=int(self.current.target),
                       source=int(self.current.source))
            doc["current"] = cur
        # a list of [deployment, reports] pairs: the file is written with sorted keys, and the oldest
        # deployment's reports go first
        doc["outbox"] = [[dep, [asdict(r) for r in reports]] for dep, reports in self.outbox.items()]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AgentState:
        """Raises ``ValueError`` (or ``TypeError``/``KeyError``) for anything that does not fit."""
        if doc.get("format") != FORMAT:
            return cls._from_v1(doc)
        cur = doc.get("current")
        current = None
        if cur is not None:
            current = Current(
                id=validate.deployment_id(cur["id"], local_ok=True),
                artifact_name=_str(cur.get("artifact_name", ""), allow_empty=True),
                uri=_str(cur.get("uri", ""), allow_empty=True), phase=Phase(cur["phase"]),
                target=Slot(int(cur["target"])), source=Slot(int(cur["source"])),
                allow_downgrade=_bool(cur.get("allow_downgrade", False)),
                local_path=_str(cur.get("local_path", ""), allow_empty=True),
                verified=_bool(cur.get("verified", False)), boot_id=_str(cur.get("boot_id", ""), allow_empty=True),
                armed_at=float(cur.get("armed_at", 0.0)), arm_attempts=int(cur.get("arm_attempts", 0)))
        outbox = {validate.deployment_id(pair[0]): [_report(r) for r in _list(pair[1])]
                  for pair in _list(doc.get("outbox", [])) if len(_list(pair)) == 2}
        finished = [validate.deployment_id(d, local_ok=True) for d in _list(doc.get("finished", []))]
        return cls(current, outbox, finished[-KEEP_FINISHED:], _str(doc.get("no_delta_for", ""), allow_empty=True),
                   _str(doc.get("config_refused", ""), allow_empty=True))

    @classmethod
    def _from_v1(cls, doc: dict[str, Any]) -> AgentState:
        """The flat layout of the agent before this one."""
        current = None
        dep = doc.get("deployment")
        if doc.get("phase") in ("downloading", "installing", "armed") and isinstance(dep, dict):
            current = Current(
                id=validate.deployment_id(dep["id"], local_ok=True),
                artifact_name=_str(dep.get("artifact_name", ""), allow_empty=True),
                uri=_str(dep.get("uri", ""), allow_empty=True), phase=Phase(doc["phase"]),
                target=Slot(int(doc["target_part"])), source=Slot(int(doc.get("from_part", 5 - int(doc["target_part"])))),
                allow_downgrade=_bool(dep.get("allow_downgrade", False)),
                verified=doc["phase"] != "downloading", boot_id=_str(doc.get("boot_id", ""), allow_empty=True),
                armed_at=float(doc.get("armed_at", 0.0)), arm_attempts=int(doc.get("arm_attempts", 0)))
        outbox: dict[str, list[Report]] = {}
        for item in _list(doc.get("outbox", [])):
            item = _dict(item)
            outbox.setdefault(validate.deployment_id(item["deployment"]), []).append(
                Report(_str(item["status"]), _str(item.get("substate", ""), allow_empty=True),
                       _bool(item.get("log", False))))
        last = doc.get("last_deployment")
        finished = [validate.deployment_id(last, local_ok=True)] if isinstance(last, str) else []
        return cls(current, outbox, finished, _str(doc.get("no_delta_for") or "", allow_empty=True))


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


def _dict(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError("expected an object")
    return v


def _report(r: Any) -> Report:
    r = _dict(r)
    return Report(_str(r["status"]), _str(r.get("substate", ""), allow_empty=True), _bool(r.get("log", False)))


__all__ = ["AgentState", "Current", "Phase", "Report", "Slot", "StateStore"]
