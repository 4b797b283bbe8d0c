"""The streaming install: verify, decide, write the inactive slot, read it back, only then arm the boot.

Order of events, each a precondition of the next (nothing on the device changes before step 3):
1. the artifact's manifest signature is verified against the trusted keys (:class:`ArtifactReader` does this
   before it yields any payload byte);
2. the header is checked against this device: device type, depends, payload type, version (no downgrade
   unless the deployment allows it), size against the slot;
3. the payload is decompressed straight into the inactive slot while the reader hashes it; a mismatch at the
   end raises and the slot is simply not armed;
4. the slot is flushed, its page cache dropped, and the written range read back and hashed again;
5. the caller arms the boot state (:func:`arm`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifacts import ArtifactReader, Verifier
from artifacts.blockwrite import BLOCK_SIZE, SYNC_EVERY, BlockWriter, OldContent, SlotReadBack, block_digest
from artifacts.delta import DELTA_PAYLOAD_TYPE, DeltaError
from artifacts.format import SECURITY_VERSION_KEY
from artifacts.header import ArtifactHeader
from ota_common.errors import ArtifactError, IncompatibleArtifact

from .blockindex import SlotIndex
from .bootenv import BootEnv
from .faults import fault

log = logging.getLogger(__name__)

ROOTFS = "rootfs-image"
SECURITY_VERSION = SECURITY_VERSION_KEY
DELTA = DELTA_PAYLOAD_TYPE
WRITE_SYNC_EVERY = SYNC_EVERY
VERIFY_CHUNK = 1024 * 1024
ZERO_BLOCK = BLOCK_SIZE  # all-zero blocks of this size (aligned) become zero-range requests


class SlotVerifyError(ArtifactError):
    """The slot's content read back does not match what was written (bad medium)."""


@dataclass(frozen=True)
class DeviceFacts:
    """What the device is and runs: compared with an artifact's header."""

    device_type: str
    artifact_name: str
    provides: Mapping[str, str]  # incl. rootfs-image.version and (when known) rootfs-image.checksum
    groups: Sequence[str] = ()
    security_floor: int = 0  # the lowest signed security version this device still installs (device_hooks.trust)


@dataclass(frozen=True)
class InstallResult:
    artifact_name: str
    provides: dict[str, str]
    size: int
    sha256: str
    scripts: dict[str, bytes]
    seconds: float
    write_seconds: float = 0.0  # download + decompress + write (they run as one stream)
    verify_seconds: float = 0.0  # the read-back
    zeroed: int = 0  # bytes zeroed by range requests instead of written
    written: int = 0  # bytes written to the slot (pwrite)
    skipped: int = 0  # bytes not written because the slot already held them
    blocks: int = 0  # blocks of the image (BLOCK_SIZE bytes, the last one shorter)
    skipped_blocks: int = 0
    index_generation: str | None = None  # of the block index written after the read-back (for the slot record)
    index_note: str = ""  # whether the old block index was used, and why not

    def write_summary(self) -> str:
        """One line for the logs: what the install wrote, zeroed and skipped."""
        return (f"{self.written} bytes written, {self.zeroed} zeroed by range, {self.skipped} unchanged "
                f"({self.skipped_blocks} of {self.blocks} blocks skipped)")


class SlotWriter(BlockWriter):
    """Writes a slot front to back (:class:`artifacts.blockwrite.BlockWriter`). Aligned all-zero blocks are not
    copied through the page cache: they are collected into ranges and zeroed by the kernel
    (:class:`artifacts.zeroing.Zeroer`: ``BLKZEROOUT`` on a block device, which issues WRITE ZEROES or writes zero
    pages itself; the medium may not even be written). About 40 % of a root filesystem image is free space, so
    this saves that much CPU on a slow board. Where the call is not supported the zeros are written as usual,
    and always with ``fast_zero=False`` (``bench/delta.py`` measures both). Given ``old`` (what the slot holds:
    the block index or the slot read back), blocks the slot already holds are not written at all."""

    def __init__(self, fd: int, *, on_write: Callable[[], None] | None = None, fast_zero: bool = True,
                 old: OldContent | None = None, digests: bool = False) -> None:
        super().__init__(fd, old=old, digests=digests, fast_zero=fast_zero, on_block=on_write)


def version_key(v: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order of version strings: ``1.10.0 > 1.9.2``, ``1.0.0 > 1.0.0-rc1`` (a pre-release suffix sorts
    before the release)."""
    main, _, pre = v.partition("-")
    parts: list[tuple[int, int | str]] = []
    for piece in re.findall(r"\d+|[A-Za-z]+", main):
        parts.append((1, int(piece)) if piece.isdigit() else (0, piece))
    parts.append((1, 0) if not pre else (0, 0))  # release > pre-release of the same numbers
    for piece in re.findall(r"\d+|[A-Za-z]+", pre):
        parts.append((1, int(piece)) if piece.isdigit() else (0, piece))
    return tuple(parts)


def security_version(provides: Mapping[str, str]) -> int:
    """The signed security version of an artifact or slot (0 when it names none). Raises
    :class:`IncompatibleArtifact` for a value that is not a small non-negative integer."""
    raw = provides.get(SECURITY_VERSION, "0")
    if not re.fullmatch(r"[0-9]{1,9}", str(raw)):
        raise IncompatibleArtifact(f"{SECURITY_VERSION} {str(raw)[:40]!r} is not a non-negative integer")
    return int(raw)


def check_compatible(header: ArtifactHeader, device: DeviceFacts, *, allow_downgrade: bool = False) -> dict[str, str]:
    """Raise :class:`IncompatibleArtifact` with the reason, or return the provides the slot will have. The
    signed security version must not be below the device's floor; ``allow_downgrade`` (from the deployment)
    only allows an older version at the same or a higher security version."""
    info = header.info
    if device.device_type not in info.device_types:
        raise IncompatibleArtifact(
            f"artifact {info.artifact_name!r} is for device types {', '.join(info.device_types)}, "
            f"this device is {device.device_type!r}"
        )
    if list(info.payload_types) not in ([ROOTFS], [DELTA]) or len(header.type_infos) != 1:
        raise IncompatibleArtifact(
            f"artifact {info.artifact_name!r} has payloads {list(info.payload_types)}; this agent installs "
            f"exactly one {ROOTFS} or {DELTA} payload"
        )
    if info.payload_types[0] == DELTA and "rootfs-image.checksum" not in header.type_infos[0].depends:
        raise IncompatibleArtifact(f"delta artifact {info.artifact_name!r} does not name the image it applies to "
                                   "(no rootfs-image.checksum in its depends)")
    if info.depends_artifact_names and device.artifact_name not in info.depends_artifact_names:
        raise IncompatibleArtifact(
            f"artifact {info.artifact_name!r} depends on artifact {', '.join(info.depends_artifact_names)}; "
            f"this device runs {device.artifact_name!r}"
        )
    if info.depends_groups and not set(info.depends_groups) & set(device.groups):
        raise IncompatibleArtifact(f"artifact depends on group {', '.join(info.depends_groups)}")
    ti = header.type_infos[0]
    for key, want in ti.depends.items():
        have = device.provides.get(key)
        wanted = (want,) if isinstance(want, str) else tuple(want)
        if have is None or have not in wanted:
            raise IncompatibleArtifact(
                f"unmet depends: the artifact needs {key}={'|'.join(wanted)}, this device has "
                f"{key}={have if have is not None else '(unknown)'}"
            )
    provides = dict(ti.provides)
    security = security_version(provides)
    if security < device.security_floor:
        raise IncompatibleArtifact(f"security version {security} of the artifact is below this device's floor "
                                   f"{device.security_floor}: refused whatever the deployment allows")
    new_version = provides.get("rootfs-image.version")
    cur_version = device.provides.get("rootfs-image.version")
    if new_version and cur_version and not allow_downgrade and version_key(new_version) < version_key(cur_version):
        raise IncompatibleArtifact(
            f"artifact version {new_version} is older than the running {cur_version}; the deployment does not "
            "allow a downgrade"
        )
    provides["artifact_name"] = info.artifact_name
    return provides


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def stream_install(
    source: Any,
    *,
    verifiers: Sequence[Verifier],
    device: DeviceFacts,
    target: Path,
    allow_downgrade: bool = False,
    source_size: int | None = None,
    on_header: Callable[[ArtifactHeader, dict[str, str]], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    active: Path | None = None,
    index: SlotIndex | None = None,
) -> InstallResult:
    """Verify and write the artifact read from ``source`` into the slot device ``target``.

    A ``rootfs-delta`` artifact is applied with the running slot ``active`` as its source (see
    :func:`_apply_delta`); it is armed only if the result equals the signed target checksum.

    ``on_header`` runs after the signature and compatibility checks and before the first write (the agent
    runs the ArtifactInstall_Enter scripts there and reports ``installing``).

    ``index``: the block index of the target slot (:mod:`.blockindex`). It is read and removed before the first
    write; blocks the slot already holds (by the index, or by reading the slot when there is no usable index)
    are not written; after the read-back a new index is written, whose generation the result carries for the
    slot's record. Without it every block is written.

    Raises :class:`ArtifactError` (signature, structure, checksum, compatibility) or ``OSError`` (the medium)."""
    started = time.monotonic()
    if not verifiers:
        raise ArtifactError("no trusted release keys on this device: refusing to install anything")
    reader = ArtifactReader(source, verifiers=verifiers, require_signature=True, source_size=source_size,
                            what="artifact")
    header = reader.read_header()
    provides = check_compatible(header, device, allow_downgrade=allow_downgrade)
    files = reader.files()
    pf = next(files, None)
    if pf is None:
        raise ArtifactError("the artifact has no payload file")
    if on_header is not None:
        on_header(header, provides)
    if header.info.payload_types[0] == DELTA:
        if active is None:
            raise IncompatibleArtifact("a delta artifact needs the running slot as its source; none was given")
        return _apply_delta(reader, files, pf, header, provides, active, target, started, progress, index)
    fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    try:
        capacity = _device_size(fd)
        if pf.size > capacity:
            raise IncompatibleArtifact(
                f"the root filesystem image is {pf.size} bytes but slot {target} holds only {capacity}"
            )
        with _OldSlot(index, target, capacity) as old:
            writer = SlotWriter(fd, old=old.content, digests=old.indexing)
            writer.on_block = lambda: fault("install-write", writer.pos)
            reported = 0
            for chunk in pf.chunks():
                writer.write(chunk)
                if progress and writer.pos - reported >= WRITE_SYNC_EVERY:
                    reported = writer.pos
                    progress(writer.pos, pf.size)
            written = writer.finish()
    finally:
        os.close(fd)
    assert pf.sha256 is not None
    if next(files, None) is not None:
        raise ArtifactError("the artifact has more than one payload file")
    if not reader.complete:
        raise ArtifactError("the artifact did not end cleanly")
    if written != pf.size:
        raise ArtifactError(f"the payload ended after {written} of {pf.size} bytes")
    streamed = time.monotonic()
    verify_slot(target, pf.size, pf.sha256)
    provides.setdefault("rootfs-image.checksum", pf.sha256)
    generation = old.save(writer, capacity, pf.size, pf.sha256)
    done = time.monotonic()
    return _result(header, provides, pf.size, pf.sha256, started, streamed, done, writer, generation, old.note)


def _result(header: ArtifactHeader, provides: dict[str, str], size: int, sha256: str, started: float, streamed: float,
            done: float, writer: BlockWriter, generation: str | None, note: str) -> InstallResult:
    return InstallResult(header.info.artifact_name, provides, size, sha256, dict(header.scripts), done - started,
                         streamed - started, done - streamed, writer.zeroed, writer.written, writer.skipped,
                         writer.blocks, writer.skipped_blocks, generation, note)


class _OldSlot:
    """What the target slot holds before an install, for the block writer: the block index when it can be used,
    else the slot itself read back (``with``: its read descriptor is open inside); nothing without an index.
    Entering it removes the index file (before the caller's first write)."""

    def __init__(self, index: SlotIndex | None, target: Path, capacity: int) -> None:
        self.index = index
        self.target = target
        self.capacity = capacity
        self.content: OldContent | None = None
        self.note = ""
        self._fd: int | None = None

    @property
    def indexing(self) -> bool:
        return self.index is not None and self.index.enabled

    def __enter__(self) -> _OldSlot:
        if self.index is None:
            return self
        self.content, self.note = self.index.take(self.target, self.capacity)
        if self.content is None and self.index.enabled:
            self._fd = os.open(self.target, os.O_RDONLY | os.O_CLOEXEC)
            self.content = SlotReadBack(self._fd)
        log.info("%s", self.note)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def save(self, writer: BlockWriter, capacity: int, size: int, sha256: str) -> str | None:
        """After the read-back: the new index of the slot (its generation), None without one. A failure to
        write it costs the next install writes, not this one: it is logged."""
        if self.index is None or not self.index.enabled:
            return None
        try:
            return self.index.save(device_size=capacity, payload_size=size, checksum=sha256,
                                   digests=bytes(writer.index))
        except OSError as e:
            log.warning("the block index of the slot could not be written (%s): the next install reads the slot",
                        e.strerror or e)
            return None


def _apply_delta(reader: ArtifactReader, files: Any, pf: Any, header: ArtifactHeader, provides: dict[str, str],
                 active: Path, target: Path, started: float,
                 progress: Callable[[int, int], None] | None, index: SlotIndex | None) -> InstallResult:
    """Rebuild the target image from the running slot and the delta, straight into ``target``: memory stays at a
    few MiB (the source is read with ``pread`` where the delta says). The slot is then read back against the
    target checksum the artifact's signed header provides, as after a full install; that read-back is the only
    hash of the result (hashing the stream as well doubled the CPU time of a small update under QEMU). A
    result that does not read back as the signed image fails as a :class:`DeltaError` (the agent's next try
    takes the full artifact), saying what can cause it."""
    from artifacts.delta.apply import apply_delta, mismatch_reason, peek_header  # standard library only

    want = header.type_infos[0].provides.get("rootfs-image.checksum")
    if not want:
        raise IncompatibleArtifact("delta artifact does not provide rootfs-image.checksum: nothing to check against")
    dh, payload = peek_header(pf.chunks())
    if dh.target_sha256 != want:
        raise DeltaError(f"the delta's target checksum {dh.target_sha256[:16]}… is not the signed one {want[:16]}…")
    src = os.open(active, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        try:
            capacity = _device_size(fd)
            if dh.target_size > capacity:
                raise IncompatibleArtifact(
                    f"the delta makes a {dh.target_size}-byte image but slot {target} holds only {capacity}")

            def step(written: int, total: int) -> None:
                fault("install-write", written)
                if progress:
                    progress(written, total)

            with _OldSlot(index, target, capacity) as old:
                writer = BlockWriter(fd, old=old.content, digests=old.indexing)
                applied = apply_delta(payload, src, fd, progress=step, blocks=writer, hash_target=False)
        finally:
            os.close(fd)
        if next(files, None) is not None:
            raise ArtifactError("the artifact has more than one payload file")
        if not reader.complete:
            raise ArtifactError("the artifact did not end cleanly")
        streamed = time.monotonic()
        digest = slot_sha256(target, applied.target_size)
        if digest != want:
            raise DeltaError(mismatch_reason(dh, digest, src) + " (or the slot did not keep what was written: "
                             "the next try takes the full artifact)")
    finally:
        os.close(src)
    generation = old.save(writer, capacity, applied.target_size, want)
    done = time.monotonic()
    log.info("delta applied: %d bytes copied from the running slot, %d new, %d zero", applied.copied_bytes,
             applied.literal_bytes, applied.zero_bytes)
    return _result(header, provides, applied.target_size, want, started, streamed, done, writer, generation,
                   old.note)


def slot_sha256(target: Path, size: int, *, blocks: bytearray | None = None) -> str:
    """The sha256 of the first ``size`` bytes of the slot, read bypassing the page cache as far as the kernel
    lets us. With ``blocks``, the same read also appends the digest of each block of those bytes
    (:func:`artifacts.blockwrite.block_digest`, the block index's). Raises :class:`SlotVerifyError` when the slot
    is shorter, ``OSError`` for the medium."""
    from concurrent.futures import ThreadPoolExecutor

    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h = hashlib.sha256()
        pending = b""  # the start of a block a short read cut (blocks only)
        left = size
        # the next chunk is read while this one is hashed (both release the GIL): on a Pi, whose cores lack
        # the SHA-2 instructions, reading the card and hashing take the same order of time
        with ThreadPoolExecutor(1, thread_name_prefix="read-back") as reader:
            ahead = reader.submit(os.read, fd, min(VERIFY_CHUNK, left))
            while left:
                data = ahead.result()
                if not data:
                    raise SlotVerifyError(f"slot {target} ended {left} bytes early when read back")
                left -= len(data)
                if left:
                    ahead = reader.submit(os.read, fd, min(VERIFY_CHUNK, left))
                h.update(data)
                if blocks is not None:
                    if pending:
                        data, pending = pending + data, b""
                    whole = len(data) if not left else len(data) - len(data) % BLOCK_SIZE
                    view = memoryview(data)
                    for off in range(0, whole, BLOCK_SIZE):
                        blocks += block_digest(view[off:min(off + BLOCK_SIZE, whole)])
                    pending = bytes(view[whole:])
    finally:
        os.close(fd)
    return h.hexdigest()


def verify_slot(target: Path, size: int, sha256: str) -> None:
    """Read back ``size`` bytes of the slot (:func:`slot_sha256`) and compare them with ``sha256``."""
    digest = slot_sha256(target, size)
    if digest != sha256:
        raise SlotVerifyError(f"slot {target} read back with checksum {digest[:16]}…, expected {sha256[:16]}…")


def arm(env: BootEnv, target_part: int) -> dict[str, str]:
    """One atomic write of the boot state: boot ``target_part`` next, as a trial."""
    return env.update({"mender_boot_part": str(target_part), "upgrade_available": "1", "bootcount": "0"},
                      fault_point="arm-write")
