"""Whether a block device may receive a card (``build.py provision --to /dev/sdX``): writing the wrong disk destroys
it, so every doubt refuses, and nothing overrides the refusal.

Refused: a path that is not a block device, a partition (the card is a whole disk), a disk that holds ``/`` or
``/boot`` (the system disk), a disk with a partition that is mounted, used as swap or held by another device
(device mapper, RAID, LVM), a read-only disk, and a disk smaller than the image. The facts come from
``/proc/self/mountinfo``, ``/proc/swaps`` and ``/sys`` (``/sys/dev/block/MAJ:MIN``, ``/sys/block/<disk>/…``), whose
roots :class:`SystemView` lets tests replace with a fake tree (no root needed).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ota_common.errors import UserError

#: mount points that make a disk the system disk
SYSTEM_MOUNTS = ("/", "/boot", "/boot/firmware", "/boot/efi", "/usr")


class TargetRefused(UserError):
    """The block device must not receive the card; the message says why."""


@dataclass(frozen=True)
class SystemView:
    """Where the facts are read (tests pass a fake tree and a fake ``stat``)."""

    sys_root: Path = Path("/sys")
    mountinfo: Path = Path("/proc/self/mountinfo")
    swaps: Path = Path("/proc/swaps")
    stat: Callable[[Path], os.stat_result] = field(default=os.stat)


@dataclass(frozen=True)
class Mount:
    devnum: str  # MAJ:MIN
    mount_point: str
    source: str


def _unescape(text: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as ``\040`` etc."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def read_mounts(path: Path) -> list[Mount]:
    """The mounts of ``/proc/self/mountinfo``. Raises TargetRefused when it cannot be read (fail closed)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise TargetRefused(f"cannot read {path} ({e.strerror}): cannot tell what is mounted, so nothing is "
                            "written") from None
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        sep = fields.index("-")
        source = fields[sep + 2] if len(fields) > sep + 2 else ""
        mounts.append(Mount(fields[2], _unescape(fields[4]), _unescape(source)))
    return mounts


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class DiskFacts:
    name: str  # sdb
    sysdir: Path  # .../block/sdb
    devnums: dict[str, str]  # MAJ:MIN → name, for the disk and its partitions
    holders: dict[str, str]  # MAJ:MIN → "dm-0 (on sdb1)": devices built on them
    size: int  # bytes
    read_only: bool


def disk_facts(device: Path, view: SystemView) -> DiskFacts:
    """What sysfs says about the whole disk ``device``. Raises TargetRefused for anything else."""
    try:
        st = view.stat(device)
    except FileNotFoundError:
        raise TargetRefused(f"{device}: no such device") from None
    except OSError as e:
        raise TargetRefused(f"{device}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise TargetRefused(f"{device} is not a block device: give the card's whole disk (/dev/sdX, /dev/mmcblkN)")
    devnum = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    link = view.sys_root / "dev" / "block" / devnum
    if not link.exists():
        raise TargetRefused(f"{device} ({devnum}) is not in {view.sys_root}/dev/block: cannot check it, so nothing "
                            "is written")
    sysdir = Path(os.path.realpath(link))
    if (sysdir / "partition").exists():
        raise TargetRefused(f"{device} is a partition of {sysdir.parent.name}: give the whole disk "
                            f"(/dev/{sysdir.parent.name})")
    devnums = {devnum: sysdir.name}
    for part in sorted(sysdir.iterdir()):
        if (part / "partition").exists():
            devnums[_read(part / "dev")] = part.name
    holders: dict[str, str] = {}
    _add_holders(view, [sysdir, *(sysdir / n for n in devnums.values() if n != sysdir.name)], holders)
    try:
        size = int(_read(sysdir / "size")) * 512
    except ValueError:
        raise TargetRefused(f"{device}: its size cannot be read from {sysdir}/size") from None
    return DiskFacts(sysdir.name, sysdir, devnums, holders, size, _read(sysdir / "ro") == "1")


def _add_holders(view: SystemView, dirs: list[Path], found: dict[str, str], depth: int = 0) -> None:
    """Devices built on these (``holders/``: dm-crypt, LVM, RAID), recursively: their mounts count too."""
    for d in dirs:
        holders = d / "holders"
        if not holders.is_dir() or depth > 8:
            continue
        for h in sorted(holders.iterdir()):
            hdir = view.sys_root / "class" / "block" / h.name
            found[_read(hdir / "dev") or f"holder:{h.name}"] = f"{h.name} (on {d.name})"
            _add_holders(view, [hdir], found, depth + 1)


def check_target(device: Path, image_size: int, view: SystemView | None = None) -> DiskFacts:
    """Refuse (TargetRefused) unless ``device`` is a whole, unused, writable disk of at least ``image_size``
    bytes that is not the system disk. Returns what was found."""
    view = view or SystemView()
    facts = disk_facts(device, view)
    known = {**facts.devnums, **facts.holders}
    plain = {n.split(" ", 1)[0] for n in known.values()}
    used = [m for m in read_mounts(view.mountinfo)
            if m.devnum in known or (m.source.startswith("/dev/") and Path(m.source).name in plain)]
    system = sorted({m.mount_point for m in used if m.mount_point in SYSTEM_MOUNTS})
    if system:
        raise TargetRefused(f"{device} holds {', '.join(system)}: it is this machine's system disk (never "
                            "overwritten)")
    if used:
        m = used[0]
        raise TargetRefused(f"{device}: {known.get(m.devnum, Path(m.source).name)} is mounted on "
                            f"{m.mount_point}: unmount every partition of the card first")
    try:
        swaps = view.swaps.read_text().splitlines()[1:]
    except OSError:
        swaps = []
    for line in swaps:
        if line.split() and Path(line.split()[0]).name in plain:
            raise TargetRefused(f"{device}: {Path(line.split()[0]).name} is in use as swap")
    if facts.holders:
        raise TargetRefused(f"{device} is in use by {sorted(facts.holders.values())[0]}: release it first")
    if facts.read_only:
        raise TargetRefused(f"{device} is read-only (an SD card's lock switch?)")
    if facts.size < image_size:
        raise TargetRefused(f"{device} holds {facts.size / 1e9:.2f} GB, smaller than the card image "
                            f"({image_size / 1e9:.2f} GB)")
    return facts


__all__ = ["SYSTEM_MOUNTS", "DiskFacts", "Mount", "SystemView", "TargetRefused", "check_target", "read_mounts"]
