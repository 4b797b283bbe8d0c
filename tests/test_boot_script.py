"""boot.scr's A/B state machine in Debian's qemu_arm64 U-Boot, on a disk with only the boot partition (the
slots are empty, so every boot attempt ends in a reset: exactly what a failing trial slot does). About 20 s
per scenario; the full boots are in test_image_build.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from device_hooks import boottune
from device_hooks.bootenv import ENV_SIZE, INITIAL_STATE, BootEnv, decode, encode
from devkit.qemu import Vm, virt_argv
from image.build import render_boot_script
from image.config import load_board
from image.disk import assemble, make_ext4, make_vfat, plan_layout

pytestmark = [pytest.mark.slow, pytest.mark.qemu]
MTOOLS = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def _disk(tmp: Path, a: bytes, b: bytes, last_good: bytes | None = None, *, board: str = "qemu-virt",
          slot_a: bool = False) -> tuple[Path, int]:
    """The boot partition with boot.scr and the two state copies; ``slot_a``: slot A holds a kernel and initrd
    that U-Boot loads but cannot start (so the script runs to ``booti``, which fails and resets)."""
    layout = plan_layout(slot_mib=64, boot_mib=64, data_mib=16, seed="t")
    scr = render_boot_script(tmp, board, load_board(board), layout)
    (tmp / "env.a").write_bytes(a)
    (tmp / "env.b").write_bytes(b)
    files = {"boot.scr": scr, "ota/uboot.env.a": tmp / "env.a", "ota/uboot.env.b": tmp / "env.b"}
    if last_good is not None:
        (tmp / "lastgood").write_bytes(last_good)
        files["ota/lastgood"] = tmp / "lastgood"
    make_vfat(tmp / "boot.vfat", files, size_mib=64, label="boot", seed="t")
    parts = {"boot": tmp / "boot.vfat"}
    if slot_a:
        (tmp / "tree" / "boot").mkdir(parents=True)
        (tmp / "tree" / "boot" / "Image").write_bytes(b"not a kernel" * 100)
        (tmp / "tree" / "boot" / "initrd.img").write_bytes(b"not an initrd" * 100)
        make_ext4(tmp / "a.ext4", tmp / "tree", size_mib=64, label="rootfs-a", seed="t")
        parts["rootfs-a"] = tmp / "a.ext4"
    assemble(tmp / "disk.img", layout, parts)
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


#: QEMU virt's own device tree has a PL031 real-time clock at this path
RTC = "/pl031@9010000"


def test_local_tuning_reaches_the_kernel_line_and_the_device_tree_and_survives_the_state_writes(tmp_path: Path) -> None:
    """The holder of a device (here: a test harness with fw_setenv on its copy of the image) adds kernel
    arguments, moves the console and fixes the device tree up; a trial boot's state write keeps all of it."""
    tuning = {boottune.BOOTARGS: "clk_ignore_unused modprobe.blacklist=bcm2835_wdt", boottune.CONSOLE: "ttyAMA1",
              boottune.FDT_DISABLE: f"{RTC} /no-such-node",
              boottune.FDT_DELPROP: f"{RTC}:clock-names {RTC}:clock-names"}
    state = {**INITIAL_STATE, "upgrade_available": "1", "bootlimit": "5", **tuning}
    disk, off = _disk(tmp_path, encode(state, 3), encode(INITIAL_STATE, 2), slot_a=True)
    lines = _run_uboot(disk, tmp_path / "serial.log", f"cannot delete {RTC} clock-names")
    layout_id = _layout_id()
    assert lines[:8] == [
        "ota-boot: slot=A part=2 upgrade_available=1 bootcount=1",
        "ota-boot: extra kernel arguments: clk_ignore_unused modprobe.blacklist=bcm2835_wdt",
        "ota-boot: console ttyAMA1",
        f"ota-boot: kernel arguments: clk_ignore_unused modprobe.blacklist=bcm2835_wdt root=PARTUUID={layout_id}-02 "
        "rootfstype=ext4 rootwait rw console=ttyAMA1 panic=10 ota.slot=A ota.trial=1",
        f"ota-boot: fdt: disabled {RTC}",
        "ota-boot: fdt: cannot disable /no-such-node",
        # the second deletion of one property fails: the first one did delete it
        f"ota-boot: fdt: deleted {RTC} clock-names",
        f"ota-boot: fdt: cannot delete {RTC} clock-names",
    ]
    assert _env_files(disk, off, tmp_path).read() == {**state, "bootcount": "1"}


def test_tuning_outside_its_grammar_is_ignored_by_boot_scr(tmp_path: Path) -> None:
    """A hand-edited state (written past boottune.check) cannot reach U-Boot's command line: each bad value is
    ignored whole and the board's own console stays; the rpi4 script edits the device tree it boots with
    (here the firmware's, ${fdt_addr}, as the slot has no DTB)."""
    state = {**INITIAL_STATE, boottune.BOOTARGS: "quiet;reset", boottune.CONSOLE: "ttyAMA0 init=/bin/sh",
             boottune.FDT_DISABLE: f"{RTC};reset", boottune.FDT_DELPROP: f"{RTC}:clock-names"}
    disk, _ = _disk(tmp_path, encode(state, 1), encode(state, 1), board="rpi4", slot_a=True)
    lines = _run_uboot(disk, tmp_path / "serial.log", f"deleted {RTC} clock-names")
    console = load_board("rpi4").console
    assert lines[1:6] == [
        "ota-boot: ignoring ota_bootargs: a character outside its set",
        "ota-boot: ignoring ota_console: a character outside its set",
        f"ota-boot: kernel arguments: root=PARTUUID={_layout_id()}-02 rootfstype=ext4 rootwait rw console={console} "
        "panic=10 ota.slot=A ota.trial=0",
        "ota-boot: ignoring ota_fdt_disable: a character outside its set",
        f"ota-boot: fdt: deleted {RTC} clock-names",
    ]


def _layout_id() -> str:
    return f"{plan_layout(slot_mib=64, boot_mib=64, data_mib=16, seed='t').disk_id:08x}"
