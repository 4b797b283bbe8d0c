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
from typing import TypeVar

from ota_common.errors import OTAError

from . import validate
from .config import Config

log = logging.getLogger(__name__)

STATES = ("ArtifactInstall", "ArtifactReboot", "ArtifactCommit", "ArtifactRollback", "ArtifactRollbackReboot",
          "ArtifactFailure")
ACTIONS = ("Enter", "Leave", "Error")
NAME_RE = re.compile(r"^(Artifact(?:Install|Reboot|Commit|Rollback|RollbackReboot|Failure))_(Enter|Leave|Error)_(\d\d)(_\S+)?$")
RETRY_LATER = 21
_T = TypeVar("_T")


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

    def lifecycle(self, state: str, body: Callable[[], _T], note: Callable[[str], None]) -> _T:
        """One state with Mender's handler lifecycle: ``Enter`` scripts, ``body``, ``Leave`` scripts; when any
        of the three fails, the ``Error`` scripts run (their own failures only noted) and the first failure
        propagates. ``note`` gets the scripts' output. Nothing is skipped on the way out and nothing masks
        the original error."""
        try:
            _note(note, self.run(state, "Enter"))
            result = body()
            _note(note, self.run(state, "Leave"))
            return result
        except BaseException:
            _note(note, self.run(state, "Error"))
            raise


def _note(note: Callable[[str], None], out: str) -> None:
    if out:
        note(out.rstrip("\n"))
