"""The update agent: poll the server, install into the inactive slot, arm, reboot, and report honestly.

Nothing the server sends is trusted (DESIGN.md section 6): a deployment is parsed with strict grammars
(:meth:`api.Deployment.from_json`), the artifact's signed name must be the deployment's, its signed security
version must not be below the device's floor (:mod:`.trust`), state scripts come only from this deployment's
verified header, and every path made from server data is checked to stay in the state directory.

The deployment in progress is a typed state (:mod:`.agentstate`) saved on ``/data`` before each step has
effects elsewhere, so a crash or a power cut at any point resumes correctly (:meth:`Agent.recover`, one method
per case):

=============  ==================================================================================
phase          on restart
=============  ==================================================================================
(none)         idle: poll
downloading    same deployment: resume (Range, spool); deployment gone: forget it
installing     the slot is rewritten from the start (it was never armed)
armed          same boot: arm again (idempotent) and reboot; after a reboot: on the new slot in a
               trial, poll the server (the health verdict needs that) and wait for the verdict;
               committed: report ``success``; back on the old slot: report ``failure`` with the
               reason and the failed boot's journal; the arming never landed: arm again
=============  ==================================================================================

No wait is unbounded: a trial that gets no verdict within ``deadline + server_grace`` (plus a margin) is
rebooted by the agent itself, and the bootloader's attempt counter rolls it back.

At about 800 lines this module is over the project's ~600: it is the device's state machine, one method per
transition of the table above on one :class:`Agent`, and reads best in one place. What is not a transition
lives beside it (state: :mod:`.agentstate`; reports: :mod:`.reports`; trust: :mod:`.trust`; the install:
:mod:`.install`; transport: :mod:`.api`, :mod:`.download`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifacts import Verifier
from artifacts.delta import DeltaError
from ota_common.deviceid import IDENTITY_KEY, is_device_id
from ota_common.errors import ArtifactError, BootEnvError, IncompatibleArtifact, OTAError

from . import cfgrelease, devconfig, inventory, journal, slot_rollback, validate
from .agentstate import Current, Phase, Slot, StateStore
from .api import Aborted, BadDeployment, Deployment, DeviceAPI, ServerError, Unauthorized
from .blockindex import SlotIndex, binding_from_record
from .bootenv import BootEnv
from .config import Config
from .download import LinkGone, ResumableDownload, remove_spool
from .faults import fault
from .identity import boot_id, identity_data, identity_json, load_or_create_key
from .install import DELTA, DeviceFacts, arm, stream_install
from .reports import DeploymentLog, Outbox
from .scripts import ScriptError, ScriptRunner, scripts_dir, store_scripts
from .slots import Slots, check_writable_target, detect, slot_name
from .state import read_json, write_json
from .trust import Trust, security_version

log = logging.getLogger("ota-agent")

VERSION = "1.1"
LOCAL_PREFIX = "local-"
MAX_ARM_ATTEMPTS = 3  # boot-state writes that did not land (power cuts) before the deployment fails
TRIAL_MARGIN = 600.0  # seconds past deadline + server_grace before the agent reboots a trial itself


class Rebooting(Exception):
    """The agent asked the system to reboot; the current cycle ends here."""


@dataclass
class Clock:
    """Injected so tests can run the loop without waiting."""

    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic


@dataclass
class Agent:
    cfg: Config
    clock: Clock = field(default_factory=Clock)
    #: makes the server connection (tests inject a fake); default: :meth:`_connect`
    api_factory: Callable[[], DeviceAPI] | None = None

    def __post_init__(self) -> None:
        self.dir = self.cfg.state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(self.dir / "state.json")
        self.env = BootEnv.from_fw_env_config(Path(self.cfg.paths.fw_env_config))
        self.slots: Slots = detect(self.cfg)
        self.boot = boot_id(Path(self.cfg.paths.boot_id))
        self.trust = Trust(self.cfg)
        self.logs = DeploymentLog(self.dir, self.clock.now)
        self.outbox = Outbox(self.store, lambda: self.api, self.logs)
        self._api: DeviceAPI | None = None
        self._verifiers: list[Verifier] | None = None
        self.reboot_command: str | None = self.cfg.commands.reboot
        self._inventory_due = 0.0
        self.configs = cfgrelease.ConfigRelease(self.cfg, self.clock.sleep, self.clock.monotonic)
        self._polled_in = ""
        self._identity: dict[str, str | list[str]] | None = None

    @property
    def state(self) -> Any:
        return self.store.state

    @property
    def current(self) -> Current | None:
        cur: Current | None = self.store.state.current
        return cur

    @property
    def running(self) -> Slot:
        return Slot(self.slots.running)

    # ------------------------------------------------------------------ facts
    @property
    def device_type(self) -> str:
        path = Path(self.cfg.device.device_type_file)
        try:
            text = path.read_text()
        except OSError as e:
            raise OTAError(f"device type file {path}: {e.strerror}") from None
        for line in text.splitlines():  # Mender's format: device_type=<name>; a bare name is accepted
            line = line.strip()
            if line:
                return line.split("=", 1)[1].strip() if line.startswith("device_type=") else line
        raise OTAError(f"device type file {path} is empty")

    def slot_record(self, part: int) -> dict[str, Any]:
        rec = read_json(self.dir / "slots.json").get(str(part), {})
        return rec if isinstance(rec, dict) else {}

    def running_provides(self) -> dict[str, str]:
        """What the running slot is: the record written when it was installed, else the build's own values."""
        rec = self.slot_record(self.slots.running)
        provides = {str(k): str(v) for k, v in (rec.get("provides") or {}).items()}
        if "artifact_name" not in provides and self.cfg.device.artifact_name:
            provides["artifact_name"] = self.cfg.device.artifact_name
        if "rootfs-image.version" not in provides and self.cfg.device.version:
            provides["rootfs-image.version"] = self.cfg.device.version
        return provides

    def facts(self) -> DeviceFacts:
        p = self.running_provides()
        return DeviceFacts(device_type=self.device_type, artifact_name=p.get("artifact_name", ""), provides=p,
                           security_floor=self.trust.floor())

    def verifiers(self) -> list[Verifier]:
        if self._verifiers is None:
            self._verifiers = self.trust.verifiers()
        return self._verifiers

    @property
    def api(self) -> DeviceAPI:
        if self._api is None:
            self._api = self.api_factory() if self.api_factory else self._connect()
        return self._api

    def _connect(self) -> DeviceAPI:
        s = self.cfg.server
        if not s.url:
            raise OTAError("no server url configured ([server] url in ota.conf)")
        key = load_or_create_key(self.dir)
        ident = identity_json(self.identity())
        try:
            return DeviceAPI(s.url, key, ident, s.tenant_token, s.request_timeout, ca_file=s.ca_file,
                             allow_http=s.insecure_http, device_cert=devconfig.device_cert(self.cfg))
        except validate.UntrustedInput as e:
            raise OTAError(f"[server] url: {e} (plain http needs [server] insecure_http = yes)") from None

    def identity(self) -> dict[str, str | list[str]]:
        if self._identity is None:
            self._identity = identity_data(self.cfg.device.identity_command)
        return self._identity

    def device_id(self) -> str | None:
        """The identity's ``device_id`` (the application's ``DEVICE_ID``), None when it has none."""
        value = self.identity().get(IDENTITY_KEY)
        return value if isinstance(value, str) and is_device_id(value) else None

    # ------------------------------------------------------------------ state helpers
    def save(self) -> None:
        self.store.save()

    def dlog(self, dep_id: str, level: str, message: str) -> None:
        """A line in the deployment's log (uploaded on failure) and in the agent's own log."""
        self.logs.write(dep_id, level, message)

    def report(self, dep_id: str, status: str, substate: str = "", *, upload_log: bool = False) -> None:
        if dep_id.startswith(LOCAL_PREFIX):  # ota-agent install: no server to tell
            log.info("local install %s: %s %s", dep_id, status, substate)
            return
        self.outbox.add(dep_id, status, substate, upload_log=upload_log)

    def flush_reports(self) -> None:
        self.outbox.flush()

    def scripts_dir(self, dep_id: str) -> Path:
        return scripts_dir(self.dir, dep_id)

    def scripts(self, dep_id: str) -> ScriptRunner:
        return ScriptRunner.for_deployment(self.cfg, dep_id, self.clock.sleep)

    def spool(self, dep_id: str) -> Path:
        return validate.under(self.dir / "download", f"{validate.deployment_id(dep_id, local_ok=True)}.mender")

    def _clear(self, dep_id: str) -> None:
        """The deployment is over: forget it (its spool and scripts too), remember it as finished."""
        with contextlib.suppress(OSError, validate.UntrustedInput):
            remove_spool(self.spool(dep_id))
        self._remove_scripts(dep_id)
        self.state.finish(dep_id)
        try:
            self.save()
        except OSError as e:  # a full /data: the report still goes out (end), the state follows later
            log.error("agent state not saved (%s)", e.strerror)

    def end(self, dep_id: str, status: str, substate: str = "", *, upload_log: bool = False) -> None:
        """The deployment ended with ``status``: its report is queued and the deployment cleared in one save
        (a power cut between them cannot lose the report), then the report is sent."""
        if dep_id.startswith(LOCAL_PREFIX):  # ota-agent install: no server to tell
            log.info("local install %s: %s %s", dep_id, status, substate)
        else:
            self.outbox.queue(dep_id, status, substate, upload_log=upload_log)
        self._clear(dep_id)
        with contextlib.suppress(OTAError):  # ServerError and Aborted included: the reports stay queued
            self.flush_reports()

    def _remove_scripts(self, dep_id: str) -> None:
        import shutil

        with contextlib.suppress(OSError, validate.UntrustedInput):
            shutil.rmtree(self.scripts_dir(dep_id))

    def _forget_slot(self, part: int) -> None:
        path = self.dir / "slots.json"
        slots = read_json(path)
        if slots.pop(str(part), None) is not None:
            write_json(path, slots)

    def _failure_scripts(self, dep_id: str, *pairs: tuple[str, str]) -> None:
        """Run state scripts of a failure path: only those of a header this deployment verified."""
        cur = self.current
        if cur is None or cur.id != dep_id or not cur.verified:
            return
        runner = self.scripts(dep_id)
        for state, action in pairs:
            try:
                out = runner.run(state, action)
                if out:
                    self.dlog(dep_id, "info", out.rstrip())
            except ScriptError as e:
                self.dlog(dep_id, "error", str(e))

    # ------------------------------------------------------------------ start-up housekeeping
    def startup(self) -> None:
        """Repair what a power cut or a bad medium can leave: one bad boot-state copy is rewritten from the
        good one; with both bad the state is rebuilt for the running slot (boot.scr booted the last committed
        one). Then the floors: revoked keys from the image merged into /data, the security floor raised to the
        running image's when it is committed."""
        try:
            repaired = self.env.repair()
            if repaired:
                log.warning("boot state: %s", repaired)
        except BootEnvError as e:
            log.error("boot state unreadable (%s): rebuilding it for the running slot %s", e, self.running.label)
            self.env.create({"mender_boot_part": str(int(self.running)), "upgrade_available": "0",
                             "bootcount": "0", "bootlimit": "1"})
        env = self.env.read()
        committed = env.get("upgrade_available") != "1" and env.get("mender_boot_part") == str(int(self.running))
        if committed:
            self.env.record_last_good(int(self.running))
            self.trust.raise_floor([security_version(self.running_provides())])
        self.trust.revoked()
        try:  # device.env before any server contact: a first boot has its provisioned values at once
            self.configs.recover()  # a configuration change that a power cut interrupted: resolved first
            devconfig.write_env(self.cfg, self.device_id(), devconfig.load_server_values(self.cfg))
        except (OSError, OTAError) as e:
            log.error("%s not written: %s", self.cfg.paths.device_env, e)
        if self.cfg.device.unsigned:
            log.warning("this image is unsigned: it trusts no release key and refuses every update")
        if self.cfg.server.url.startswith("http://"):
            log.warning("talking to the update server over plain http ([server] insecure_http): lab use only")

    # ------------------------------------------------------------------ recovery after start
    def recover(self) -> None:
        """Bring an interrupted deployment to its next step (see the module docstring)."""
        cur = self.current
        if cur is None:
            return
        if cur.phase in (Phase.DOWNLOADING, Phase.INSTALLING):
            if cur.id.startswith(LOCAL_PREFIX):
                self._recover_local_interrupted(cur)
            else:
                self.dlog(cur.id, "info", f"agent restarted during {cur.phase.value}; the install starts over")
            return
        if cur.boot_id == self.boot:
            self._rearm_same_boot(cur)
        env = self.env.read()
        if self.running == cur.target:
            if env.get("upgrade_available") == "1":
                return  # a trial boot: the verdict decides (run_trial)
            if env.get("mender_boot_part") == str(int(cur.target)):
                self.finish_success(cur)
            # else the verdict failed in this boot and switched back: its reboot is coming (rollback_pending)
            return
        if self._arming_lost(cur, env):
            self._rearm_lost(cur)
        self.finish_rollback(cur, env)

    def rollback_pending(self) -> bool:
        """Still on the trial slot after the verdict switched the boot state back: the reboot is due."""
        cur = self.current
        return bool(cur and cur.phase is Phase.ARMED and self.running == cur.target
                    and self.env.read().get("mender_boot_part") != str(int(cur.target)))

    def await_rollback_reboot(self) -> None:
        """The health verdict reboots after switching back; if that reboot does not come, reboot here."""
        cur = self.current
        assert cur is not None
        self.clock.sleep(180)
        self.dlog(cur.id, "warning", "the rollback reboot did not happen: rebooting")
        self.reboot(cur.id)

    def _recover_local_interrupted(self, cur: Current) -> None:
        self.dlog(cur.id, "warning", f"local install interrupted during {cur.phase.value}; run it again")
        self._clear(cur.id)

    def _rearm_same_boot(self, cur: Current) -> None:
        self.dlog(cur.id, "info", "agent restarted after arming, before the reboot: rebooting now")
        arm(self.env, int(cur.target))
        self.reboot(cur.id)

    def _arming_lost(self, cur: Current, env: dict[str, str]) -> bool:
        """Armed on /data, but the bootloader never tried the target: the boot-state write did not land.
        A tried target leaves ``bootcount`` > 0 (the bootloader counts before it rolls back) or a verdict."""
        if env.get("mender_boot_part") == str(int(cur.target)) or env.get("upgrade_available") == "1":
            return False
        if _int(env.get("bootcount")) != 0 or cur.arm_attempts >= MAX_ARM_ATTEMPTS:
            return False
        return read_json(self.dir / "health.json").get("deployment") != cur.id

    def _rearm_lost(self, cur: Current) -> None:
        self.dlog(cur.id, "warning", "the boot state does not show the arming (power lost while it was written?): "
                                     f"slot {cur.target.label} was verified, arming it again")
        cur.arm_attempts += 1
        cur.boot_id, cur.armed_at = self.boot, self.clock.now()
        self.save()
        arm(self.env, int(cur.target))
        fault("after-arm")
        self.reboot(cur.id)

    # ------------------------------------------------------------------ trial boot
    def in_trial(self) -> bool:
        cur = self.current
        return bool(cur and cur.phase is Phase.ARMED and self.running == cur.target
                    and self.env.read().get("upgrade_available") == "1")

    def trial_poll(self) -> bool:
        """In a trial: authenticate and complete one poll, then leave the proof for the health verdict
        (``poll.json`` with this boot's id). Returns whether it worked."""
        try:
            self.flush_reports()
            self.api.next_deployment(self.device_provides())
        except OTAError as e:  # ServerError, or a deployment refused
            log.info("trial boot: no poll with the server yet (%s)", e)
            return False
        self.note_poll()
        return True

    def check_verdict(self) -> str | None:
        """``committed`` (and reported) when the trial slot was committed, with or without ``health.json`` (it
        may not have been writable); ``failed`` when the verdict switched the boot state back; else None."""
        cur = self.current
        if cur is None:
            return "committed"
        env = self.env.read()
        if env.get("mender_boot_part") != str(int(self.running)):
            return "failed"
        if env.get("upgrade_available") == "0" and self.running == cur.target:
            self.finish_success(cur)
            return "committed"
        return None

    def run_trial(self, *, once: bool = False) -> str:
        """Poll until the verdict, never longer than deadline + server_grace + margin: then reboot (the
        bootloader's attempt counter rolls the trial back). Returns ``committed``, or with ``once`` ``trial``
        (undecided) or ``trial-failed``."""
        h = self.cfg.health
        limit = self.clock.monotonic() + h.deadline + h.server_grace + TRIAL_MARGIN
        polled = False
        while True:
            if not polled:
                polled = self.trial_poll()
            verdict = self.check_verdict()
            if verdict == "committed":
                return verdict
            if verdict == "failed":
                if once:
                    return "trial-failed"
                self.await_rollback_reboot()
            if once:
                return "trial"
            if self.clock.monotonic() > limit:
                cur = self.current
                assert cur is not None
                self.dlog(cur.id, "error", "the trial boot got no health verdict in time: rebooting "
                                           "(the bootloader rolls back)")
                self.reboot(cur.id)
            self.clock.sleep(min(self.cfg.server.retry_interval, 10.0))

    # ------------------------------------------------------------------ endings
    def finish_success(self, cur: Current) -> None:
        self.dlog(cur.id, "info", f"slot {cur.target.label} committed by the health verdict")
        self.env.record_last_good(int(cur.target))
        with contextlib.suppress(IncompatibleArtifact):
            self.trust.raise_floor([security_version(self.slot_record(int(cur.target)).get("provides") or {})])
        self._inventory_due = 0.0  # the new version shows on the server right away
        self.end(cur.id, "success")
        # the slot left behind is final now (not mounted, written again only by an install): its state recorded
        # for an instant rollback (slot_rollback.record_left) after the report, which a read of the whole slot
        # (20-50 s under QEMU) would otherwise hold back; in the same thread, before the next poll, so a rollback
        # that follows at once finds it. A power cut in between leaves no record: that rollback downloads.
        if cur.source != cur.target and (left := slot_rollback.record_left(self, int(cur.source))):
            log.info("%s", left)

    def finish_rollback(self, cur: Current, env: dict[str, str]) -> None:
        verdict = read_json(self.dir / "health.json")
        if verdict.get("deployment") == cur.id and verdict.get("verdict") == "fail":
            reason = f"health check failed on slot {cur.target.label}: {verdict.get('summary', '')}"
        elif _int(env.get("bootcount")) > _int(env.get("bootlimit"), 1):
            reason = (f"slot {cur.target.label} did not reach a health verdict in {env.get('bootlimit')} boot "
                      f"attempt(s) (kernel panic, hang or watchdog reset); the bootloader rolled back")
        else:
            reason = f"slot {cur.target.label} was not booted; the device is still on slot {self.running.label}"
        self.dlog(cur.id, "error", f"rolled back: {reason}")
        if verdict.get("deployment") == cur.id and verdict.get("output"):
            self.dlog(cur.id, "error", "health output:\n" + str(verdict["output"])[-8000:])
        failed_boot = journal.failed_boot_excerpt(Path(self.cfg.paths.journal_dir), cur.armed_at, self.boot)
        if failed_boot:
            self.dlog(cur.id, "error", "journal of the failed boot:\n" + failed_boot)
        self._failure_scripts(cur.id, ("ArtifactRollbackReboot", "Leave"), ("ArtifactFailure", "Enter"),
                              ("ArtifactFailure", "Leave"))
        self._forget_slot(int(cur.target))
        self.end(cur.id, "failure", reason, upload_log=True)

    def _install_failed(self, dep_id: str, e: BaseException) -> str:
        reason = str(e) or type(e).__name__
        self.dlog(dep_id, "error", f"install failed: {reason}; active slot and boot state untouched")
        if isinstance(e, DeltaError):
            self.state.no_delta_for = self.running_provides().get("rootfs-image.checksum", "")
            self._inventory_due = 0.0
            self.dlog(dep_id, "warning", "deltas no longer requested for the running image; a retry gets the "
                                         "full artifact")
        self._failure_scripts(dep_id, ("ArtifactFailure", "Enter"), ("ArtifactFailure", "Leave"))
        if isinstance(e, ArtifactError):  # the kept download is bad or refused: never reuse it
            with contextlib.suppress(OSError, validate.UntrustedInput):
                remove_spool(self.spool(dep_id))
        self.end(dep_id, "failure", reason, upload_log=True)
        return "failure"

    def reboot(self, dep_id: str) -> None:
        self.dlog(dep_id, "info", "rebooting")
        if self.reboot_command is None:
            raise Rebooting()
        cmd = shlex.split(self.reboot_command)
        try:
            subprocess.run(cmd, check=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            log.error("reboot command %s failed: %s", cmd, e)
        raise Rebooting()

    # ------------------------------------------------------------------ the deployment
    def process(self, dep: Deployment) -> str:
        """Install a deployment. Returns the final local status; raises :class:`Rebooting` after arming."""
        if dep.id in self.state.finished and not dep.id.startswith(LOCAL_PREFIX):
            log.warning("deployment %s was already finished on this device: a replay, refused", dep.id)
            return "replayed"
        facts = self.facts()
        if dep.artifact_name and dep.artifact_name == facts.artifact_name:
            self.end(dep.id, "already-installed")
            return "already-installed"
        cur = self.current
        resumed = cur is not None and cur.id == dep.id and cur.phase is not Phase.ARMED
        if cur is not None and not resumed:
            log.warning("deployment %s replaces interrupted deployment %s", dep.id[:8], cur.id[:8])
            self._clear(cur.id)
        if not resumed:
            self._remove_scripts(dep.id)  # only this deployment's verified header may put scripts there
        target = Slot(self.slots.inactive)
        self.state.current = Current(id=dep.id, artifact_name=dep.artifact_name, uri=dep.uri,
                                     phase=Phase.DOWNLOADING, target=target, source=self.running,
                                     allow_downgrade=dep.allow_downgrade,
                                     local_path=str(dep.local_path or ""))
        self.save()
        self.dlog(dep.id, "info", f"deployment of {dep.artifact_name or 'a local artifact'} to slot "
                                  f"{target.label}" + (" (resumed)" if resumed else ""))
        try:
            result = slot_rollback.rearm(self, dep, facts, target)  # the slot still holds it: no download
            if result is None:
                if not dep.rollback_header_uri:  # a rollback that downloads reported it, with the reason
                    self.report(dep.id, "downloading")
                result = self._download_and_install(dep, facts, target)
        except Aborted:
            self.dlog(dep.id, "warning", "deployment aborted by the server; the boot state is untouched")
            self._clear(dep.id)
            return "aborted"
        except (OSError, OTAError) as e:  # an artifact refused, a download failed (DownloadError), a script
            return self._install_failed(dep.id, e)
        except Exception as e:  # noqa: BLE001 - input nothing foresaw: a failure reported, not a crash loop
            log.exception("install of %s failed unexpectedly", dep.id)
            return self._install_failed(dep.id, e)
        # ---- the last point where an abort is honoured: "rebooting" goes out before the boot state changes
        try:
            self.report(dep.id, "rebooting")
        except Aborted:
            self.dlog(dep.id, "warning", "deployment aborted by the server before the reboot; boot state untouched")
            self._forget_slot(int(target))
            self._clear(dep.id)
            return "aborted"
        # ---- ArtifactReboot_Enter decides before anything is armed: a refusal leaves nothing to undo
        runner = self.scripts(dep.id)
        try:
            out = runner.run("ArtifactReboot", "Enter")
        except ScriptError as e:
            self.dlog(dep.id, "error", str(e))
            err = runner.run("ArtifactReboot", "Error")
            if err:
                self.dlog(dep.id, "info", err.rstrip())
            self._forget_slot(int(target))
            return self._install_failed(dep.id, e)
        if out:
            self.dlog(dep.id, "info", out.rstrip())
        # ---- arm: the state says "armed" before the boot env does, so a restart re-arms rather than re-installs
        cur = self.current
        assert cur is not None
        cur.phase, cur.boot_id, cur.armed_at = Phase.ARMED, self.boot, self.clock.now()
        self.save()
        fault("before-arm")
        arm(self.env, int(target))
        self.dlog(dep.id, "info", f"boot state armed: next boot tries slot {target.label} "
                                  f"({result.size} bytes: {result.write_summary()}; streamed in "
                                  f"{result.write_seconds:.1f}s and read back in {result.verify_seconds:.1f}s)")
        fault("after-arm")
        self.reboot(dep.id)
        raise AssertionError("unreachable")

    def _download_and_install(self, dep: Deployment, facts: DeviceFacts, target: Slot) -> Any:
        dev = check_writable_target(self.slots, int(target))
        spool = self.spool(dep.id)
        spool.parent.mkdir(exist_ok=True)
        for stale in spool.parent.glob("*.mender"):
            if stale.name != spool.name:
                remove_spool(stale)

        def refresh() -> str | None:
            try:
                fresh = self.api.next_deployment(self.device_provides())
            except ServerError:
                return None
            if fresh is None or fresh.id != dep.id:
                return None
            return fresh.uri

        def note(out: str) -> None:
            self.dlog(dep.id, "info", out)

        with self.scripts(dep.id).state("ArtifactInstall", note) as install:

            def on_header(header: Any, provides: dict[str, str]) -> None:
                name = header.info.artifact_name
                if dep.artifact_name and name != dep.artifact_name:
                    raise IncompatibleArtifact(f"artifact name mismatch: the deployment is for "
                                               f"{dep.artifact_name!r}, the signed artifact is {name!r}")
                cur = self.current
                assert cur is not None
                store_scripts(self.scripts_dir(dep.id), header.scripts)
                # the slot is about to change: no record may vouch for it until the new one (an interrupted
                # install must never leave a record that an instant rollback trusts)
                self._forget_slot(int(target))
                cur.phase, cur.verified = Phase.INSTALLING, True
                self.save()
                self.dlog(dep.id, "info", f"signature verified; {name} (version "
                                          f"{provides.get('rootfs-image.version', '?')}) fits this device")
                self.report(dep.id, "installing")
                install.enter()

            index = self.slot_index(int(target))
            result, resumes = self._stream(dep, facts, dev, spool, refresh, on_header, index)
            if resumes:
                self.dlog(dep.id, "info", f"download resumed {resumes} time(s) with HTTP Range")
            remove_spool(spool)  # installed and verified: free /data
        self.dlog(dep.id, "info", f"slot {target.label} written and read back: {result.write_summary()}"
                                  + (f"; {result.index_note}" if result.index_note else ""))
        slots = read_json(self.dir / "slots.json")
        slots[str(int(target))] = {"artifact_name": result.artifact_name, "provides": result.provides,
                                   "size": result.size, "installed_at": self.clock.now(),
                                   **({"blockindex": result.index_generation} if result.index_generation else {})}
        write_json(self.dir / "slots.json", slots)
        return result

    def slot_index(self, part: int) -> SlotIndex:
        """The block index of slot ``part`` (:mod:`.blockindex`), bound to what its record says it holds."""
        return SlotIndex(self.dir, slot_name(part), binding_from_record(self.slot_record(part)),
                         enabled=self.cfg.install.block_index)

    def _stream(self, dep: Deployment, facts: DeviceFacts, dev: Path, spool: Path,
                refresh: Callable[[], str | None], on_header: Callable[[Any, dict[str, str]], None],
                index: SlotIndex | None = None) -> tuple[Any, int]:
        active = self.slots.device(self.slots.running)
        if dep.local_path is not None:
            with open(dep.local_path, "rb") as f:
                result = stream_install(f, verifiers=self.verifiers(), device=facts, target=dev,
                                        allow_downgrade=dep.allow_downgrade, source_size=os.fstat(f.fileno()).st_size,
                                        on_header=on_header, active=active, index=index)
            return result, 0
        resumes = 0
        for attempt in (1, 2):
            dl = ResumableDownload(dep.uri, session=self.api.session, refresh_url=refresh, spool=spool,
                                   retry_timeout=self.cfg.server.download_retry_timeout,
                                   timeout=self.cfg.server.request_timeout, sleep=self.clock.sleep)
            try:
                size = dl.start()
                fault("download-started")
                self.dlog(dep.id, "info", f"downloading {size} bytes" + (f", {dl.kept} kept from before" if dl.kept else ""))
                result = stream_install(dl, verifiers=self.verifiers(), device=facts, target=dev,
                                        allow_downgrade=dep.allow_downgrade, source_size=size,
                                        on_header=on_header, active=active, index=index)
                resumes += dl.resumes
                return result, resumes
            except LinkGone as e:
                raise Aborted(str(e)) from None
            except ArtifactError as e:
                if not dl.kept or attempt == 2 or isinstance(e, IncompatibleArtifact):
                    raise
                # the bytes kept from before are the only suspect: fetch everything again, once
                self.dlog(dep.id, "warning", f"install from the kept download failed ({e}); "
                                             "downloading the whole artifact again")
                dl.discard_spool()
            finally:
                dl.close()
        raise AssertionError("unreachable")

    def deltas_work(self, running: dict[str, str]) -> bool:
        """False once a delta failed on the running image (``running``: its provides; changed in place): from
        then on this image asks for full artifacts, or every retry of the deployment would get the same
        delta."""
        return bool(self.state.no_delta_for != running.get("rootfs-image.checksum"))

    # ------------------------------------------------------------------ polling
    def device_provides(self) -> dict[str, str]:
        p = self.running_provides()
        out = {"device_type": self.device_type, "artifact_name": p.get("artifact_name", "")}
        for k, v in p.items():
            if k != "artifact_name":
                out[k] = v
        return out

    def inventory(self) -> dict[str, Any]:
        p = self.running_provides()
        base: dict[str, Any] = {
            "artifact_name": p.get("artifact_name", ""),
            "rootfs-image.version": p.get("rootfs-image.version", ""),
            "device_type": self.device_type,
            "ota_slot": self.running.label,
            "agent_version": VERSION,
            # payload types this agent installs (the server offers a delta only to a device that lists it)
            "update_modules": ["rootfs-image", DELTA] if self.deltas_work(p) else ["rootfs-image"],
            "security_floor": self.trust.floor(),
        }
        base.update(self.configs.inventory())  # config_hash, config_status, config_refused(_hash)
        if self.cfg.device.unsigned:
            base["unsigned_image"] = "yes: refuses every update"
        with contextlib.suppress(OTAError):
            base.update(devconfig.inventory_attributes(self.cfg, self.device_id()))
        return inventory.collect(self.cfg, p, base)

    def send_inventory(self, now: float, *, sync: bool = True) -> None:
        """Fetch and apply the configuration (:mod:`.cfgrelease`: checked, reverted when the application fails
        with it), then send the inventory, which says what was applied or refused."""
        if sync:
            try:
                self.configs.sync(self.api, self.device_id())
            except (ServerError, OSError) as e:
                log.warning("configuration not updated: %s", e)
        try:
            self.api.send_inventory(self.inventory())
        except Unauthorized:
            raise
        except ServerError as e:  # an inventory the server refuses must not stop the deployments
            log.warning("inventory not taken: %s", e)
        # in memory: every start (a reboot into a new slot) reports at once
        self._inventory_due = now + self.cfg.server.inventory_interval

    def cycle(self) -> str:
        """One poll: reports, inventory and configuration when due, then the next deployment; a configuration
        the poll's answer announces (``X-VV-Config-Hash``) is fetched and reported at once."""
        if not self.cfg.server.url:
            return "no-server"
        self.flush_reports()
        now = self.clock.now()
        if now >= self._inventory_due:
            self.send_inventory(now)
        try:
            dep = self.api.next_deployment(self.device_provides())
        except BadDeployment as e:
            log.error("%s", e)
            if e.deployment_id and e.deployment_id not in self.state.finished:
                self.end(e.deployment_id, "failure", str(e))
            return "refused"
        self.note_poll()
        if todo := self.configs.on_poll(self.api.config_hash):
            self.send_inventory(now, sync=todo == "fetch")
        cur = self.current
        if (cur is not None and cur.phase is not Phase.ARMED and not cur.id.startswith(LOCAL_PREFIX)
                and (dep is None or dep.id != cur.id)):
            self.dlog(cur.id, "warning", f"the server no longer offers this deployment (during {cur.phase.value}): "
                                         "forgotten; active slot and boot state untouched")
            self.end(cur.id, "failure", "deployment withdrawn by the server before it was installed")
        if dep is None:
            return "idle"
        return self.process(dep)

    def note_poll(self) -> None:
        """This boot's agent authenticated and completed a poll: the proof the health verdict waits for
        (``poll.json``, written once per boot)."""
        if self._polled_in != self.boot:
            write_json(self.dir / "poll.json", {"boot_id": self.boot, "time": self.clock.now(),
                                                "deployment": self.current.id if self.current else ""})
            self._polled_in = self.boot

    def run(self, *, once: bool = False) -> str:
        """The daemon loop (``once``: a single poll, for ``ota-agent check-update`` and tests). Errors of the
        medium or the boot state are logged and retried; nothing here ends the process but a reboot."""
        backoff = min(self.cfg.server.retry_interval, self.cfg.server.poll_interval)
        while True:
            try:
                self.startup()
                self.recover()
                if self.rollback_pending():
                    if once:
                        return "trial-failed"
                    self.await_rollback_reboot()
                if self.in_trial():
                    result = self.run_trial(once=once)
                    if result != "committed":
                        return result
                    continue
                break
            except Rebooting:
                return self._rebooting(once)
            except (OSError, BootEnvError, OTAError) as e:
                log.error("cannot start a cycle: %s; retrying", e)
                if once:
                    return "error"
                self.clock.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self.cfg.server.poll_interval)
        backoff = min(self.cfg.server.retry_interval, self.cfg.server.poll_interval)
        while True:
            try:
                result = self.cycle()
                backoff = min(self.cfg.server.retry_interval, self.cfg.server.poll_interval)
                wait = self.cfg.server.poll_interval
            except Rebooting:
                return self._rebooting(once)
            except Unauthorized as e:
                log.info("not authorised yet (%s); retrying", e)
                result, wait = "unauthorized", backoff
                backoff = min(backoff * 2, self.cfg.server.poll_interval)
            except ServerError as e:
                log.warning("server: %s", e)
                result, wait = "offline", backoff
                backoff = min(backoff * 2, self.cfg.server.poll_interval)
            except (OSError, BootEnvError, OTAError) as e:  # a full /data, a bad medium: keep going
                log.error("cycle failed: %s", e)
                result, wait = "error", backoff
                backoff = min(backoff * 2, self.cfg.server.poll_interval)
            except Exception:  # a bug, or input nothing above foresaw: logged, never a crash loop
                log.exception("cycle failed unexpectedly")
                result, wait = "error", backoff
                backoff = min(backoff * 2, self.cfg.server.poll_interval)
            if once:
                return result
            self.clock.sleep(wait * random.uniform(0.8, 1.2))

    def _rebooting(self, once: bool) -> str:
        if once:
            return "rebooting"
        while True:  # the system is going down
            self.clock.sleep(60)

    # ------------------------------------------------------------------ without a server
    def install_local(self, source: str, *, allow_downgrade: bool = False, reboot: bool = False) -> str:
        """``ota-agent install``: the same verified streaming install from a file or an https URL, no
        reports."""
        self.startup()
        if self.current is not None:
            raise OTAError(f"a deployment is in progress (phase {self.current.phase.value}); finish it first")
        dep_id = f"{LOCAL_PREFIX}{time.time_ns()}"
        if "://" in source:
            try:
                uri = validate.url(source, what="artifact URL", allow_http=self.cfg.server.insecure_http)
            except validate.UntrustedInput as e:
                raise OTAError(str(e)) from None
            dep = Deployment(id=dep_id, artifact_name="", uri=uri, device_types=(), allow_downgrade=allow_downgrade)
        else:
            path = Path(source).resolve()
            if not path.is_file():
                raise OTAError(f"artifact not found (or not a regular file): {source}")
            dep = Deployment(id=dep_id, artifact_name="", uri="", device_types=(), allow_downgrade=allow_downgrade,
                             local_path=path)
        if not reboot:
            self.reboot_command = None
        try:
            return self.process(dep)
        except Rebooting:
            return "armed; rebooting" if reboot else "armed: reboot to try the new slot"

    def show(self) -> dict[str, Any]:
        return {"boot_env": self.env.read(), "running_slot": self.running.label,
                "trial": self.slots.trial, "provides": self.running_provides(), "state": self.state.to_json(),
                "slots": read_json(self.dir / "slots.json"), "security_floor": self.trust.floor()}


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value or default)
    except ValueError:
        return default


__all__ = ["Agent", "Clock", "Rebooting"]

