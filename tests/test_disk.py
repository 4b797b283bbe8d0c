"""Disk images built without root mounts, checked with the stock tools (sfdisk, debugfs, mtools)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from image.disk import DiskLayout, assemble, bmap, make_ext4, make_vfat, partitions_of, plan_layout
from ota_common.errors import ToolError, UserError


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("vv-edge\n")
    (root / "boot").mkdir()
    (root / "boot" / "Image").write_bytes(b"\x7fkernel" * 50_000)
    for p in [root, *root.rglob("*")]:  # identical inputs include identical mtimes
        os.utime(p, (1_700_000_000, 1_700_000_000))
    return root


def _build(tmp: Path) -> tuple[Path, DiskLayout]:
    layout = plan_layout(slot_mib=64, boot_mib=64, data_mib=16, seed="test")
    tree = _tree(tmp / "tree")
    script = tmp / "boot.scr"
    script.write_bytes(b"echo hello")  # a generated file: its mtime is "now" and must not matter
    make_vfat(tmp / "boot.vfat", {"boot.scr": script, "ota/env.a": script}, size_mib=64, label="boot", seed="test")
    make_ext4(tmp / "a.ext4", tree, size_mib=64, label="rootfs-a", seed="test-a")
    (tmp / "data" / "ota").mkdir(parents=True)
    (tmp / "data" / "ota" / "device_type").write_text("device_type=test\n")  # generated: mtime is "now"
    make_ext4(tmp / "data.ext4", tmp / "data", size_mib=16, label="data", seed="test-data")
    disk = tmp / "disk.img"
    assemble(disk, layout, {"boot": tmp / "boot.vfat", "rootfs-a": tmp / "a.ext4", "data": tmp / "data.ext4"})
    return disk, layout


def test_ab_disk_layout_and_contents(tmp_path: Path) -> None:
    disk, layout = _build(tmp_path)
    parts = partitions_of(disk)
    assert [p["type"] for p in parts] == ["c", "83", "83", "83"]
    assert parts[0].get("bootable") is True
    assert [int(p["start"]) * 512 for p in parts] == [p.offset for p in layout.partitions]  # type: ignore[call-overload]
    assert parts[1]["size"] == parts[2]["size"]
    # PARTUUIDs as the kernel will see them (MBR disk id + partition number)
    blkid = subprocess.run(["sfdisk", "--disk-id", str(disk)], capture_output=True, text=True, check=True).stdout.strip()
    assert blkid == f"0x{layout.disk_id:08x}"
    assert layout.partuuid(2) == f"{layout.disk_id:08x}-02"

    a = layout.by_name("rootfs-a")
    part = tmp_path / "a-extracted.ext4"
    with open(disk, "rb") as f:
        f.seek(a.offset)
        part.write_bytes(f.read(a.size))
    fsck = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(part)], capture_output=True, text=True)
    assert cat.stdout == "vv-edge\n"
    boot = layout.by_name("boot")
    mtype = subprocess.run(["mtype", "-i", f"{disk}@@{boot.offset}", "::/ota/env.a"], capture_output=True, text=True,
                           env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    assert mtype.stdout == "echo hello"
    # slot B is empty and sparse: the image does not occupy its full size on disk
    assert disk.stat().st_blocks * 512 < disk.stat().st_size / 2
    assert bmap(disk).read_text().startswith("<?xml")


def test_same_inputs_same_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    one, _ = _build(tmp_path / "one")
    time.sleep(1.1)  # so that "now" differs between the builds
    two, _ = _build(tmp_path / "two")
    assert one.read_bytes() == two.read_bytes()


def test_too_small_or_overfull(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="too small"):
        plan_layout(slot_mib=10)
    tree = tmp_path / "big"
    tree.mkdir()
    (tree / "blob").write_bytes(b"x" * (70 << 20))
    with pytest.raises(UserError, match="raise the slot size"):
        make_ext4(tmp_path / "x.ext4", tree, size_mib=64, label="rootfs-a", seed="s")


def test_a_debugfs_failure_is_a_tool_error_not_the_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """debugfs exits 0 even when a command of its script fails; what it said on stderr makes the failure a
    ToolError (exit 3: the tool, not the user's input), with the command and what it said as fields."""
    import image.disk as disk

    tree = _tree(tmp_path / "tree")
    said = b"debugfs 1.47.0 (5-Feb-2023)\nsif: File not found by ext2_lookup while looking up /etc/hostname\n"

    def debugfs(args: list[object], **kw: object) -> subprocess.CompletedProcess[bytes]:
        return subprocess.CompletedProcess([os.fspath(a) for a in args], 0, b"", said)  # type: ignore[arg-type]

    monkeypatch.setattr(disk, "run", debugfs)
    with pytest.raises(ToolError, match="rootfs-a: setting timestamps failed: sif: File not found") as exc:
        disk._clamp_inode_times(tmp_path / "x.ext4", tree, 1_700_000_000, "rootfs-a")
    assert exc.value.tool == "debugfs" and exc.value.returncode == 0
    assert exc.value.stderr == "sif: File not found by ext2_lookup while looking up /etc/hostname"
    assert not isinstance(exc.value, UserError)
    assert list(tmp_path.glob("*.debugfs")) == []  # the script is removed either way
