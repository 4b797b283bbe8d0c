"""The update agent: poll the server, install into the inactive slot, arm, reboot, and report honestly.

Every step persists its phase in ``<state_dir>/state.json`` before it has effects elsewhere, so a crash or a
power cut at any point resumes correctly (see :meth:`Agent.recover`):

=============  ==================================================================================
phase          on restart
=============  ==================================================================================
(none)         idle: poll
downloading    same deployment: resume (Range, spool); deployment gone: forget it
installing     the slot is rewritten from the start (it was never armed)
armed          same boot: arm again (idempotent) and reboot; after a reboot: on the new slot in a
               trial, wait for the health verdict; committed: report ``success``; back on the old
               slot: report ``failure`` with the reason and the failed boot's journal
=============  ==================================================================================

Status reports go through an outbox in the same state file: a report is kept until the server took it
(204) or said the deployment was aborted (409), so none is lost to a network drop or a reboot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shlex
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifacts import Verifier, load_verifiers
from ota_common.errors import ArtifactError, DownloadError, IncompatibleArtifact, OTAError

from . import journal
from .api import Aborted, Deployment, DeviceAPI, ServerError, Unauthorized
from .bootenv import BootEnv
from .config import Config
from .download import LinkGone, ResumableDownload, remove_spool
from .faults import fault
from .identity import boot_id, identity_data, identity_json, load_or_create_key
from .install import DELTA, DeviceFacts, arm, stream_install
from .scripts import ScriptError, ScriptRunner, store_scripts
from .slots import Slots, check_writable_target, detect, other, slot_name
from .state import StateFile, atomic_write, read_json, write_json

log = logging.getLogger("ota-agent")

VERSION = "1.0"
LOCAL_PREFIX = "local-"
MAX_ARM_ATTEMPTS = 3  # boot-state writes that did not land (power cuts) before the deployment fails


class Rebooting(Exception):
    """The agent asked the system to reboot; the current cycle ends here."""


@dataclass
class Clock:
    """Injected so tests can run the loop without waiting."""

    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], float] = time.time


@dataclass
class Agent:
    cfg: Config
    clock: Clock = field(default_factory=Clock)

    def __post_init__(self) -> None:
        self.dir = self.cfg.state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = StateFile(self.dir / "state.json")
        self.env = BootEnv.from_fw_env_config(Path(self.cfg.paths.fw_env_config))
        self.slots: Slots = detect(self.cfg)
        self.boot = boot_id(Path(self.cfg.paths.boot_id))
        self._api: DeviceAPI | None = None
        self._verifiers: list[Verifier] | None = None
        self.reboot_command: str | None = self.cfg.commands.reboot
        self._inventory_due = 0.0

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
        rec: dict[str, Any] = read_json(self.dir / "slots.json").get(str(part), {})
        return rec

    def running_provides(self) -> dict[str, str]:
        """What the running slot is: the record written when it was installed, else the build's own values."""
        rec = self.slot_record(self.slots.running)
        provides = {k: str(v) for k, v in rec.get("provides", {}).items()}
        if "artifact_name" not in provides and self.cfg.device.artifact_name:
            provides["artifact_name"] = self.cfg.device.artifact_name
        if "rootfs-image.version" not in provides and self.cfg.device.version:
            provides["rootfs-image.version"] = self.cfg.device.version
        return provides

    def facts(self) -> DeviceFacts:
        p = self.running_provides()
        return DeviceFacts(device_type=self.device_type, artifact_name=p.get("artifact_name", ""), provides=p)

    def verifiers(self) -> list[Verifier]:
        if self._verifiers is None:
            d = Path(self.cfg.paths.trusted_keys)
            keys = sorted(p for p in d.glob("*.pem")) if d.is_dir() else []
            self._verifiers = list(load_verifiers(keys))
        return self._verifiers

    @property
    def api(self) -> DeviceAPI:
        if self._api is None:
            if not self.cfg.server.url:
                raise OTAError("no server url configured ([server] url in ota.conf)")
            key = load_or_create_key(self.dir)
            ident = identity_json(identity_data(self.cfg.device.identity_command))
            self._api = DeviceAPI(self.cfg.server.url, key, ident, self.cfg.server.tenant_token,
                                  self.cfg.server.request_timeout)
        return self._api

    # ------------------------------------------------------------------ deployment log
    def _log_path(self, dep_id: str) -> Path:
        return self.dir / "logs" / f"{dep_id}.jsonl"

    def dlog(self, dep_id: str, level: str, message: str) -> None:
        """A line in the deployment's log (uploaded on failure) and in the agent's own log."""
        getattr(log, level if level in ("info", "warning", "error") else "info")("[%s] %s", dep_id[:8], message)
        path = self._log_path(dep_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock.now())),
                           "level": level, "message": message})
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def log_messages(self, dep_id: str) -> list[dict[str, str]]:
        try:
            lines = self._log_path(dep_id).read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    # ------------------------------------------------------------------ reports (outbox)
    def report(self, dep_id: str, status: str, substate: str = "", *, upload_log: bool = False) -> None:
        if dep_id.startswith(LOCAL_PREFIX):  # ota-agent install: no server to tell
            log.info("local install %s: %s %s", dep_id, status, substate)
            return
        outbox = list(self.state.get("outbox", []))
        outbox.append({"deployment": dep_id, "status": status, "substate": substate, "log": upload_log})
        self.state.update(outbox=outbox)
        self.flush_reports()

    def flush_reports(self) -> None:
        """Send queued reports in order. An aborted deployment raises :class:`Aborted` after dropping its
        reports; a network error leaves them queued."""
        while True:
            outbox = list(self.state.get("outbox", []))
            if not outbox:
                return
            item = outbox[0]
            try:
                if item.get("log"):
                    messages = self.log_messages(item["deployment"]) or [
                        {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": "error",
                         "message": item.get("substate") or "failure"}]
                    self.api.upload_log(item["deployment"], messages)
                self.api.report_status(item["deployment"], item["status"], item.get("substate", ""))
            except Aborted:
                rest = [o for o in outbox if o["deployment"] != item["deployment"]]
                self.state.update(outbox=rest)
                raise
            except Unauthorized:
                self.api.authenticate()
                continue
            except (ServerError, OTAError) as e:
                log.warning("status report %s for %s queued: %s", item["status"], item["deployment"][:8], e)
                return
            self.state.update(outbox=outbox[1:])

    # ------------------------------------------------------------------ recovery after start
    def recover(self) -> None:
        """Bring an interrupted deployment to its next step (see the module docstring)."""
        phase = self.state.get("phase")
        dep = self.state.get("deployment")
        if phase is None or dep is None:
            return
        dep_id = dep["id"]
        if phase in ("downloading", "installing") and dep_id.startswith(LOCAL_PREFIX):
            self.dlog(dep_id, "warning", f"local install interrupted during {phase}; run it again")
            self._clear(dep_id)
            return
        if phase in ("downloading", "installing"):
            self.dlog(dep_id, "info", f"agent restarted during {phase}; the install starts over")
            return  # the poll loop resumes it (same deployment) or forgets it
        if phase == "armed":
            target = int(self.state.get("target_part"))
            if self.state.get("boot_id") == self.boot:
                self.dlog(dep_id, "info", "agent restarted after arming, before the reboot: rebooting now")
                arm(self.env, target)
                self.reboot(dep_id)
            env = self.env.read()
            if self.slots.running == target:
                if env.get("upgrade_available") == "1":
                    return  # trial boot: the health verdict decides (wait_for_verdict)
                if env.get("mender_boot_part") == str(target):
                    self.finish_success(dep_id)
                    return
            elif self._arming_lost(dep_id, env, target):
                attempts = int(self.state.get("arm_attempts", 0)) + 1
                self.dlog(dep_id, "warning", "the boot state does not show the arming (power lost while it was "
                                             f"written?): slot {slot_name(target)} was verified, arming it again")
                self.state.update(arm_attempts=attempts, boot_id=self.boot, armed_at=self.clock.now())
                arm(self.env, target)
                fault("after-arm")
                self.reboot(dep_id)
            self.finish_rollback(dep_id, env)

    def _arming_lost(self, dep_id: str, env: dict[str, str], target: int) -> bool:
        """Armed on /data, but the bootloader never tried the target: the boot-state write did not land.
        A tried target leaves ``bootcount`` > 0 (the bootloader counts before it rolls back) or a verdict."""
        if env.get("mender_boot_part") == str(target) or env.get("upgrade_available") == "1":
            return False
        if int(env.get("bootcount", "0") or 0) != 0 or int(self.state.get("arm_attempts", 0)) >= MAX_ARM_ATTEMPTS:
            return False
        verdict = read_json(self.dir / "health.json")
        return verdict.get("deployment") != dep_id

    def wait_for_verdict(self, timeout: float) -> bool:
        """In a trial boot, wait until the health unit committed (True) or gave up (False, it reboots)."""
        deadline = self.clock.now() + timeout
        dep_id = self.state.get("deployment", {}).get("id", "")
        while self.clock.now() < deadline:
            verdict = read_json(self.dir / "health.json")
            if verdict.get("boot_id") == self.boot and verdict.get("deployment") == dep_id:
                if verdict.get("verdict") == "pass" and self.env.read().get("upgrade_available") == "0":
                    self.finish_success(dep_id)
                    return True
                if verdict.get("verdict") == "fail":
                    return False
            self.clock.sleep(2.0)
        return False

    def finish_success(self, dep_id: str) -> None:
        target = int(self.state.get("target_part"))
        self.dlog(dep_id, "info", f"slot {slot_name(target)} committed by the health verdict")
        self.state.update(phase="committed")
        self._clear(dep_id)
        self._inventory_due = 0.0  # the new version shows on the server right away
        self.report(dep_id, "success")

    def finish_rollback(self, dep_id: str, env: dict[str, str]) -> None:
        target = int(self.state.get("target_part"))
        verdict = read_json(self.dir / "health.json")
        if verdict.get("deployment") == dep_id and verdict.get("verdict") == "fail":
            reason = f"health check failed on slot {slot_name(target)}: {verdict.get('summary', '')}"
        elif int(env.get("bootcount", "0") or 0) > int(env.get("bootlimit", "1") or 1):
            reason = (f"slot {slot_name(target)} did not reach a health verdict in {env.get('bootlimit')} boot "
                      f"attempt(s) (kernel panic, hang or watchdog reset); the bootloader rolled back")
        else:
            reason = f"slot {slot_name(target)} was not booted; the device is still on slot {slot_name(self.slots.running)}"
        self.dlog(dep_id, "error", f"rolled back: {reason}")
        if verdict.get("deployment") == dep_id and verdict.get("output"):
            self.dlog(dep_id, "error", "health output:\n" + str(verdict["output"])[-8000:])
        since = float(self.state.get("armed_at", 0))
        failed_boot = journal.failed_boot_excerpt(Path(self.cfg.paths.journal_dir), since, self.boot)
        if failed_boot:
            self.dlog(dep_id, "error", "journal of the failed boot:\n" + failed_boot)
        runner = self.scripts(dep_id)
        for state, action in (("ArtifactRollbackReboot", "Leave"), ("ArtifactFailure", "Enter"),
                              ("ArtifactFailure", "Leave")):
            try:
                out = runner.run(state, action)
                if out:
                    self.dlog(dep_id, "info", out)
            except ScriptError as e:
                self.dlog(dep_id, "error", str(e))
        self._forget_slot(target)
        self._clear(dep_id)
        self.report(dep_id, "failure", reason[:900], upload_log=True)

    def _forget_slot(self, part: int) -> None:
        path = self.dir / "slots.json"
        slots = read_json(path)
        if slots.pop(str(part), None) is not None:
            write_json(path, slots)

    def _clear(self, dep_id: str) -> None:
        remove_spool(self.dir / "download" / f"{dep_id}.mender")
        for key in ("phase", "deployment", "target_part", "from_part", "boot_id", "armed_at", "arm_attempts"):
            self.state.data.pop(key, None)
        self.state.data["last_deployment"] = dep_id
        self.state.save()

    def scripts(self, dep_id: str) -> ScriptRunner:
        return ScriptRunner.for_deployment(self.cfg, dep_id, self.clock.sleep)

    # ------------------------------------------------------------------ the deployment
    def process(self, dep: Deployment) -> str:
        """Install a deployment. Returns the final local status; raises :class:`Rebooting` after arming."""
        facts = self.facts()
        if dep.artifact_name == facts.artifact_name:
            self.report(dep.id, "already-installed")
            return "already-installed"
        resumed = (self.state.get("deployment") or {}).get("id") == dep.id
        if not resumed and self.state.get("phase") is not None:
            old = self.state.get("deployment", {}).get("id", "?")
            log.warning("deployment %s replaces interrupted deployment %s", dep.id[:8], old[:8])
            self._clear(old)
        target = self.slots.inactive
        self.state.update(deployment={"id": dep.id, "artifact_name": dep.artifact_name, "uri": dep.uri,
                                      "allow_downgrade": dep.allow_downgrade},
                          phase="downloading", target_part=target, from_part=self.slots.running)
        self.dlog(dep.id, "info", f"deployment of {dep.artifact_name} to slot {slot_name(target)}"
                                  + (" (resumed)" if resumed else ""))
        try:
            self.report(dep.id, "downloading")
            result = self._download_and_install(dep, facts, target)
        except Aborted:
            self.dlog(dep.id, "warning", "deployment aborted by the server; the boot state is untouched")
            self._clear(dep.id)
            return "aborted"
        except (ArtifactError, DownloadError, ScriptError, OSError, OTAError) as e:
            return self._install_failed(dep.id, e)
        # ---- the last point where an abort is honoured: "rebooting" goes out before the boot state changes
        try:
            self.report(dep.id, "rebooting")
        except Aborted:
            self.dlog(dep.id, "warning", "deployment aborted by the server before the reboot; boot state untouched")
            self._forget_slot(target)
            self._clear(dep.id)
            return "aborted"
        # ---- arm: the state says "armed" before the boot env does, so a restart re-arms rather than re-installs
        self.state.update(phase="armed", boot_id=self.boot, armed_at=self.clock.now())
        fault("before-arm")
        runner = self.scripts(dep.id)
        try:
            runner.run("ArtifactReboot", "Enter")
        except ScriptError as e:
            runner.run("ArtifactReboot", "Error")
            self._forget_slot(target)
            return self._install_failed(dep.id, e)
        arm(self.env, target)
        self.dlog(dep.id, "info", f"boot state armed: next boot tries slot {slot_name(target)} "
                                  f"({result.size} bytes, {result.zeroed} of them as zero ranges, streamed in "
                                  f"{result.write_seconds:.1f}s and read back in {result.verify_seconds:.1f}s)")
        fault("after-arm")
        self.reboot(dep.id)
        raise AssertionError("unreachable")

    def _download_and_install(self, dep: Deployment, facts: DeviceFacts, target: int) -> Any:
        dev = check_writable_target(self.slots, target)
        spool_dir = self.dir / "download"
        spool_dir.mkdir(exist_ok=True)
        for stale in spool_dir.glob("*.mender"):
            if stale.name != f"{dep.id}.mender":
                remove_spool(stale)

        def refresh() -> str | None:
            try:
                fresh = self.api.next_deployment(self.device_provides())
            except ServerError:
                return None
            if fresh is None or fresh.id != dep.id:
                return None
            return fresh.uri

        runner: ScriptRunner | None = None

        def on_header(header: Any, provides: dict[str, str]) -> None:
            nonlocal runner
            store_scripts(self.dir / "scripts" / dep.id, header.scripts)
            runner = self.scripts(dep.id)
            self.dlog(dep.id, "info", f"signature verified; {header.info.artifact_name} "
                                      f"(version {provides.get('rootfs-image.version', '?')}) fits this device")
            self.state.update(phase="installing")
            self.report(dep.id, "installing")
            out = runner.run("ArtifactInstall", "Enter")
            if out:
                self.dlog(dep.id, "info", out)

        try:
            result, resumes = self._stream(dep, facts, dev, spool_dir, refresh, on_header)
        except ScriptError:
            if runner is not None:
                runner.run("ArtifactInstall", "Error")
            raise
        if resumes:
            self.dlog(dep.id, "info", f"download resumed {resumes} time(s) with HTTP Range")
        remove_spool(spool_dir / f"{dep.id}.mender")  # installed and verified: free /data
        assert runner is not None
        try:
            out = runner.run("ArtifactInstall", "Leave")
        except ScriptError:
            runner.run("ArtifactInstall", "Error")
            raise
        if out:
            self.dlog(dep.id, "info", out)
        slots = read_json(self.dir / "slots.json")
        slots[str(target)] = {"artifact_name": result.artifact_name, "provides": result.provides,
                              "installed_at": self.clock.now()}
        write_json(self.dir / "slots.json", slots)
        return result

    def _stream(self, dep: Deployment, facts: DeviceFacts, dev: Path, spool_dir: Path,
                refresh: Callable[[], str | None], on_header: Callable[[Any, dict[str, str]], None]) -> tuple[Any, int]:
        if dep.uri.startswith("file://"):
            path = Path(urllib.parse.unquote(urllib.parse.urlparse(dep.uri).path))
            with open(path, "rb") as f:
                result = stream_install(f, verifiers=self.verifiers(), device=facts, target=dev,
                                        allow_downgrade=dep.allow_downgrade, source_size=os.fstat(f.fileno()).st_size,
                                        on_header=on_header, active=self.slots.device(self.slots.running))
            resumes = 0
        else:
            resumes = 0
            for attempt in (1, 2):
                dl = ResumableDownload(dep.uri, session=self.api.session, refresh_url=refresh,
                                       spool=spool_dir / f"{dep.id}.mender",
                                       retry_timeout=self.cfg.server.download_retry_timeout,
                                       timeout=self.cfg.server.request_timeout, sleep=self.clock.sleep)
                try:
                    size = dl.start()
                    fault("download-started")
                    self.dlog(dep.id, "info", f"downloading {size} bytes"
                              + (f", {dl.kept} kept from before" if dl.kept else ""))
                    result = stream_install(dl, verifiers=self.verifiers(), device=facts, target=dev,
                                            allow_downgrade=dep.allow_downgrade, source_size=size,
                                            on_header=on_header, active=self.slots.device(self.slots.running))
                    resumes += dl.resumes
                    break
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
        return result, resumes

    def deltas_work(self, running: dict[str, str]) -> bool:
        """False once a delta failed on the running image (``running``: its provides; changed in place): from
        then on this image asks for full artifacts, or every retry of the deployment would get the same
        delta."""
        return bool(self.state.get("no_delta_for") != running.get("rootfs-image.checksum"))

    def _install_failed(self, dep_id: str, e: BaseException) -> str:
        reason = str(e) or type(e).__name__
        self.dlog(dep_id, "error", f"install failed: {reason}; active slot and boot state untouched")
        if type(e).__name__ == "DeltaError":  # artifacts.delta, not imported unless a delta was installed
            self.state.update(no_delta_for=self.running_provides().get("rootfs-image.checksum"))
            self._inventory_due = 0.0
            self.dlog(dep_id, "warning", "deltas no longer requested for the running image; a retry gets the "
                                         "full artifact")
        runner = self.scripts(dep_id)
        for state, action in (("ArtifactFailure", "Enter"), ("ArtifactFailure", "Leave")):
            try:
                runner.run(state, action)
            except ScriptError as se:
                self.dlog(dep_id, "error", str(se))
        if isinstance(e, ArtifactError):  # the kept download is bad or refused: never reuse it
            remove_spool(self.dir / "download" / f"{dep_id}.mender")
        self._clear(dep_id)
        with contextlib.suppress(Aborted):
            self.report(dep_id, "failure", reason[:900], upload_log=True)
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
        st = os.statvfs(self.cfg.paths.data_mount) if os.path.isdir(self.cfg.paths.data_mount) else None
        inv: dict[str, Any] = {
            "artifact_name": p.get("artifact_name", ""),
            "rootfs-image.version": p.get("rootfs-image.version", ""),
            "device_type": self.device_type,
            "kernel": os.uname().release,
            "hostname": socket.gethostname(),
            "ota_slot": slot_name(self.slots.running),
            "agent_version": VERSION,
            # payload types this agent installs (the server offers a delta only to a device that lists it)
            "update_modules": ["rootfs-image", DELTA] if self.deltas_work(p) else ["rootfs-image"],
        }
        if "rootfs-image.checksum" in p:
            inv["rootfs-image.checksum"] = p["rootfs-image.checksum"]
        if st is not None:
            inv["data_free_mb"] = st.f_bavail * st.f_frsize // (1024 * 1024)
        addrs = _ipv4_addresses()
        if addrs:
            inv["ipv4"] = addrs if len(addrs) > 1 else addrs[0]
        inv.update(_inventory_scripts(Path(self.cfg.device.inventory_dir)))
        return inv

    def sync_configuration(self) -> bool:
        """Fetch the device's configuration variables; write them to ``device_env`` and restart the units
        that use them when they changed. Returns True when something changed."""
        values = self.api.configuration()
        path = Path(self.cfg.paths.device_env)
        text = "".join(f"{k}={_env_quote(v)}\n" for k, v in sorted(values.items()) if _valid_env_name(k))
        try:
            old = path.read_text()
        except FileNotFoundError:
            old = ""  # no file and no values: nothing changed
        if old == text:
            return False
        atomic_write(path, text.encode(), 0o640)
        log.info("configuration updated: %s", ", ".join(sorted(values)) or "(none)")
        for unit in self.cfg.commands.restart_on_config:
            subprocess.run(["systemctl", "try-restart", unit], check=False, timeout=120)
        return True

    def cycle(self) -> str:
        """One poll: reports, inventory and configuration when due, then the next deployment."""
        if not self.cfg.server.url:
            return "no-server"
        self.flush_reports()
        now = self.clock.now()
        if now >= self._inventory_due:
            self.api.send_inventory(self.inventory())
            try:
                self.sync_configuration()
            except (ServerError, OSError) as e:
                log.warning("configuration not updated: %s", e)
            # in memory: every start (a reboot into a new slot) reports at once
            self._inventory_due = now + self.cfg.server.inventory_interval
        dep = self.api.next_deployment(self.device_provides())
        if dep is None:
            return "idle"
        return self.process(dep)

    def run(self, *, once: bool = False) -> str:
        """The daemon loop (``once``: a single poll, for ``ota-agent check-update`` and tests)."""
        try:
            self.recover()
        except Rebooting:
            return self._rebooting(once)
        while self.state.get("phase") == "armed":  # a trial boot: the health unit decides
            if self.wait_for_verdict(self.cfg.health.deadline + 120) or once:
                break
        if self.state.get("phase") == "armed":
            return "trial"
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
        """``ota-agent install``: the same verified streaming install from a file or URL, no reports."""
        if self.state.get("phase") is not None:
            raise OTAError(f"a deployment is in progress (phase {self.state.get('phase')}); finish it first")
        if "://" in source:
            uri = source
        else:
            path = Path(source).resolve()
            if not path.is_file():
                raise OTAError(f"artifact not found: {source}")
            uri = path.as_uri()
        dep = Deployment(id=f"{LOCAL_PREFIX}{int(self.clock.now())}", artifact_name="", uri=uri,
                         device_types=(), allow_downgrade=allow_downgrade)
        if not reboot:
            self.reboot_command = None
        try:
            return self.process(dep)
        except Rebooting:
            return "armed; rebooting" if reboot else "armed: reboot to try the new slot"

    def show(self) -> dict[str, Any]:
        return {"boot_env": self.env.read(), "running_slot": slot_name(self.slots.running),
                "trial": self.slots.trial, "provides": self.running_provides(), "state": self.state.data,
                "slots": read_json(self.dir / "slots.json")}


def _valid_env_name(name: str) -> bool:
    return name.replace("_", "a").isalnum() and not name[:1].isdigit()


def _env_quote(value: str) -> str:
    if value and all(c.isalnum() or c in "._-/:@+," for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _ipv4_addresses() -> list[str]:
    try:
        proc = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for line in proc.stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            out.append(fields[fields.index("inet") + 1].split("/")[0])
    return out


def _inventory_scripts(directory: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not directory.is_dir():
        return out
    for script in sorted(directory.iterdir()):
        if not (script.is_file() and os.access(script, os.X_OK)):
            continue
        try:
            proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        for line in proc.stdout.splitlines():
            name, sep, value = line.partition("=")
            if sep and name.strip():
                out[name.strip()] = value.strip()
    return out


__all__ = ["Agent", "Clock", "Rebooting", "other"]
