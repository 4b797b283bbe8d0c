"""Filesystem images and the A/B disk image, built without root privileges on block devices and without
loop mounts: ``mkfs.ext4 -d``, ``mkfs.vfat`` + ``mcopy``, ``sfdisk`` on a plain file, and partition images
copied into the disk file at their offsets (sparse: holes stay holes).

Layout (MBR, so every Pi firmware can read it)::

    1 boot     FAT32   firmware, U-Boot, boot.scr, boot-state files
    2 rootfs A ext4    slot A (kernel, initrd, dtbs inside /boot)
    3 rootfs B ext4    slot B, same size
    4 data     ext4    device identity, agent state, app data (grown to the medium on first boot)

Everything is reproducible from the inputs and the build's epoch (``SOURCE_DATE_EPOCH``): filesystem UUIDs, hash seeds, the
MBR disk identifier and timestamps are derived from a seed string, never random.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ota_common.errors import ToolError, UserError
from ota_common.tools import run, tail

from .epoch import given_or_environment, tool_env

SECTOR = 512
MIB = 1 << 20
ALIGN_MIB = 4  # SD cards like 4 MiB erase-block alignment


@dataclass(frozen=True)
class Partition:
    number: int
    name: str
    start_mib: int
    size_mib: int
    mbr_type: str  # sfdisk type code: "c" FAT32 LBA, "83" Linux

    @property
    def offset(self) -> int:
        return self.start_mib * MIB

    @property
    def size(self) -> int:
        return self.size_mib * MIB


@dataclass(frozen=True)
class DiskLayout:
    partitions: tuple[Partition, ...]
    disk_id: int  # MBR disk identifier; PARTUUIDs are f"{disk_id:08x}-{n:02x}"

    @property
    def size(self) -> int:
        last = self.partitions[-1]
        return (last.start_mib + last.size_mib) * MIB

    def partuuid(self, number: int) -> str:
        return f"{self.disk_id:08x}-{number:02x}"

    def by_name(self, name: str) -> Partition:
        return next(p for p in self.partitions if p.name == name)


def seeded_uuid(seed: str) -> str:
    """A stable UUID derived from ``seed`` (reproducible builds: no random identifiers)."""
    return str(uuid.UUID(bytes=hashlib.sha256(seed.encode()).digest()[:16], version=4))


def plan_layout(*, slot_mib: int, boot_mib: int = 256, data_mib: int = 128, seed: str = "vv-ota") -> DiskLayout:
    """Partition plan for the A/B layout. Raises :class:`UserError` for sizes that cannot work."""
    for label, v, minimum in (("boot", boot_mib, 64), ("slot", slot_mib, 64), ("data", data_mib, 16)):
        if v < minimum:
            raise UserError(f"{label} partition of {v} MiB is too small (at least {minimum} MiB)")
    parts = []
    start = ALIGN_MIB
    for number, (name, size, kind) in enumerate(
        (("boot", boot_mib, "c"), ("rootfs-a", slot_mib, "83"), ("rootfs-b", slot_mib, "83"), ("data", data_mib, "83")),
        start=1,
    ):
        size = -(-size // ALIGN_MIB) * ALIGN_MIB
        parts.append(Partition(number, name, start, size, kind))
        start += size
    disk_id = int.from_bytes(hashlib.sha256(f"disk:{seed}".encode()).digest()[:4], "big") or 1
    return DiskLayout(tuple(parts), disk_id)


def make_ext4(image: Path, tree: Path, *, size_mib: int, label: str, seed: str, clamp_mtime: bool = True,
              epoch: int | None = None) -> None:
    """An ext4 filesystem of ``size_mib`` holding ``tree`` (owners and modes as in the tree).

    With an ``epoch`` (default: ``$SOURCE_DATE_EPOCH`` if set), inode times are made reproducible: ctime, atime
    and crtime are set to the file's mtime, and mtimes later than the epoch are clamped to it — unless
    ``clamp_mtime`` is False, for a tree whose times were already made reproducible (:func:`image.rootfs.normalise`).
    Raises :class:`UserError` when the tree does not fit or a path cannot be stored reproducibly,
    :class:`ToolError` when mkfs.ext4 or debugfs fails."""
    epoch = given_or_environment(epoch)
    image.unlink(missing_ok=True)
    used = _tree_size(tree)
    if used > size_mib * MIB * 0.95:
        raise UserError(
            f"{label}: the tree needs {used / MIB:.0f} MiB but the filesystem is {size_mib} MiB; raise the slot size"
        )
    fs_uuid = seeded_uuid(f"fs:{seed}")
    hash_seed = seeded_uuid(f"hash:{seed}")
    with open(image, "wb") as f:
        f.truncate(size_mib * MIB)
    run(
        ["mkfs.ext4", "-q", "-F", "-d", tree, "-L", label[:16], "-U", fs_uuid, "-E", f"hash_seed={hash_seed},root_owner=0:0",
         "-m", "1", "-b", "4096", image],
        stage=f"filesystem {label}",
        env={} if epoch is None else {**tool_env(epoch), "E2FSPROGS_FAKE_TIME": str(epoch)},
    )
    if epoch is not None:
        _clamp_inode_times(image, tree, epoch, label, clamp_mtime)


def _clamp_inode_times(image: Path, tree: Path, epoch: int, label: str, clamp_mtime: bool = True) -> None:
    """mkfs.ext4 1.47.0 copies each file's ctime and atime from the host, where they are "now", and sets
    crtime to the (fake) current time: set all three to the file's mtime — clamped to ``epoch`` (as
    SOURCE_DATE_EPOCH means) when ``clamp_mtime`` — with one debugfs run (~1 s per 15k files). The same tree
    gives the same bytes, and — what delta updates need — a file that did not change between two releases
    keeps an identical inode although the releases have different epochs, so the inode tables differ only
    where files changed (docs/delta.md)."""

    def fields(path: str, rel: str) -> list[str]:
        mtime = os.lstat(path).st_mtime
        t = min(int(mtime), epoch) if clamp_mtime else int(mtime)
        lines = [f'sif "{rel}" {field} @{t}' for field in ("ctime", "atime", "crtime")]
        if clamp_mtime and mtime > epoch:
            lines.append(f'sif "{rel}" mtime @{epoch}')
        return lines

    lines = fields(str(tree), "/")
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*dirnames, *filenames]:
            rel = "/" + os.path.relpath(os.path.join(dirpath, name), tree)
            if '"' in rel or "\n" in rel:
                raise UserError(f"{label}: path {rel!r} cannot be stored reproducibly (quote or newline in its name)")
            lines += fields(os.path.join(dirpath, name), rel)
    script = image.with_name(image.name + ".debugfs")
    script.write_text("\n".join(lines) + "\n")
    try:
        proc = run(["debugfs", "-w", "-f", script, image], stage=f"filesystem {label} (timestamps)",
                   env={"E2FSPROGS_FAKE_TIME": str(epoch)})
    finally:
        script.unlink()
    # debugfs reports per-command failures on stderr but exits 0
    errors = [line for line in proc.stderr.decode(errors="replace").splitlines() if line and not line.startswith("debugfs ")]
    if errors:
        raise ToolError(f"{label}: setting timestamps failed: {errors[0]}", argv=proc.args,
                        returncode=proc.returncode, stderr=tail("\n".join(errors)))


def _tree_size(tree: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += -(-st.st_size // 4096) * 4096
    return total


def make_vfat(image: Path, files: Mapping[str, Path], *, size_mib: int, label: str, seed: str,
              epoch: int | None = None) -> None:
    """A FAT32 filesystem of ``size_mib`` holding ``files`` (``{"dir/name": source}``), built with mtools; with an
    ``epoch`` (default: ``$SOURCE_DATE_EPOCH`` if set), reproducible."""
    image.unlink(missing_ok=True)
    volume_id = hashlib.sha256(f"vfat:{seed}".encode()).hexdigest()[:8]
    epoch = given_or_environment(epoch)
    invariant = ["--invariant"] if epoch is not None else []
    run(["mkfs.vfat", *invariant, "-F", "32", "-n", label[:11].upper(), "-i", volume_id, "-C", image, str(size_mib * 1024)],
        stage=f"filesystem {label}", env=tool_env(epoch))
    env = {"MTOOLS_SKIP_CHECK": "1", **tool_env(epoch)}
    made: set[str] = set()
    for dest in sorted(files):
        parts = dest.strip("/").split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                run(["mmd", "-i", image, f"::/{d}"], stage=f"filesystem {label}", env=env)
                made.add(d)
        # no -m: file times are SOURCE_DATE_EPOCH (mtools honours it) rather than each source's mtime
        run(["mcopy", "-i", image, "-o", files[dest], f"::/{dest.strip('/')}"], stage=f"filesystem {label}", env=env)


def assemble(disk: Path, layout: DiskLayout, images: Mapping[str, Path]) -> None:
    """Write the MBR with sfdisk and copy each partition image (by partition name) to its offset."""
    disk.unlink(missing_ok=True)
    with open(disk, "wb") as f:
        f.truncate(layout.size)
    script = [f"label: dos\nlabel-id: 0x{layout.disk_id:08x}\nunit: sectors\n"]
    for p in layout.partitions:
        boot = ", bootable" if p.name == "boot" else ""
        script.append(f"start={p.offset // SECTOR}, size={p.size // SECTOR}, type={p.mbr_type}{boot}\n")
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", disk], stage="partition table", input="".join(script).encode())
    with open(disk, "r+b") as out:
        for name, src in images.items():
            part = layout.by_name(name)
            size = src.stat().st_size
            if size > part.size:
                raise UserError(f"{name} image is {size} bytes, larger than its partition ({part.size})")
            _copy_sparse(src, out, part.offset)


def _copy_sparse(src: Path, out: object, offset: int) -> None:
    """Copy the data regions of ``src`` into ``out`` at ``offset``; holes are skipped (they read as zeros in
    the freshly truncated disk file)."""
    fd_out = out.fileno()  # type: ignore[attr-defined]
    block = 4 << 20
    zero = bytes(block)
    with open(src, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data_start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # no more data
                break
            hole = os.lseek(fd, data_start, os.SEEK_HOLE)
            pos = data_start
            while pos < hole:
                n = min(block, hole - pos)
                chunk = os.pread(fd, n, pos)
                if chunk != zero[: len(chunk)]:
                    os.pwrite(fd_out, chunk, offset + pos)
                pos += len(chunk)


def partitions_of(disk: Path) -> list[dict[str, object]]:
    """The partition table as sfdisk reports it (for checks and tests)."""
    out = run(["sfdisk", "--json", disk], stage="inspect disk").stdout
    table = json.loads(out)["partitiontable"]
    return list(table["partitions"])


def bmap(disk: Path) -> Path:
    """Write ``disk.bmap`` next to the image (bmaptool format) and return its path."""
    target = disk.with_name(disk.name + ".bmap")
    run(["bmaptool", "create", "-o", target, disk], stage="bmap")
    return target
