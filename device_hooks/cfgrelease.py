"""A configuration change that behaves like a release: announced, applied, checked, reverted when it breaks the
application, and reported.

Announced: every ``next`` answer carries ``X-VV-Config-Hash``, the hash of the device's effective configuration
(:attr:`.api.DeviceAPI.config_hash`; a value that is not 64 hex digits is ignored). The agent fetches the
configuration when the hash is neither the one it applied, nor the one it last fetched for, nor the one it
refused (:meth:`ConfigRelease.on_poll`), and on every inventory report as before (a server without the header).
The configuration GET carries the hash of exactly the values it returns; a server that sends none gets the
sha256 of their canonical JSON instead (:func:`local_hash`), used the same way.

Applied: the values are checked against what the signed image declares (:func:`.inventory.refusals`; a
refusal keeps the last good file). If ``[paths] device_env`` changes, the previous file is kept as
``device_env.prev``, the new one written and the application restarted (``[commands] restart_on_config``);
then the application checks (:func:`.health.wait_app_healthy`: units, ``/health``, ``required_config``) may
take up to ``[health] config_wait``. (An application that already failed them before the change keeps the new
configuration: the change is not what broke it, and it may be what fixes it.) Pass: the values and their hash go to ``server-config.json`` (the commit
point: what the agent writes at every start). Fail: ``device_env.prev`` is restored, the application restarted,
and the hash remembered as refused: it is not applied again until the server announces another configuration
and the device applies that one (or the server goes back to the applied one).

Every file is written atomically and ``config-state.json`` says which step is under way, so a power cut leaves
the old or the new ``device_env``, never half of one. At the next start (:meth:`ConfigRelease.recover`, before
the agent writes ``device_env`` from ``server-config.json``):

===============  ========================================================================================
phase            on start
===============  ========================================================================================
(none)           nothing to do
applying         committed (``server-config.json`` holds its hash): done. Else: the previous file back;
                 the change is tried again at the next poll, unless this was its second interrupted try
                 (a configuration that makes the device reboot): then it is refused
reverting        the previous file back (again: idempotent), the change refused with the recorded reason
===============  ========================================================================================

Reported in the inventory: ``config_hash`` (applied), ``config_status`` (``applied``, ``refused``: not valid
for this image, ``reverted``: its checks failed), ``config_refused`` (why) and ``config_refused_hash``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ota_common import sshkeys
from ota_common.varnames import is_config_hash

from . import devconfig, health, inventory
from .config import Config
from .faults import fault
from .state import atomic_write, read_json, write_json

log = logging.getLogger("ota-agent")

STATE = "config-state.json"
PREV_SUFFIX = ".prev"
#: interrupted tries (power cut or reboot during the checks) of one configuration before it is refused
MAX_INTERRUPTED = 2
STATUSES = ("applied", "refused", "reverted")


class ConfigSource(Protocol):
    """What the agent's server connection offers here (:class:`.api.DeviceAPI`)."""

    config_hash: str | None
    served_config_hash: str | None

    def configuration(self) -> dict[str, str]: ...


def local_hash(values: Mapping[str, str]) -> str:
    """The hash of a configuration the server sent without one."""
    return hashlib.sha256(json.dumps(dict(values), sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


@dataclass
class ConfigRelease:
    cfg: Config
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic
    doc: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.path = self.cfg.state_dir / STATE
        self.doc = _checked(read_json(self.path))

    @property
    def env_path(self) -> Path:
        return Path(self.cfg.paths.device_env)

    @property
    def prev_path(self) -> Path:
        return Path(self.cfg.paths.device_env + PREV_SUFFIX)

    @property
    def applied_hash(self) -> str | None:
        """The hash of the server configuration in ``server-config.json`` (None: none recorded yet)."""
        value = read_json(self.cfg.state_dir / devconfig.SERVER_VALUES).get("hash")
        return value if is_config_hash(value) else None

    def _save(self) -> None:
        write_json(self.path, self.doc)

    # ------------------------------------------------------------------ decisions
    def on_poll(self, announced: str | None) -> str:
        """What the hash of a ``next`` answer calls for: ``fetch``; ``report`` (a server back on the applied
        configuration ends a refusal: its hash changed, and there is nothing to fetch); or "" (nothing)."""
        if announced is None:
            return ""
        applied = self.applied_hash
        if announced == applied and self.doc.get("status") in ("refused", "reverted"):
            self._set_outcome("applied", note=self.doc.get("note", ""))
            return "report"
        return "" if announced in (applied, self.doc.get("seen"), self.doc.get("refused_hash")) else "fetch"

    def sync(self, api: ConfigSource, device_id: str | None) -> None:
        """Fetch the configuration and apply it (:meth:`apply`). Raises what the connection raises."""
        announced = api.config_hash
        values = api.configuration()
        h = api.served_config_hash or local_hash(values)
        self.apply(device_id, values, h)
        self.doc["seen"] = announced or h
        self._save()

    def apply(self, device_id: str | None, values: Mapping[str, str], h: str) -> None:
        if h == self.doc.get("refused_hash"):
            log.info("configuration %s was refused before (%s): not applied again until the server's changes",
                     h[:12], self.doc.get("refused_reason", ""))
            return
        env = {k: v for k, v in values.items() if k != sshkeys.VARIABLE}
        why = inventory.refusals(self.cfg, env)
        note = devconfig.install_ssh_keys(self.cfg, values[sshkeys.VARIABLE]) if sshkeys.VARIABLE in values else ""
        if why:
            log.error("configuration from the server refused, the last good one stays: %s", why)
            self._set_outcome("refused", h, "; ".join(r for r in (why, note) if r)[:1000])
            return
        text = inventory.env_text(devconfig.env_values(self.cfg, device_id, env)).encode()
        old = devconfig.read_small(self.env_path)
        if old == text or (old is None and not text):
            self._commit(env, h, note)
            return
        self._try(env, h, text, old, note)

    # ------------------------------------------------------------------ steps
    def _try(self, env: dict[str, str], h: str, text: bytes, old: bytes | None, note: str) -> None:
        attempts = self.doc.get("attempts", 0) if self.doc.get("hash") == h else 0
        # an application that fails before the change says nothing about the change: it is not reverted then
        before = health.run_checks(self.cfg, app_only=True)
        if old is not None:  # complete before the state says "applying": a cut from here on can go back to it
            atomic_write(self.prev_path, old, 0o640)
        self.doc.update(phase="applying", hash=h, attempts=attempts, prev_absent=old is None)
        self._save()
        fault("config-applying")
        atomic_write(self.env_path, text, 0o640)
        log.info("configuration %s written: %s; checking the application (up to %.0fs)", h[:12],
                 ", ".join(sorted(env)) or "(none)", self.cfg.health.config_wait)
        inventory.restart_app(self.cfg)
        fault("config-written")
        res = health.wait_app_healthy(self.cfg, self.sleep, self.monotonic)
        if res.ok or not before.ok:
            if not res.ok:
                log.warning("configuration %s kept although the application fails its checks (%s): it failed "
                            "them before the change too", h[:12], res.summary)
                note = "; ".join(n for n in (note, f"kept although the application fails its checks, as it did "
                                                   f"before the change: {res.summary}") if n)[:1000]
            self._commit(env, h, note)
            return
        reason = f"the application failed its checks after the change: {res.summary}"[:1000]
        log.error("configuration %s reverted: %s", h[:12], reason)
        self.doc.update(phase="reverting", reason=reason)
        self._save()
        fault("config-reverting")
        self._restore()
        self._set_outcome("reverted", h, reason)

    def _commit(self, env: dict[str, str], h: str, note: str) -> None:
        write_json(self.cfg.state_dir / devconfig.SERVER_VALUES, {"values": env, "hash": h})  # the commit point
        fault("config-committed")
        self._set_outcome("applied", note=note)

    def _restore(self) -> None:
        """The previous ``device_env`` back (none: removed), and the application restarted."""
        if self.doc.get("prev_absent"):
            self.env_path.unlink(missing_ok=True)
        else:
            data = devconfig.read_small(self.prev_path)
            if data is None:
                log.error("%s is missing: %s is rebuilt from the last applied configuration at the next start",
                          self.prev_path, self.env_path)
                return
            atomic_write(self.env_path, data, 0o640)
        inventory.restart_app(self.cfg)

    def _set_outcome(self, status: str, h: str = "", reason: str = "", note: str = "") -> None:
        for key in ("phase", "hash", "attempts", "reason", "prev_absent", "refused_hash", "refused_reason", "note"):
            self.doc.pop(key, None)
        self.doc["status"] = status
        if h:
            self.doc.update(refused_hash=h, refused_reason=reason)
        if note:
            self.doc["note"] = note
        self._save()

    # ------------------------------------------------------------------ start and report
    def recover(self) -> None:
        """Resolve a change that a power cut or a crash interrupted (module docstring)."""
        phase, h = self.doc.get("phase"), self.doc.get("hash", "")
        if not phase:
            return
        if phase == "applying" and h and h == self.applied_hash:
            log.info("configuration %s: committed before the interruption", h[:12])
            self._set_outcome("applied", note=self.doc.get("note", ""))
            return
        self._restore()
        if phase == "reverting":
            self._set_outcome("reverted", h, self.doc.get("reason", "reverted"))
            return
        attempts = self.doc.get("attempts", 0) + 1
        if attempts >= MAX_INTERRUPTED:
            self._set_outcome("reverted", h, f"the checks after this change were interrupted {attempts} times (power "
                                             "cut or reboot): not applied")
            return
        log.warning("configuration %s: interrupted before its checks ended; the previous one is back, the change "
                    "is tried again", h[:12])
        self.doc.pop("phase", None)
        self.doc.pop("seen", None)
        self.doc["attempts"] = attempts
        self._save()

    def inventory(self) -> dict[str, str]:
        out: dict[str, str] = {}
        applied = self.applied_hash
        if applied:
            out["config_hash"] = applied
        status = self.doc.get("status", "")
        if status:
            out["config_status"] = status
        if status in ("refused", "reverted") and self.doc.get("refused_hash"):
            out.update(config_refused=self.doc.get("refused_reason", ""), config_refused_hash=self.doc["refused_hash"])
        elif self.doc.get("note"):
            out["config_refused"] = self.doc["note"]
        return out


def _checked(doc: dict[str, Any]) -> dict[str, Any]:
    """``config-state.json`` with only well-formed entries (``/data`` is writable: nothing is taken on trust)."""
    out: dict[str, Any] = {}
    for key in ("hash", "seen", "refused_hash"):
        if is_config_hash(doc.get(key)):
            out[key] = doc[key]
    for key in ("reason", "refused_reason", "note"):
        if isinstance(doc.get(key), str):
            out[key] = doc[key][:1000]
    if doc.get("phase") in ("applying", "reverting") and "hash" in out:
        out["phase"] = doc["phase"]
    if doc.get("status") in STATUSES:
        out["status"] = doc["status"]
    if type(doc.get("attempts")) is int and 0 <= doc["attempts"] < 100:
        out["attempts"] = doc["attempts"]
    if type(doc.get("prev_absent")) is bool:
        out["prev_absent"] = doc["prev_absent"]
    return out


__all__ = ["ConfigRelease", "local_hash"]
