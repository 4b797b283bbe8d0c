"""The slot the agent writes: never the running one, never a mounted one, and never one whose mount state it
cannot read (the check fails closed)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from device_hooks.slots import PART_A, PART_B, SlotError, Slots, check_writable_target


@pytest.fixture
def block_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Slots:
    """Slots A (running) and B as the agent sees them: by-partuuid links to /dev nodes that are block devices
    (os.stat faked for the two links only: a test makes no device nodes)."""
    a, b = tmp_path / "d00dfeed-02", tmp_path / "d00dfeed-03"
    a.symlink_to("/dev/ota-test-mmcblk0p2")
    b.symlink_to("/dev/ota-test-mmcblk0p3")
    real_stat = os.stat
    fake = {str(a): SimpleNamespace(st_mode=stat.S_IFBLK | 0o660, st_rdev=0xB302, st_ino=1, st_dev=5),
            str(b): SimpleNamespace(st_mode=stat.S_IFBLK | 0o660, st_rdev=0xB303, st_ino=2, st_dev=5)}

    def fake_stat(path: object, *args: object, **kw: object) -> object:
        return fake.get(os.fspath(path)) or real_stat(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", fake_stat)
    return Slots(running=PART_A, trial=False, devices={PART_A: a, PART_B: b})


def test_the_inactive_slot_is_writable_when_it_is_not_mounted(block_slots: Slots, tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/ota-test-mmcblk0p2 / ext4 ro 0 0\nproc /proc proc rw 0 0\n")
    assert check_writable_target(block_slots, PART_B, mounts) == block_slots.device(PART_B)


def test_the_running_slot_is_never_written(block_slots: Slots, tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("")
    with pytest.raises(SlotError, match="it is the running slot"):
        check_writable_target(block_slots, PART_A, mounts)


def test_a_mounted_slot_is_not_written(block_slots: Slots, tmp_path: Path) -> None:
    """Someone mounted the other slot to look at it: writing under a mounted filesystem would corrupt it."""
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/ota-test-mmcblk0p2 / ext4 ro 0 0\n/dev/ota-test-mmcblk0p3 /mnt ext4 rw 0 0\n")
    with pytest.raises(SlotError, match="refusing to write slot B: /dev/ota-test-mmcblk0p3 is mounted"):
        check_writable_target(block_slots, PART_B, mounts)


def test_unreadable_mounts_refuse_the_write(block_slots: Slots, tmp_path: Path) -> None:
    """/proc/mounts cannot be read (no /proc in a confined service, a sandbox that hides it): the agent cannot
    tell whether the slot is mounted, so it does not write it. Earlier it went ahead silently."""
    missing = tmp_path / "no-proc" / "mounts"
    with pytest.raises(SlotError, match=r"refusing to write slot B: cannot read .*no-proc/mounts to check that "
                                        r"/dev/ota-test-mmcblk0p3 is not mounted"):
        check_writable_target(block_slots, PART_B, missing)
