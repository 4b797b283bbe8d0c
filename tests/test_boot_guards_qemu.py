"""A trial boot never waits at a shell: booted for real with the device contract's QEMU line.

Slot B gets a broken root filesystem and the boot state is armed for a trial of B:
- no ``/sbin/init``: initramfs-tools would fall back to ``/bin/sh`` and wait at a ``#`` prompt forever; the
  image's initramfs check must panic and ``panic=10`` reset;
- ``/data`` on a partition that never appears: systemd enters emergency mode; the image's guard must reboot
  instead of waiting at the emergency shell.
Either way ``boot.scr`` must then roll back to slot A, which boots to the application.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from device_hooks.bootenv import encode
from devkit.qemu import Vm, virt_argv
from image.disk import partitions_of

pytestmark = [pytest.mark.slow, pytest.mark.qemu]


def boot_until(disk: Path, log: Path, markers: list[str], timeout: float) -> str:
    """The device contract's QEMU line, nothing added (no NIC: the test needs none)."""
    with Vm(virt_argv(disk, smp=1, network=False), log) as vm:
        return vm.wait_for_all(markers, timeout)


def _break(kind: str, rootfs: Path, tmp: Path) -> None:
    def debugfs(cmd: str) -> None:
        subprocess.run(["debugfs", "-w", "-R", cmd, str(rootfs)], check=True, capture_output=True)

    if kind == "no-init":
        debugfs("rm /usr/sbin/init")
        ls = subprocess.run(["debugfs", "-R", "ls -l /usr/sbin/init", str(rootfs)], capture_output=True, text=True)
        assert "File not found" in ls.stderr + ls.stdout
    else:  # /data on a partition that never appears: systemd gives up on the mount and enters emergency mode
        fstab = tmp / "fstab"
        subprocess.run(["debugfs", "-R", f"dump /etc/fstab {fstab}", str(rootfs)], check=True, capture_output=True)
        text = fstab.read_text()
        lines = [line.replace("PARTUUID=", "PARTUUID=deadbeef-0") if " /data " in line else line
                 for line in text.splitlines()]
        assert lines != text.splitlines()
        fstab.write_text("\n".join(lines) + "\n")
        debugfs("rm /etc/fstab")
        debugfs(f"write {fstab} /etc/fstab")


MARKERS = {
    "no-init": ["/sbin/init is missing on the root filesystem"],
    "missing-mount": ["ota-boot: entered emergency mode"],
}


# "no-init" is also what the end-to-end suite's unbootable release does (qemu_tests/test_update_journey.py)
@pytest.mark.parametrize("kind", ["missing-mount"])
def test_failed_trial_boot_resets_and_rolls_back(release_dir: Path, tmp_path: Path, kind: str) -> None:
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(release_dir / "qemu-virt" / "disk.img"), str(disk)], check=True)
    parts = partitions_of(disk)
    broken = tmp_path / "broken.ext4"
    shutil.copyfile(release_dir / "rootfs.ext4", broken)
    _break(kind, broken, tmp_path)
    slot_b = parts[2]
    subprocess.run(["dd", f"if={broken}", f"of={disk}", "bs=4M", f"seek={int(slot_b['start']) * 512}",
                    "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"], check=True)
    # arm a trial of slot B, as the agent would (both copies: the newer one is read)
    env = tmp_path / "uboot.env"
    env.write_bytes(encode({"mender_boot_part": "3", "upgrade_available": "1", "bootcount": "0", "bootlimit": "1"}, 5))
    boot = f"{disk}@@{int(parts[0]['start']) * 512}"
    for copy in ("a", "b"):
        subprocess.run(["mcopy", "-o", "-i", boot, str(env), f"::ota/uboot.env.{copy}"], check=True)
    # a shell would wait forever: reaching the rollback proves the failure reset the board
    boot_until(disk, tmp_path / "serial.log", [
        "ota-boot: slot=B part=3 upgrade_available=1 bootcount=1",
        *MARKERS[kind],
        "ota-boot: slot 3 failed 1 attempt(s), rolling back",
        "ota-boot: slot=A part=2 upgrade_available=0 bootcount=2",
        "vv-video-ai: serving /health",
    ], timeout=720)
