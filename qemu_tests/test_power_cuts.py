"""Scenarios 5 and 4 of the end-to-end suite: one v1 → v2 deployment that loses the network and then the power
four times, on one device, in order. After every cut the machine is powered up again and must boot a good
slot; the deployment must end in ``success`` or ``failure``, never stuck.

5. the server goes away in the middle of the download and comes back: the agent resumes with HTTP Range;
4. power cuts: during the slot write (at a random byte offset), during the boot-state write that arms the
   trial (a torn copy of the environment), right after arming, and during the commit (a torn commit write,
   which the bootloader answers with a rollback, or right after the commit landed, which must end in
   ``success``).

After every power-up the scenario asserts the state it claims: the slot the bootloader chose (console and
``findmnt /``), the boot environment (``fw_printenv``), what the server recorded for the deployment, and that
``/data`` is intact (mounted read-write, a file written before the first cut unchanged, the agent's state readable).

The cut points are chosen at random per run from ``OTA_E2E_SEED`` (random when unset) and printed, so a failing
run can be repeated. The agent is told where to stop through ``/data/ota/agent.env`` (``stall:<point>`` fault
specs, each firing once, see :mod:`device_hooks.faults`); the harness kills QEMU the moment the console shows
the stall: nothing is flushed, exactly like pulling the plug.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .conftest import NAME, Fleet, Rig, make_rig, timing

pytestmark = [pytest.mark.slow, pytest.mark.qemu]
MIB = 1 << 20
SLOT_BYTES = 1280 * MIB


@dataclass(frozen=True)
class CutPlan:
    seed: int
    install_write_at: int  # bytes of the slot written when the power goes
    commit_point: str  # "commit-write" (torn: the bootloader rolls back) or "after-commit" (landed)

    @classmethod
    def choose(cls) -> CutPlan:
        seed = int(os.environ.get("OTA_E2E_SEED") or random.SystemRandom().randrange(1 << 32))
        rng = random.Random(seed)
        # past the network cut (3 s into the download: well under 200 MiB of the slot) and before its end
        at = rng.randrange(600, 1250) * MIB
        return cls(seed, at, rng.choice(["commit-write", "after-commit"]))

    def faults(self) -> str:
        return ",".join([f"stall:install-write@{self.install_write_at}", "stall:arm-write", "stall:after-arm",
                         f"stall:{self.commit_point}"])


@dataclass
class Run:
    rig: Rig
    plan: CutPlan
    data_digest: str  # sha256 of a file written to /data before the first cut
    dep: str = ""
    boot_mark: int = 0  # console offset of the latest power-on: a stall can show while a previous test waits


@pytest.fixture(scope="module")
def run(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    plan = CutPlan.choose()
    print(f"\npower-cut plan: OTA_E2E_SEED={plan.seed} {plan}")
    for rig in make_rig(fleet, tmp_path_factory.mktemp("power")):
        rig.vm.wait_for_ssh(300)
        digest = rig.sh(f"head -c 1M /dev/urandom > {DATA_MARKER} && sync && sha256sum {DATA_MARKER}").split()[0]
        rig.sh(f"printf 'OTA_AGENT_FAULT={plan.faults()}\\nOTA_AGENT_FAULT_ONCE=/data/ota/faults-fired\\n' "
               "> /data/ota/agent.env && sync && systemctl restart ota-agent")
        yield Run(rig, plan, digest)


DATA_MARKER = "/data/power-cut-marker"


def running_slot(r: Run) -> str:
    """The partition the running system's root is on (``/dev/vda2``: slot A, ``/dev/vda3``: slot B)."""
    return r.rig.sh("findmnt -no SOURCE /").strip()


def assert_data_intact(r: Run) -> None:
    """/data survived the cut: mounted read-write, the file written before the first cut unchanged, the
    agent's state file readable JSON."""
    rig = r.rig
    options = rig.sh("findmnt -no OPTIONS /data").strip().split(",")
    assert "rw" in options, f"/data is not mounted read-write: {options}"
    assert rig.sh(f"sha256sum {DATA_MARKER}").split()[0] == r.data_digest, "/data lost a file written before the cut"
    state = rig.sh("cat /data/ota/state.json")
    json.loads(state)  # a torn state file would not parse


def assert_boot_env(r: Run, **expected: str) -> dict[str, str]:
    env = r.rig.boot_env()
    assert {k: env.get(k) for k in expected} == expected, env
    return env


def assert_recorded(r: Run, *statuses: str) -> None:
    """The server recorded the deployment for the device as one of ``statuses``: still open, not lost."""
    stats = r.rig.server.statistics(r.dep)
    assert stats in [{s: 1} for s in statuses], f"deployment {r.dep}: {stats}, expected one of {statuses}"


def cut_at_stall(r: Run, point: str, timeout: float) -> int:
    """Wait for the agent to stall at ``point`` (since the latest power-on), pull the plug, power on again.
    Returns the console offset of the new power-on."""
    r.rig.vm.wait_for(f"fault: stalled at {point}", timeout, since=r.boot_mark, poll=0.5)
    r.rig.pull_plug()
    r.boot_mark = r.rig.vm.mark()
    r.rig.power_on()
    return r.boot_mark


def test_network_cut_mid_download_resumes_with_range(run: Run) -> None:
    rig = run.rig
    rig.upload(rig.fleet.artifact("2.0.0"))
    mark = rig.vm.mark()
    run.dep = rig.deploy(f"{NAME}-2.0.0")
    rig.vm.wait_for("] downloading ", 300, since=mark)
    time.sleep(3)  # into the download (it runs at about 6 MB/s here)
    rig.server.stop()
    rig.vm.wait_for("download interrupted at byte", 300, since=mark)
    time.sleep(10)  # the agent keeps retrying with back-off meanwhile
    rig.server.start()
    rig.vm.wait_for("with HTTP Range", 300, since=mark)  # "resumed at byte N of M with HTTP Range"
    assert_recorded(run, "downloading", "installing")
    assert_boot_env(run, mender_boot_part="2", upgrade_available="0")
    assert running_slot(run) == "/dev/vda2"


def test_power_cut_during_slot_write(run: Run) -> None:
    rig = run.rig
    mark = cut_at_stall(run, "install-write", 900)
    started = time.monotonic()
    rig.vm.wait_for("ota-boot: slot=A part=2 upgrade_available=0 bootcount=0", 180, since=mark)
    # the agent starts over; what was downloaded before is kept on /data and not fetched again
    rig.vm.wait_for("agent restarted during installing", 300, since=mark)
    rig.vm.wait_for("kept from before", 300, since=mark)
    rig.vm.wait_for_ssh(300)
    assert running_slot(run) == "/dev/vda2"
    assert_boot_env(run, mender_boot_part="2", upgrade_available="0")  # nothing armed: the write had not finished
    assert_recorded(run, "installing")  # the header was verified before the cut; statuses never go back
    assert_data_intact(run)
    timing(f"scenario 4: power up after a cut at {run.plan.install_write_at // MIB} MiB of the slot write "
           "to the download resumed", time.monotonic() - started)


def test_power_cut_while_arming(run: Run) -> None:
    rig = run.rig
    mark = cut_at_stall(run, "arm-write", 900)
    # the torn copy is ignored: the old boot state, slot A, boots; the agent arms the verified slot again
    rig.vm.wait_for("ota-boot: slot=A part=2 upgrade_available=0 bootcount=0", 180, since=mark)
    rig.vm.wait_for("arming it again", 300, since=mark)
    rig.vm.wait_for_ssh(300)
    assert running_slot(run) == "/dev/vda2"
    # the second arming landed (the agent now waits at the next cut point, right after it)
    env: dict[str, str] = {}

    def armed() -> bool:
        nonlocal env
        env = rig.boot_env()
        return env.get("mender_boot_part") == "3" and env.get("upgrade_available") == "1"

    armed.__doc__ = "the boot state arms slot B (mender_boot_part=3 upgrade_available=1)"
    rig.vm.wait_for(armed, 120, poll=3)
    assert env.get("bootcount") == "0", env
    assert_recorded(run, "rebooting")  # reported before the boot state changed
    assert_data_intact(run)


def test_power_cut_right_after_arming(run: Run) -> None:
    rig = run.rig
    mark = cut_at_stall(run, "after-arm", 300)
    # the arming landed: the trial of slot B boots
    rig.vm.wait_for("ota-boot: slot=B part=3 upgrade_available=1 bootcount=1", 180, since=mark)
    rig.vm.wait_for_ssh(300)
    assert running_slot(run) == "/dev/vda3"
    # the trial's commit may land at any moment now: only what holds before and after it is asserted
    assert_boot_env(run, mender_boot_part="3")
    assert_recorded(run, "rebooting")  # no verdict reaches the server before the commit cut
    assert_data_intact(run)


def test_power_cut_during_commit(run: Run) -> None:
    rig, plan = run.rig, run.plan
    mark = cut_at_stall(run, plan.commit_point, 600)
    if plan.commit_point == "commit-write":
        # torn: the bootloader still sees a trial it already counted, and rolls back to slot A
        rig.vm.wait_for("ota-boot: slot 3 failed 1 attempt(s), rolling back", 180, since=mark)
        expected, version, slot, part = "failure", "1.0.0", "A", "2"
    else:
        rig.vm.wait_for("ota-boot: slot=B part=3 upgrade_available=0", 180, since=mark)
        expected, version, slot, part = "success", "2.0.0", "B", "3"
    assert rig.follow(run.dep, {"success", "failure"}, 600) == {expected: 1}, rig.log(run.dep)
    rig.wait_running(version, slot)
    rig.vm.wait_for_ssh(300)
    assert running_slot(run) == f"/dev/vda{part}"
    assert_boot_env(run, mender_boot_part=part, upgrade_available="0")
    if expected == "failure":
        assert "rolled back: " in rig.log(run.dep), rig.log(run.dep)  # the device's log, on the server, says why
    assert_data_intact(run)
    state = rig.sh("cat /data/ota/state.json")
    assert '"phase"' not in state or '"phase": null' in state, f"deployment not closed on the device: {state}"
    fired = rig.sh("cat /data/ota/faults-fired").split()
    assert len(fired) == 4, f"not every planned cut happened: {fired}"
