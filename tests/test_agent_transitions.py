"""The agent's state machine in-process, one transition at a time: a fake server API and a fake clock are
injected (``Agent(api_factory=..., clock=...)``), the device is made of files. Each test is one case of
recovery or of a stuck state that must not stay stuck."""

from __future__ import annotations

import errno
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from device_hooks.agent import Agent, Clock, Rebooting
from device_hooks.agentstate import Current, Phase, Slot
from device_hooks.api import Aborted, Rejected, ServerError
from device_hooks.bootenv import BootEnv, decode
from device_hooks.config import load_config

from .agent_device import FileDevice
from .test_agent_local import make_artifact


@dataclass
class FakeAPI:
    """Answers like a server; ``fail`` maps a deployment id to the exception its next report raises."""

    fail: dict[str, BaseException] = field(default_factory=dict)
    offline: bool = False
    sent: list[tuple[str, str]] = field(default_factory=list)
    polls: int = 0
    session: Any = None
    config_hash: str | None = None
    served_config_hash: str | None = None

    def authenticate(self) -> str:
        return "token"

    def next_deployment(self, provides: dict[str, str]) -> None:
        if self.offline:
            raise ServerError("connection refused")
        self.polls += 1
        return None

    def report_status(self, dep_id: str, status: str, substate: str = "") -> None:
        if self.offline:
            raise ServerError("connection refused")
        if dep_id in self.fail:
            raise self.fail[dep_id]
        self.sent.append((dep_id, status))

    def upload_log(self, dep_id: str, messages: list[dict[str, str]]) -> None:
        self.report_status(dep_id, "log")

    def send_inventory(self, attributes: dict[str, Any]) -> None:
        pass

    def configuration(self) -> dict[str, str]:
        return {}


@dataclass
class FakeClock:
    t: float = 1_000_000.0
    mono: float = 0.0
    slept: list[float] = field(default_factory=list)

    def clock(self) -> Clock:
        return Clock(sleep=self.sleep, now=lambda: self.t, monotonic=lambda: self.mono)

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s
        self.mono += s


@pytest.fixture
def device(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> FileDevice:
    return FileDevice(tmp_path / "dev", "http://127.0.0.1:9", [keys["ec"][1]])


def agent(device: FileDevice, api: FakeAPI | None = None, clock: FakeClock | None = None) -> Agent:
    a = Agent(load_config(device.config_path), (clock or FakeClock()).clock(), api_factory=lambda: api or FakeAPI())
    a.reboot_command = None  # a reboot ends the cycle with Rebooting
    return a


def dep_id() -> str:
    return str(uuid.uuid4())


def armed(device: FileDevice, target: Slot, *, boot_id: str = "earlier boot") -> Current:
    return Current(id=dep_id(), artifact_name="vv-2.0.0", uri="https://h/a", phase=Phase.ARMED, target=target,
                   source=target.other, verified=True, boot_id=boot_id, armed_at=1.0)


# ------------------------------------------------------------------ reports

def test_a_report_the_server_refuses_for_good_does_not_block_the_others(device: FileDevice) -> None:
    """A database restored without the deployment answers 404 forever: that report is dropped, the reports of
    later deployments go out."""
    gone, later = dep_id(), dep_id()
    api = FakeAPI(fail={gone: Rejected("404 deployment not found")})
    a = agent(device, api)
    a.report(gone, "success")
    a.report(later, "downloading")
    assert api.sent == [(later, "downloading")]
    assert a.state.outbox == {}


def test_network_errors_keep_every_report_in_order(device: FileDevice) -> None:
    api = FakeAPI(offline=True)
    a = agent(device, api)
    one, two = dep_id(), dep_id()
    a.report(one, "installing")
    a.report(one, "rebooting")
    a.report(two, "downloading")
    assert [r.status for r in a.state.outbox[one]] == ["installing", "rebooting"]
    again = agent(device, api)  # a restart reads them back
    api.offline = False
    again.flush_reports()
    assert api.sent == [(one, "installing"), (one, "rebooting"), (two, "downloading")]


def test_an_aborted_deployment_drops_only_its_own_queue(device: FileDevice) -> None:
    aborted, other = dep_id(), dep_id()
    api = FakeAPI(offline=True)
    a = agent(device, api)
    a.report(aborted, "downloading")
    a.report(other, "downloading")
    api.offline = False
    api.fail[aborted] = Aborted("409")
    with pytest.raises(Aborted):
        a.report(aborted, "installing")
    assert api.sent == [(other, "downloading")] and a.state.outbox == {}


def test_reports_still_go_out_when_data_is_full(device: FileDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeAPI()
    a = agent(device, api)

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(a.store, "save", full)
    d = dep_id()
    a.report(d, "failure", "disk full", upload_log=True)
    assert api.sent == [(d, "log"), (d, "failure")]


def test_a_full_data_partition_ends_a_cycle_not_the_agent(device: FileDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    a = agent(device)

    def cycle() -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(a, "cycle", cycle)
    assert a.run(once=True) == "error"


# ------------------------------------------------------------------ boot state

def test_one_bad_boot_state_copy_is_rewritten_from_the_good_one(device: FileDevice) -> None:
    env = device.bootenv
    env.update({"mender_boot_part": "2"})  # copy b is the newer one now
    bad = env.copies[0]
    bad.write_bytes(b"\xff" * 100)
    agent(device).startup()
    a, b = (decode(p.read_bytes()) for p in env.copies)
    assert a.valid and b.valid and a.variables == b.variables


def test_both_copies_bad_the_state_is_rebuilt_for_the_running_slot(device: FileDevice) -> None:
    for p in device.bootenv.copies:
        p.write_bytes(b"torn")
    device._set_running(3, trial=False)  # boot.scr booted the last committed slot, B
    agent(device).startup()
    env = device.bootenv.read()
    assert (env["mender_boot_part"], env["upgrade_available"], env["bootcount"]) == ("3", "0", "0")
    assert BootEnv(device.bootenv.copies).last_good_path.read_text() == "mender_boot_part=3\n"


# ------------------------------------------------------------------ recovery, one branch each

def test_armed_in_this_boot_arms_again_and_reboots(device: FileDevice) -> None:
    a = agent(device)
    a.state.current = armed(device, Slot.B, boot_id=a.boot)
    a.save()
    with pytest.raises(Rebooting):
        a.recover()
    env = device.bootenv.read()
    assert (env["mender_boot_part"], env["upgrade_available"]) == ("3", "1")


def test_trial_boot_polls_the_server_and_leaves_the_proof_for_the_verdict(device: FileDevice) -> None:
    import json

    cur = armed(device, Slot.B)
    device.bootenv.update({"mender_boot_part": "3", "upgrade_available": "1"})
    device.boot()
    api = FakeAPI()
    a = agent(device, api)
    a.state.current = cur
    a.save()
    assert a.run(once=True) == "trial"
    assert api.polls == 1
    assert json.loads((device.data / "poll.json").read_text())["boot_id"] == a.boot


def test_a_trial_without_verdict_is_rebooted_after_deadline_and_grace(device: FileDevice) -> None:
    """No wait without a timeout: past deadline + server_grace + margin the agent reboots the trial itself."""
    device.bootenv.update({"mender_boot_part": "3", "upgrade_available": "1"})
    device.boot()
    clock = FakeClock()
    a = agent(device, FakeAPI(offline=True), clock)
    a.state.current = armed(device, Slot.B)
    a.save()
    with pytest.raises(Rebooting):
        a.run_trial()
    assert sum(clock.slept) > a.cfg.health.deadline + a.cfg.health.server_grace


def test_committed_without_health_json_is_a_success(device: FileDevice) -> None:
    """The verdict committed but could not write health.json (a full /data): the boot state is the truth."""
    device.bootenv.update({"mender_boot_part": "3", "upgrade_available": "1"})
    device.boot()
    device.bootenv.update({"upgrade_available": "0", "bootcount": "0"})  # the commit
    api = FakeAPI()
    a = agent(device, api)
    cur = armed(device, Slot.B)
    a.state.current = cur
    a.save()
    a.run(once=True)
    assert (cur.id, "success") in api.sent and a.state.current is None


def test_back_on_the_old_slot_reports_the_rollback(device: FileDevice) -> None:
    device.bootenv.update({"mender_boot_part": "3", "upgrade_available": "1"})
    device.boot()
    device.boot()  # the trial failed silently: the bootloader rolled back
    api = FakeAPI()
    a = agent(device, api)
    cur = armed(device, Slot.B)
    a.state.current = cur
    a.save()
    a.recover()
    assert (cur.id, "failure") in api.sent and a.state.current is None


def test_arming_that_never_landed_is_armed_again(device: FileDevice) -> None:
    a = agent(device)
    a.state.current = armed(device, Slot.B)
    a.save()
    with pytest.raises(Rebooting):
        a.recover()
    assert device.bootenv.read()["upgrade_available"] == "1" and a.state.current.arm_attempts == 1


def test_a_failed_reboot_script_arms_nothing_even_when_its_error_script_fails(device: FileDevice, tmp_path: Path,
                                                                               keys: dict[str, tuple[Path, Path]]) -> None:
    """ArtifactReboot_Enter refuses and ArtifactReboot_Error fails too: the failure is reported, nothing is
    armed, and no restart re-arms the refused release."""
    scripts = {"ArtifactReboot_Enter_01": "#!/bin/sh\necho no >&2\nexit 1\n",
               "ArtifactReboot_Error_01": "#!/bin/sh\nexit 3\n"}
    art, _ = make_artifact(tmp_path, keys["ec"][0], scripts=scripts)
    a = agent(device)
    assert a.install_local(str(art)) == "failure"
    assert device.bootenv.read()["upgrade_available"] == "0" and a.state.current is None
    assert agent(device).run(once=True) != "rebooting"
    assert device.bootenv.read()["upgrade_available"] == "0"


def test_an_invalid_state_file_is_moved_aside_not_obeyed(device: FileDevice) -> None:
    (device.data / "state.json").write_text('{"phase": "armed", "deployment": {"id": "../../x"}, "target_part": 3, '
                                            '"armed_at": 1e999}')
    a = agent(device)
    assert a.state.current is None
    assert list(device.data.glob("state.json.invalid-*"))


# ------------------------------------------------------------------ the state-script lifecycle

@pytest.mark.parametrize("failing, body_fails, ran, raised", [
    (None, False, ["Enter", "Leave"], None),
    ("Enter", False, ["Enter", "Error"], "ScriptError"),
    (None, True, ["Enter", "Error"], "RuntimeError"),
    ("Leave", False, ["Enter", "Leave", "Error"], "ScriptError"),
    ("Error", True, ["Enter", "Error"], "RuntimeError"),  # a failing Error script never masks the cause
])
def test_state_lifecycle_always_finishes(tmp_path: Path, failing: str | None, body_fails: bool, ran: list[str],
                                         raised: str | None) -> None:
    from device_hooks.scripts import ScriptRunner

    log = tmp_path / "ran"
    for action in ("Enter", "Leave", "Error"):
        script = tmp_path / "s" / f"ArtifactInstall_{action}_01"
        script.parent.mkdir(exist_ok=True)
        script.write_text(f"#!/bin/sh\necho {action} >> {log}\nexit {1 if action == failing else 0}\n")
        script.chmod(0o755)
    notes: list[str] = []
    error: BaseException | None = None
    try:
        with ScriptRunner(tmp_path / "s", retry_timeout=0).state("ArtifactInstall", notes.append) as st:
            st.enter()
            if body_fails:
                raise RuntimeError("the body failed")
    except BaseException as e:  # noqa: BLE001 - the test looks at which one
        error = e
    assert log.read_text().split() == ran
    assert (type(error).__name__ if error else None) == raised


def test_state_lifecycle_runs_nothing_before_enter(tmp_path: Path) -> None:
    from device_hooks.scripts import ScriptRunner

    script = tmp_path / "s" / "ArtifactInstall_Error_01"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\ntouch {tmp_path}/ran\n")
    script.chmod(0o755)
    with pytest.raises(RuntimeError), ScriptRunner(tmp_path / "s").state("ArtifactInstall", print):
        raise RuntimeError("the download failed before any header was verified")
    assert not (tmp_path / "ran").exists()
