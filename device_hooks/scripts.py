"""Artifact state scripts with Mender's names and exit-code semantics.

Names: ``Artifact<State>_<Enter|Leave|Error>_<NN>[_<description>]``, run in lexical order. Exit 0 goes on;
exit 21 means "retry later": the script is run again after ``script_retry_interval`` until
``script_retry_timeout``; any other code fails the state (for ``_Error`` scripts the failure is logged and
ignored, as in Mender). Scripts come from the signed artifact header and are kept on ``/data`` for the states
that run after the reboot (ArtifactReboot_Leave, ArtifactCommit, ArtifactRollback*, ArtifactFailure).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ota_common.errors import OTAError

from . import validate
from .config import Config

log = logging.getLogger(__name__)

STATES = ("ArtifactInstall", "ArtifactReboot", "ArtifactCommit", "ArtifactRollback", "ArtifactRollbackReboot",
          "ArtifactFailure")
ACTIONS = ("Enter", "Leave", "Error")
NAME_RE = re.compile(r"^(Artifact(?:Install|Reboot|Commit|Rollback|RollbackReboot|Failure))_(Enter|Leave|Error)_(\d\d)(_\S+)?$")
RETRY_LATER = 21


class ScriptError(OTAError):
    """A state script failed (its output is in the message)."""


def scripts_dir(state_dir: Path, dep_id: str) -> Path:
    """Where a deployment's verified scripts are kept: checked to stay in ``<state_dir>/scripts``."""
    return validate.under(state_dir / "scripts", validate.deployment_id(dep_id, local_ok=True))


def store_scripts(directory: Path, scripts: Mapping[str, bytes]) -> None:
    """Keep an artifact's scripts in ``directory`` (replacing what was there)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for name, body in scripts.items():
        base = name.rsplit("/", 1)[-1]
        if NAME_RE.match(base) is None:
            log.warning("ignoring script %r: not an artifact state script name", name)
            continue
        path = directory / base
        path.write_bytes(body)
        path.chmod(0o755)


@dataclass(frozen=True)
class ScriptRunner:
    directory: Path
    timeout: float = 3600.0
    retry_interval: float = 60.0
    retry_timeout: float = 1800.0
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def for_deployment(cls, cfg: Config, dep_id: str, sleep: Callable[[float], None] = time.sleep) -> ScriptRunner:
        """The runner of a deployment's kept scripts (``<state_dir>/scripts/<id>``) with the configured timeouts.
        Raises :class:`~device_hooks.validate.UntrustedInput` for an id that is not a deployment id."""
        c = cfg.commands
        return cls(scripts_dir(cfg.state_dir, dep_id), c.script_timeout, c.script_retry_interval,
                   c.script_retry_timeout, sleep)

    def names(self, state: str, action: str) -> list[str]:
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.iterdir():
            m = NAME_RE.match(p.name)
            if m and m.group(1) == state and m.group(2) == action:
                out.append(p.name)
        return sorted(out)

    def run(self, state: str, action: str) -> str:
        """Run the scripts of one state transition; returns their combined output. Raises :class:`ScriptError`
        on failure (never for ``Error`` scripts)."""
        output: list[str] = []
        for name in self.names(state, action):
            try:
                output.append(self._run_one(name))
            except ScriptError as e:
                if action == "Error":
                    log.warning("%s", e)
                    output.append(str(e))
                    continue
                raise
        return "".join(output)

    def _run_one(self, name: str) -> str:
        deadline = time.monotonic() + self.retry_timeout
        while True:
            log.info("running state script %s", name)
            try:
                proc = subprocess.run([str(self.directory / name)], cwd=self.directory, capture_output=True,
                                      text=True, errors="replace", timeout=self.timeout, check=False,
                                      env=dict(os.environ, PATH=os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")))
            except subprocess.TimeoutExpired:
                raise ScriptError(f"state script {name} timed out after {self.timeout:.0f}s") from None
            except OSError as e:
                raise ScriptError(f"state script {name} cannot run: {e.strerror}") from None
            out = (proc.stdout + proc.stderr).strip()
            if proc.returncode == 0:
                return f"{name}: ok\n{out}\n" if out else f"{name}: ok\n"
            if proc.returncode == RETRY_LATER and time.monotonic() < deadline:
                log.info("state script %s asked to retry later", name)
                self.sleep(self.retry_interval)
                continue
            raise ScriptError(f"state script {name} failed with exit code {proc.returncode}: {out[-2000:]}")

    def state(self, state: str, note: Callable[[str], None]) -> StateLifecycle:
        """The lifecycle of one state's scripts (:class:`StateLifecycle`)."""
        return StateLifecycle(self, state, note)


class StateLifecycle:
    """One state with Mender's handler lifecycle, the way mender-artifact's handlers always run their finish
    step: inside ``with``, :meth:`enter` runs the ``Enter`` scripts (when the state really begins, e.g. after a
    header was verified); leaving the block runs ``Leave`` when all went well, else ``Error`` (whose own failures
    are only noted); a failing ``Leave`` runs ``Error`` too. Nothing masks the original error, nothing is
    skipped on the way out; before :meth:`enter` nothing runs at all."""

    def __init__(self, runner: ScriptRunner, state: str, note: Callable[[str], None]) -> None:
        self.runner, self.name, self.note = runner, state, note
        self.entered = False

    def enter(self) -> None:
        self.entered = True  # a failing Enter gets the Error scripts too
        self._run("Enter")

    def _run(self, action: str) -> None:
        out = self.runner.run(self.name, action)
        if out:
            self.note(out.rstrip("\n"))

    def __enter__(self) -> StateLifecycle:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.entered:
            return
        if exc_type is not None:
            self._run("Error")
            return
        try:
            self._run("Leave")
        except BaseException:
            self._run("Error")
            raise
