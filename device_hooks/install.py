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
from artifacts.delta import DELTA_PAYLOAD_TYPE, DeltaError
from artifacts.format import SECURITY_VERSION_KEY
from artifacts.header import ArtifactHeader
from artifacts.zeroing import Zeroer
from ota_common.errors import ArtifactError, IncompatibleArtifact

from .bootenv import BootEnv
from .faults import fault

log = logging.getLogger(__name__)

ROOTFS = "rootfs-image"
SECURITY_VERSION = SECURITY_VERSION_KEY
DELTA = DELTA_PAYLOAD_TYPE
WRITE_SYNC_EVERY = 32 * 1024 * 1024
VERIFY_CHUNK = 1024 * 1024
ZERO_BLOCK = 64 * 1024  # all-zero blocks of this size (aligned) become zero-range requests
_ZEROS = bytes(ZERO_BLOCK)


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


class SlotWriter:
    """Writes a slot front to back. Aligned all-zero blocks are not copied through the page cache: they are
    collected into ranges and zeroed by the kernel (:class:`artifacts.zeroing.Zeroer`: ``BLKZEROOUT`` on a
    block device, which issues WRITE ZEROES or writes zero pages itself; the medium may not even be
    written). About 40 % of a root filesystem image is free space, so this saves that much CPU on a slow
    board. Where the call is not supported the zeros are written as usual, and always with ``fast_zero=False``
    (``bench/delta.py`` measures both)."""

    def __init__(self, fd: int, *, on_write: Callable[[], None] | None = None, fast_zero: bool = True) -> None:
        self.fd = fd
        self.pos = 0  # everything before it is written or zeroed (or queued in the zero range)
        self.zero_from: int | None = None
        self.zeroed = 0
        self.since_sync = 0
        self.on_write = on_write
        self.zeroer = Zeroer(fd, fast_zero)

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if isinstance(chunk, memoryview):
            chunk = chunk.tobytes()
        n, base = len(chunk), self.pos  # chunk[i] goes to base + i
        i = run = 0  # [run, i) is data not yet written
        while i < n:
            misalign = (base + i) % ZERO_BLOCK
            if misalign:
                i = min(n, i + ZERO_BLOCK - misalign)
                continue
            if i + ZERO_BLOCK <= n and chunk.startswith(_ZEROS, i):
                self._data(chunk, run, i)
                self._zero(ZERO_BLOCK)
                i += ZERO_BLOCK
                run = i
            else:
                i = min(n, i + ZERO_BLOCK)
        self._data(chunk, run, n)

    def _data(self, chunk: bytes | bytearray, start: int, end: int) -> None:
        if start == end:
            return
        self._flush_zeros()
        view = memoryview(chunk)[start:end]
        while view:
            done = os.pwrite(self.fd, view, self.pos)
            self.pos += done
            view = view[done:]
        self.since_sync += end - start
        if self.since_sync >= WRITE_SYNC_EVERY:  # bound the dirty page cache on a small board
            os.fdatasync(self.fd)
            self.since_sync = 0
        if self.on_write:
            self.on_write()

    def _zero(self, length: int) -> None:
        if self.zero_from is None:
            self.zero_from = self.pos
        self.pos += length

    def _flush_zeros(self) -> None:
        if self.zero_from is None:
            return
        start, length = self.zero_from, self.pos - self.zero_from
        self.zero_from = None
        if self.zeroer(start, length):
            self.zeroed += length
            return
        while length:
            done = os.pwrite(self.fd, memoryview(_ZEROS)[: min(length, ZERO_BLOCK)], start)
            start += done
            length -= done

    def finish(self) -> int:
        """Flush and fsync; returns the number of bytes the slot now holds from offset 0."""
        self._flush_zeros()
        os.fsync(self.fd)
        return self.pos


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
) -> InstallResult:
    """Verify and write the artifact read from ``source`` into the slot device ``target``.

    A ``rootfs-delta`` artifact is applied with the running slot ``active`` as its source (see
    :func:`_apply_delta`); it is armed only if the result equals the signed target checksum.

    ``on_header`` runs after the signature and compatibility checks and before the first write (the agent
    runs the ArtifactInstall_Enter scripts there and reports ``installing``). Raises :class:`ArtifactError`
    (signature, structure, checksum, compatibility) or ``OSError`` (the medium)."""
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
        return _apply_delta(reader, files, pf, header, provides, active, target, started, progress)
    fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    try:
        capacity = _device_size(fd)
        if pf.size > capacity:
            raise IncompatibleArtifact(
                f"the root filesystem image is {pf.size} bytes but slot {target} holds only {capacity}"
            )
        writer = SlotWriter(fd)
        writer.on_write = lambda: fault("install-write", writer.pos)
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
    done = time.monotonic()
    return InstallResult(header.info.artifact_name, provides, pf.size, pf.sha256, dict(header.scripts),
                         done - started, streamed - started, done - streamed, writer.zeroed)


def _apply_delta(reader: ArtifactReader, files: Any, pf: Any, header: ArtifactHeader, provides: dict[str, str],
                 active: Path, target: Path, started: float,
                 progress: Callable[[int, int], None] | None) -> InstallResult:
    """Rebuild the target image from the running slot and the delta, straight into ``target``: memory stays at a
    few MiB (the source is read with ``pread`` where the delta says). The result must hash to the target
    checksum the artifact's signed header provides; it is then read back like a full install."""
    from artifacts.delta.apply import apply_delta, peek_header  # standard library only; loaded when a delta comes

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
            if dh.target_size > _device_size(fd):
                raise IncompatibleArtifact(
                    f"the delta makes a {dh.target_size}-byte image but slot {target} holds only {_device_size(fd)}")

            def step(written: int, total: int) -> None:
                fault("install-write", written)
                if progress:
                    progress(written, total)

            applied = apply_delta(payload, src, fd, progress=step)
        finally:
            os.close(fd)
    finally:
        os.close(src)
    if next(files, None) is not None:
        raise ArtifactError("the artifact has more than one payload file")
    if not reader.complete:
        raise ArtifactError("the artifact did not end cleanly")
    if applied.target_sha256 != want:  # apply_delta checked its own header; this is the signed value
        raise DeltaError(f"the delta produced {applied.target_sha256[:16]}…, the artifact promises {want[:16]}…")
    streamed = time.monotonic()
    verify_slot(target, applied.target_size, want)
    done = time.monotonic()
    log.info("delta applied: %d bytes copied from the running slot, %d new, %d zero", applied.copied_bytes,
             applied.literal_bytes, applied.zero_bytes)
    return InstallResult(header.info.artifact_name, provides, applied.target_size, want, dict(header.scripts),
                         done - started, streamed - started, done - streamed, applied.zero_bytes)


def slot_sha256(target: Path, size: int) -> str:
    """The sha256 of the first ``size`` bytes of the slot, read bypassing the page cache as far as the kernel
    lets us. Raises :class:`SlotVerifyError` when the slot is shorter, ``OSError`` for the medium."""
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h = hashlib.sha256()
        left = size
        while left:
            data = os.read(fd, min(VERIFY_CHUNK, left))
            if not data:
                raise SlotVerifyError(f"slot {target} ended {left} bytes early when read back")
            h.update(data)
            left -= len(data)
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
