"""Which slot is running and where the other one is.

The running slot comes from the kernel command line that ``boot.scr`` wrote (``root=PARTUUID=<disk>-0N``,
``ota.slot=A|B``, ``ota.trial=0|1``); the slot devices are ``/dev/disk/by-partuuid/<disk>-02|03`` unless the
configuration names them (host tests use plain files). The agent refuses to write a slot that is the running
root or is mounted, or whose mount state it cannot read.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ota_common.errors import OTAError

from .config import Config

PART_A, PART_B = 2, 3


class SlotError(OTAError):
    """The slot layout cannot be determined, or a write would touch the running slot."""


@dataclass(frozen=True)
class Slots:
    running: int  # partition number 2 (A) or 3 (B)
    trial: bool  # boot.scr booted this slot with upgrade_available=1
    devices: dict[int, Path]

    @property
    def inactive(self) -> int:
        return other(self.running)

    def device(self, part: int) -> Path:
        return self.devices[part]


def other(part: int) -> int:
    return PART_B if part == PART_A else PART_A


def slot_name(part: int) -> str:
    return "A" if part == PART_A else "B"


def parse_cmdline(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for word in text.split():
        name, _, value = word.partition("=")
        out[name] = value
    return out


def detect(cfg: Config) -> Slots:
    try:
        args = parse_cmdline(Path(cfg.paths.cmdline).read_text())
    except OSError as e:
        raise SlotError(f"cannot read the kernel command line {cfg.paths.cmdline}: {e.strerror}") from None
    root = args.get("root", "")
    m = re.fullmatch(r"PARTUUID=([0-9a-fA-F]{8})-0([23])", root)
    if m is None:
        raise SlotError(f"root={root!r} on the kernel command line is not an A/B slot (PARTUUID=<disk>-02|03)")
    disk, running = m.group(1).lower(), int(m.group(2))
    devices = {
        PART_A: Path(cfg.paths.slot_a or f"/dev/disk/by-partuuid/{disk}-02"),
        PART_B: Path(cfg.paths.slot_b or f"/dev/disk/by-partuuid/{disk}-03"),
    }
    return Slots(running=running, trial=args.get("ota.trial") == "1", devices=devices)


def check_writable_target(slots: Slots, part: int, mounts: Path = Path("/proc/mounts")) -> Path:
    """The device of ``part``, after checking it is not the running slot and, for a block device, not mounted.
    Raises :class:`SlotError` otherwise, and also when ``mounts`` cannot be read (the check fails closed)."""
    if part == slots.running:
        raise SlotError(f"refusing to write slot {slot_name(part)}: it is the running slot")
    dev = slots.device(part)
    try:
        st = os.stat(dev)
    except OSError as e:
        raise SlotError(f"slot {slot_name(part)} device {dev}: {e.strerror}") from None
    running_dev = slots.device(slots.running)
    try:
        rst = os.stat(running_dev)
        if (stat.S_ISBLK(st.st_mode) and st.st_rdev == rst.st_rdev) or (st.st_ino, st.st_dev) == (rst.st_ino, rst.st_dev):
            raise SlotError(f"slot devices {dev} and {running_dev} are the same device")
    except FileNotFoundError:
        pass
    if stat.S_ISBLK(st.st_mode):
        real = os.path.realpath(dev)
        try:
            table = mounts.read_text()
        except OSError as e:  # fail closed: a slot not known to be unmounted is not written
            raise SlotError(f"refusing to write slot {slot_name(part)}: cannot read {mounts} to check that {real} "
                            f"is not mounted: {e.strerror}") from None
        for line in table.splitlines():
            src = line.split(" ", 1)[0]
            if src.startswith("/dev/") and os.path.realpath(src) == real:
                raise SlotError(f"refusing to write slot {slot_name(part)}: {real} is mounted")
    return dev
