"""Health verdict after a trial boot: check, then commit or roll back. Runs as ``ota-health.service``.

Local checks (all must pass, retried until ``deadline`` so a slow application gets its time):
- every unit in ``[health] units`` is active;
- the application's ``/health`` URL answers 2xx;
- ``/data`` is mounted;
- every variable of ``[health] required_config`` is set in the application's effective environment (the
  image's ``app_env`` overlaid by ``device_env``) and not to its placeholder (``config_placeholders``);
- every executable in ``/etc/ota/health.d`` (run-parts naming and order), each within ``hook_timeout``.

Then, with ``check_server``, the server: "reachable" means the new slot's own agent authenticated and completed
a poll in this boot (it leaves ``poll.json`` with the boot id), not that something answered HTTP (a captive
portal does). A server outage alone is no reason to roll back a release whose local checks pass: the trial
waits for that poll up to ``server_grace`` (default 1 hour; the application keeps running), then rolls back.

Pass ▸ ArtifactCommit_Enter scripts, ``upgrade_available=0`` (the commit), ArtifactCommit_Leave.
Fail ▸ ArtifactRollback_Enter, ``mender_boot_part=<other>``, ``upgrade_available=0``, ArtifactRollback_Leave,
ArtifactRollbackReboot_Enter, reboot. The verdict and the collected output go to ``health.json`` on ``/data``;
the agent reports it to the server (``success`` after the commit, ``failure`` with the output after the
rollback reboot).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import devconfig
from .agentstate import StateStore
from .bootenv import BootEnv
from .config import Config
from .faults import fault
from .identity import boot_id
from .scripts import ScriptError, ScriptRunner
from .slots import detect, other, slot_name
from .state import read_json, write_json

log = logging.getLogger("ota-health")

RUN_PARTS_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class CheckResult:
    ok: bool
    lines: list[str] = field(default_factory=list)

    def add(self, ok: bool, what: str) -> None:
        self.lines.append(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.ok = False

    @property
    def summary(self) -> str:
        failed = [line[5:] for line in self.lines if line.startswith("FAIL")]
        return "; ".join(failed)[:800] if failed else "all checks passed"


def run_checks(cfg: Config, *, app_only: bool = False) -> CheckResult:
    """The local checks; ``app_only``: those that judge the application, not the boot (units, url,
    required_config: what a configuration change can break), for :func:`wait_app_healthy`."""
    h = cfg.health
    res = CheckResult(True)
    for unit in h.units:
        try:
            proc = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True, timeout=30,
                                  check=False)
            state = proc.stdout.strip() or proc.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            state = f"cannot ask systemd: {e}"
        res.add(state == "active", f"unit {unit}: {state}")
    if h.url:
        res.add(*_http_ok(h.url, lambda s: 200 <= s < 300, "application health"))
    if h.check_data_mount and not app_only:
        mounted = os.path.ismount(cfg.paths.data_mount)
        res.add(mounted, f"{cfg.paths.data_mount} mounted" if mounted else f"{cfg.paths.data_mount} is not mounted")
    if h.required_config:
        _required_config(cfg, res)
    hooks = Path(h.hooks_dir)
    if hooks.is_dir() and not app_only:
        for hook in sorted(hooks.iterdir()):
            if not (RUN_PARTS_NAME.match(hook.name) and hook.is_file() and os.access(hook, os.X_OK)):
                continue
            try:
                proc = subprocess.run([str(hook)], capture_output=True, text=True, errors="replace",
                                      timeout=h.hook_timeout, check=False)
                out = (proc.stdout + proc.stderr).strip()
                res.add(proc.returncode == 0, f"hook {hook.name}: exit {proc.returncode}" + (f": {out[-500:]}" if out else ""))
            except subprocess.TimeoutExpired:
                res.add(False, f"hook {hook.name}: timed out after {h.hook_timeout:.0f}s")
            except OSError as e:
                res.add(False, f"hook {hook.name}: cannot run: {e.strerror}")
    return res


def wait_app_healthy(cfg: Config, sleep: Callable[[float], None] = time.sleep,
                     monotonic: Callable[[], float] = time.monotonic) -> CheckResult:
    """The application checks (:func:`run_checks` ``app_only``), again every ``retry_interval`` until they pass
    or ``[health] config_wait`` has passed: the verdict on a configuration change."""
    deadline = monotonic() + cfg.health.config_wait
    while True:
        res = run_checks(cfg, app_only=True)
        if res.ok or monotonic() + cfg.health.retry_interval > deadline:
            return res
        sleep(cfg.health.retry_interval)


def _required_config(cfg: Config, res: CheckResult) -> None:
    """Each ``[health] required_config`` variable is set in the application's effective environment, and not
    to its placeholder (a release that works only with a value nobody configured must not be committed)."""
    env = devconfig.effective_environment(cfg)
    placeholders = dict(p.partition("=")[::2] for p in cfg.health.config_placeholders)
    for name in cfg.health.required_config:
        value = env.get(name, "")
        if not value:
            res.add(False, f"{name} is missing")
        elif name in placeholders and value == placeholders[name]:
            res.add(False, f"{name} is still the placeholder {value}")
        else:
            res.add(True, f"{name} is set")


def _http_ok(url: str, good: object, what: str) -> tuple[bool, str]:
    assert callable(good)
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return False, f"{what} {url}: {reason}"
    return bool(good(status)), f"{what} {url}: HTTP {status}"


@dataclass
class HealthRun:
    cfg: Config
    sleep: object = time.sleep

    def __post_init__(self) -> None:
        self.env = BootEnv.from_fw_env_config(Path(self.cfg.paths.fw_env_config))
        self.slots = detect(self.cfg)
        self.state = StateStore(self.cfg.state_dir / "state.json")
        self.boot = boot_id(Path(self.cfg.paths.boot_id))

    def server_contact(self) -> bool:
        """The agent of this boot authenticated and completed a poll (``poll.json``, written by the agent)."""
        return bool(read_json(self.cfg.state_dir / "poll.json").get("boot_id") == self.boot)

    def in_trial(self) -> bool:
        env = self.env.read()
        return env.get("upgrade_available") == "1" and env.get("mender_boot_part") == str(self.slots.running)

    def verdict(self) -> int:
        """0: healthy (committed if this was a trial); 1: unhealthy outside a trial; on a failed trial this
        rolls back and reboots."""
        if not self.in_trial():
            res = run_checks(self.cfg)
            if self.cfg.health.check_server and self.cfg.server.url:
                res.lines.append(f"{'ok  ' if self.server_contact() else 'info'} agent polled the server in this boot")
            for line in res.lines:
                log.info("%s", line)
            return 0 if res.ok else 1
        cur = self.state.state.current
        dep_id = cur.id if cur is not None else "local-0"  # a trial armed by hand: no scripts
        runner = ScriptRunner.for_deployment(self.cfg, dep_id)
        log.info("trial boot of slot %s: running health checks (deadline %.0fs)", slot_name(self.slots.running),
                 self.cfg.health.deadline)
        output: list[str] = []
        try:
            output.append(runner.run("ArtifactReboot", "Leave"))
            res = self._checks_until_deadline()
            output.extend(res.lines)
            if res.ok and self.cfg.health.check_server and self.cfg.server.url:
                res = self._server_within_grace()
                output.extend(res.lines)
            if not res.ok:
                return self._fail(dep_id, runner, res.summary, output)
        except ScriptError as e:
            output.append(str(e))
            return self._fail(dep_id, runner, str(e)[:800], output)
        committed = False
        try:
            with runner.state("ArtifactCommit", output.append) as commit:
                commit.enter()
                self.env.update({"upgrade_available": "0", "bootcount": "0"}, fault_point="commit-write")
                committed = True
                log.info("slot %s committed", slot_name(self.slots.running))
                fault("after-commit")
        except ScriptError as e:
            output.append(str(e))
            if not committed:
                return self._fail(dep_id, runner, str(e)[:800], output)
            # after the commit there is no going back: the Leave failure goes into the log
        write_json(self.cfg.state_dir / "health.json", {
            "boot_id": self.boot, "deployment": dep_id, "verdict": "pass", "summary": "all checks passed",
            "output": "\n".join(o for o in output if o), "time": time.time()})
        return 0

    def _checks_until_deadline(self) -> CheckResult:
        deadline = time.monotonic() + self.cfg.health.deadline
        while True:
            res = run_checks(self.cfg)
            if res.ok or time.monotonic() + self.cfg.health.retry_interval > deadline:
                for line in res.lines:
                    (log.info if res.ok else log.warning)("%s", line)
                return res
            log.info("not healthy yet (%s); checking again", res.summary)
            assert callable(self.sleep)
            self.sleep(self.cfg.health.retry_interval)

    def _server_within_grace(self) -> CheckResult:
        """Wait for this boot's agent to complete a poll, up to ``server_grace``; the local checks must still
        pass when it did (the application may have died meanwhile)."""
        grace = self.cfg.health.server_grace
        deadline = time.monotonic() + grace
        waited = False
        while not self.server_contact():
            if time.monotonic() > deadline:
                res = CheckResult(True)
                res.add(False, f"update server: the agent of this slot did not authenticate and complete a poll "
                               f"within {grace:.0f}s")
                return res
            if not waited:
                log.info("local checks passed; waiting up to %.0fs for the agent to reach the update server", grace)
                waited = True
            assert callable(self.sleep)
            self.sleep(min(self.cfg.health.retry_interval, 10.0))
        res = run_checks(self.cfg) if waited else CheckResult(True)
        res.add(True, "update server: the agent of this slot authenticated and completed a poll")
        return res

    def _fail(self, dep_id: str, runner: ScriptRunner, summary: str, output: list[str]) -> int:
        back = other(self.slots.running)
        log.error("trial of slot %s failed: %s; rolling back to slot %s", slot_name(self.slots.running), summary,
                  slot_name(back))
        for state, action in (("ArtifactReboot", "Error"), ("ArtifactRollback", "Enter")):
            try:
                output.append(runner.run(state, action))
            except ScriptError as e:
                output.append(str(e))
        try:  # the verdict for the agent's report; a full /data must not stop the rollback
            write_json(self.cfg.state_dir / "health.json", {
                "boot_id": self.boot, "deployment": dep_id, "verdict": "fail", "summary": summary,
                "output": "\n".join(o for o in output if o), "time": time.time()})
        except OSError as e:
            log.error("the verdict could not be written to /data (%s); rolling back anyway", e.strerror)
        self.env.update({"mender_boot_part": str(back), "upgrade_available": "0", "bootcount": "0"},
                        fault_point="rollback-write")
        for state, action in (("ArtifactRollback", "Leave"), ("ArtifactRollbackReboot", "Enter")):
            try:
                output.append(runner.run(state, action))
            except ScriptError as e:
                log.warning("%s", e)
        subprocess.run(shlex.split(self.cfg.commands.reboot), check=False, timeout=120)
        return 2


#: past deadline + server_grace, the backstop waits this much longer before it reboots a trial
DEADLINE_MARGIN = 300.0


def uptime(path: Path = Path("/proc/uptime")) -> float:
    try:
        return float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def deadline_reached(cfg: Config) -> int:
    """``ota-deadline.timer`` (every minute): a trial boot with no verdict ``deadline + server_grace`` (plus a
    margin) after boot reboots (boot.scr counts the attempt and rolls back)."""
    run = HealthRun(cfg)
    if not run.in_trial():
        return 0
    limit = cfg.health.deadline + cfg.health.server_grace + DEADLINE_MARGIN
    if uptime() < limit:
        return 0
    log.error("trial boot of slot %s reached its deadline without a health verdict: rebooting",
              slot_name(run.slots.running))
    subprocess.run(shlex.split(cfg.commands.reboot), check=False, timeout=120)
    return 1
