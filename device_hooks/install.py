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
from artifacts.header import ArtifactHeader
from ota_common.errors import ArtifactError, IncompatibleArtifact

from .bootenv import BootEnv
from .faults import fault

log = logging.getLogger(__name__)

ROOTFS = "rootfs-image"
WRITE_SYNC_EVERY = 32 * 1024 * 1024
VERIFY_CHUNK = 1024 * 1024


class SlotVerifyError(ArtifactError):
    """The slot's content read back does not match what was written (bad medium)."""


@dataclass(frozen=True)
class DeviceFacts:
    """What the device is and runs: compared with an artifact's header."""

    device_type: str
    artifact_name: str
    provides: Mapping[str, str]  # incl. rootfs-image.version and (when known) rootfs-image.checksum
    groups: Sequence[str] = ()


@dataclass(frozen=True)
class InstallResult:
    artifact_name: str
    provides: dict[str, str]
    size: int
    sha256: str
    scripts: dict[str, bytes]
    seconds: float


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


def check_compatible(header: ArtifactHeader, device: DeviceFacts, *, allow_downgrade: bool = False) -> dict[str, str]:
    """Raise :class:`IncompatibleArtifact` with the reason, or return the provides the slot will have."""
    info = header.info
    if device.device_type not in info.device_types:
        raise IncompatibleArtifact(
            f"artifact {info.artifact_name!r} is for device types {', '.join(info.device_types)}, "
            f"this device is {device.device_type!r}"
        )
    if list(info.payload_types) != [ROOTFS] or len(header.type_infos) != 1:
        raise IncompatibleArtifact(
            f"artifact {info.artifact_name!r} has payloads {list(info.payload_types)}; this agent installs "
            f"exactly one {ROOTFS} payload"
        )
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
) -> InstallResult:
    """Verify and write the artifact read from ``source`` into the slot device ``target``.

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
    fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    try:
        capacity = _device_size(fd)
        if pf.size > capacity:
            raise IncompatibleArtifact(
                f"the root filesystem image is {pf.size} bytes but slot {target} holds only {capacity}"
            )
        os.lseek(fd, 0, os.SEEK_SET)
        written = since_sync = 0
        for chunk in pf.chunks():
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            written += len(chunk)
            fault("install-write")
            since_sync += len(chunk)
            if since_sync >= WRITE_SYNC_EVERY:  # bound the dirty page cache on a small board
                os.fdatasync(fd)
                since_sync = 0
                if progress:
                    progress(written, pf.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert pf.sha256 is not None
    if next(files, None) is not None:
        raise ArtifactError("the artifact has more than one payload file")
    if not reader.complete:
        raise ArtifactError("the artifact did not end cleanly")
    verify_slot(target, pf.size, pf.sha256)
    provides.setdefault("rootfs-image.checksum", pf.sha256)
    return InstallResult(header.info.artifact_name, provides, pf.size, pf.sha256, dict(header.scripts),
                         time.monotonic() - started)


def verify_slot(target: Path, size: int, sha256: str) -> None:
    """Read back ``size`` bytes of the slot, bypassing the page cache as far as the kernel lets us."""
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
    if h.hexdigest() != sha256:
        raise SlotVerifyError(f"slot {target} read back with checksum {h.hexdigest()[:16]}…, expected {sha256[:16]}…")


def arm(env: BootEnv, target_part: int) -> dict[str, str]:
    """One atomic write of the boot state: boot ``target_part`` next, as a trial."""
    return env.update({"mender_boot_part": str(target_part), "upgrade_available": "1", "bootcount": "0"})
