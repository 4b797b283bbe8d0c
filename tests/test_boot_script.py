"""boot.scr's A/B state machine in Debian's qemu_arm64 U-Boot, on a disk with only the boot partition (the
slots are empty, so every boot attempt ends in a reset: exactly what a failing trial slot does). About 20 s
per scenario; the full boots are in test_image_build.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from device_hooks.bootenv import ENV_SIZE, INITIAL_STATE, BootEnv, decode, encode
from devkit.qemu import Vm, virt_argv
from image.build import render_boot_script
from image.config import load_board
from image.disk import assemble, make_vfat, plan_layout

pytestmark = [pytest.mark.slow, pytest.mark.qemu]
MTOOLS = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def _disk(tmp: Path, a: bytes, b: bytes, last_good: bytes | None = None) -> tuple[Path, int]:
    layout = plan_layout(slot_mib=64, boot_mib=64, data_mib=16, seed="t")
    scr = render_boot_script(tmp, "qemu-virt", load_board("qemu-virt"), layout)
    (tmp / "env.a").write_bytes(a)
    (tmp / "env.b").write_bytes(b)
    files = {"boot.scr": scr, "ota/uboot.env.a": tmp / "env.a", "ota/uboot.env.b": tmp / "env.b"}
    if last_good is not None:
        (tmp / "lastgood").write_bytes(last_good)
        files["ota/lastgood"] = tmp / "lastgood"
    make_vfat(tmp / "boot.vfat", files, size_mib=64, label="boot", seed="t")
    assemble(tmp / "disk.img", layout, {"boot": tmp / "boot.vfat"})
    return tmp / "disk.img", layout.by_name("boot").offset


def _run_uboot(disk: Path, log: Path, until: str, count: int = 1, timeout: float = 90) -> list[str]:
    """U-Boot alone (no watchdog, no NIC) until ``until`` shows ``count`` times; returns the ota-boot lines."""
    def lines() -> list[str]:
        seen = [ln for ln in vm.console().splitlines() if ln.startswith("ota-boot:")]
        return seen if sum(until in ln for ln in seen) >= count else []

    lines.__doc__ = f"{until!r} x{count}"
    with Vm(virt_argv(disk, smp=1, network=False, watchdog=False), log) as vm:
        return vm.wait_for(lines, timeout, poll=0.5)


def _env_files(disk: Path, offset: int, tmp: Path) -> BootEnv:
    for x in "ab":
        subprocess.run(["mcopy", "-o", "-i", f"{disk}@@{offset}", f"::/ota/uboot.env.{x}", str(tmp / f"out.{x}")],
                       check=True, env=MTOOLS)
    return BootEnv([tmp / "out.a", tmp / "out.b"], ENV_SIZE)


def test_trial_boot_counts_attempts_then_rolls_back(tmp_path: Path) -> None:
    trial = {**INITIAL_STATE, "mender_boot_part": "3", "upgrade_available": "1"}
    disk, off = _disk(tmp_path, encode(trial, 5), encode(INITIAL_STATE, 4))
    lines = _run_uboot(disk, tmp_path / "serial.log", "slot=A part=2 upgrade_available=0 bootcount=2", count=2)
    assert lines[0] == "ota-boot: slot=B part=3 upgrade_available=1 bootcount=1"
    assert "ota-boot: slot 3 failed 1 attempt(s), rolling back" in lines
    env = _env_files(disk, off, tmp_path)
    assert env.read() == {**INITIAL_STATE, "bootcount": "2"}
    # every write went to the older copy with flags + 1, so the previous state is still in the other one
    a, b = (decode(p.read_bytes()) for p in env.copies)
    assert (a.flags, b.flags) == (7, 6) and b.variables["upgrade_available"] == "1"


def test_fw_setenv_changes_what_u_boot_boots(tmp_path: Path) -> None:
    disk, off = _disk(tmp_path, encode(INITIAL_STATE, 1), encode(INITIAL_STATE, 1))
    env = _env_files(disk, off, tmp_path)
    config = tmp_path / "fw_env.config"
    config.write_text(f"{env.copies[0]} 0x0 0x{ENV_SIZE:x}\n{env.copies[1]} 0x0 0x{ENV_SIZE:x}\n")
    subprocess.run(["fw_setenv", "-c", str(config), "mender_boot_part", "3"], check=True)
    for x in "ab":
        subprocess.run(["mcopy", "-o", "-i", f"{disk}@@{off}", str(tmp_path / f"out.{x}"), f"::/ota/uboot.env.{x}"],
                       check=True, env=MTOOLS)
    lines = _run_uboot(disk, tmp_path / "serial.log", "slot=B part=3 upgrade_available=0 bootcount=0")
    assert lines[0] == "ota-boot: slot=B part=3 upgrade_available=0 bootcount=0"


def test_missing_or_corrupt_state_falls_back_to_slot_a(tmp_path: Path) -> None:
    disk, _ = _disk(tmp_path, b"\x00" * ENV_SIZE, b"garbage" * 100)
    lines = _run_uboot(disk, tmp_path / "serial.log", "slot=A part=2")
    assert lines[0] == "ota-boot: no valid boot state, booting the last committed slot (part 2)"


def test_both_copies_invalid_boot_the_last_committed_slot_without_trial(tmp_path: Path) -> None:
    """Slot A may be half written (B was committed since, and A is the next install's target): with both
    boot-state copies bad, boot.scr boots the slot the agent recorded at its last commit, as the agent writes
    it (BootEnv.record_last_good)."""
    env = BootEnv([tmp_path / "a", tmp_path / "b"])
    env.record_last_good(3)
    disk, _ = _disk(tmp_path, b"\x00" * ENV_SIZE, b"garbage" * 100, last_good=env.last_good_path.read_bytes())
    lines = _run_uboot(disk, tmp_path / "serial.log", "slot=B part=3")
    assert lines[0] == "ota-boot: no valid boot state, booting the last committed slot (part 3)"
    assert lines[1] == "ota-boot: slot=B part=3 upgrade_available=0 bootcount=0"
