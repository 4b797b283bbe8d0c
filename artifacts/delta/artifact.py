"""Delta artifacts (on the build host): read two full rootfs-image artifacts (verified while they stream), make
the delta payload between their images (:mod:`.make`), and write the signed ``rootfs-delta`` artifact that
installs only on a device running the source."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ota_common.errors import UserError

from .. import format as fmt
from ..reader import ArtifactReader
from ..writer import ArtifactSpec, PayloadSpec, WriteResult, write_artifact
from .format import (
    BLOCK_SIZE,
    DELTA_FILE_NAME,
    DELTA_PAYLOAD_TYPE,
    FORMAT_VERSION,
    HEADER_SIZE,
    DeltaError,
    SameImageError,
    parse_header,
)
from .make import DEFAULT_LEVEL, DeltaStats, make_delta

if TYPE_CHECKING:
    from ..header import ArtifactHeader
    from ..keys import Signer, Verifier


@dataclass(frozen=True)
class RootfsArtifactInfo:
    """What a delta needs to know about a full rootfs-image artifact (from its verified header)."""

    path: Path
    name: str
    device_types: tuple[str, ...]
    version: str | None
    checksum: str | None
    size: int
    #: ``rootfs-image.security_version`` of the artifact, when it provides one
    security_version: str | None = None
    #: the sha256 of the image's SBOM its signed meta-data names (:data:`artifacts.format.SBOM_SHA256_KEY`)
    sbom_sha256: str | None = None


@dataclass(frozen=True)
class DeltaArtifactResult:
    artifact: WriteResult
    stats: DeltaStats
    source: RootfsArtifactInfo
    target: RootfsArtifactInfo


def _open(path: Path, verifiers: Sequence[Verifier]) -> ArtifactReader:
    return ArtifactReader.open(path, verifiers=verifiers, require_signature=bool(verifiers))


def _rootfs_info(path: Path, role: str, header: ArtifactHeader, size: int = 0) -> RootfsArtifactInfo:
    """The description of the full rootfs-image artifact ``path`` from its verified header; ``role`` says which
    input of the delta it is (``source`` or ``target``). Raises UserError for any other kind of artifact."""
    types = header.info.payload_types
    if types != (fmt.ROOTFS_IMAGE,):
        raise UserError(f"the {role} artifact {path}: not a full rootfs-image artifact (payload types: {', '.join(types)})")
    provides = header.type_infos[0].provides
    return RootfsArtifactInfo(path, header.info.artifact_name, header.info.device_types,
                              provides.get(fmt.ROOTFS_VERSION_KEY), provides.get(fmt.ROOTFS_CHECKSUM_KEY), size,
                              provides.get(fmt.SECURITY_VERSION_KEY), header.sbom_sha256())


def _check_device_types(src: RootfsArtifactInfo, tgt: RootfsArtifactInfo) -> None:
    missing = [t for t in tgt.device_types if t not in src.device_types]
    if missing:
        raise UserError(f"{tgt.path} is for device type(s) {', '.join(missing)} that {src.path} is not for "
                        f"({', '.join(src.device_types)}): a delta needs the same device types")


@contextlib.contextmanager
def _open_rootfs(path: Path, role: str, verifiers: Sequence[Verifier]) -> Iterator[tuple[RootfsArtifactInfo, Iterator[bytes], Callable[[], None]]]:
    """Open a full rootfs-image artifact: its description, the chunks of its image (verified against the
    manifest as they stream) and a function that checks the rest of the archive once the image was read."""
    with _open(path, verifiers) as r:
        info = _rootfs_info(path, role, r.read_header())
        files = r.files()
        pf = next(files, None)
        if pf is None:
            raise UserError(f"the {role} artifact {path}: the rootfs-image payload has no file")
        info = dataclasses.replace(info, size=pf.size)

        def finish() -> None:
            rest = next(files, None)
            if rest is not None:
                raise UserError(f"the {role} artifact {path}: the rootfs-image payload has more than one file "
                                f"({rest.name})")
            if not r.complete:
                raise DeltaError(f"the {role} artifact {path}: the artifact did not end cleanly")

        yield info, pf.chunks(), finish


def make_delta_payload(old: Path, new: Path, out: Path, *, level: int = DEFAULT_LEVEL,
                       verifiers: Sequence[Verifier] = (),
                       progress: Callable[[str], None] | None = None) -> tuple[DeltaStats, RootfsArtifactInfo, RootfsArtifactInfo]:
    """Read two full rootfs-image artifacts (verifying structure and checksums, and signatures when
    ``verifiers`` are given) and write the delta payload file ``out``. Raises UserError when they cannot
    make a delta (not rootfs-image, no common device type), :class:`SameImageError` (a UserError) when they
    hold the same image."""
    with _open_rootfs(old, "source", verifiers) as (src, src_chunks, src_finish), \
            _open_rootfs(new, "target", verifiers) as (tgt, tgt_chunks, tgt_finish):
        _check_device_types(src, tgt)
        if src.checksum is not None and src.checksum == tgt.checksum:
            raise SameImageError(f"{old} and {new} hold the same image (rootfs-image.checksum {src.checksum[:16]}…): "
                                 "there is nothing to send")

        def source() -> Iterator[bytes]:
            yield from src_chunks
            src_finish()

        def target() -> Iterator[bytes]:
            yield from tgt_chunks
            tgt_finish()

        with open(out, "wb") as f:
            stats = make_delta(source(), target(), f, level=level, progress=progress)
    if stats.source_sha256 == stats.target_sha256:
        raise SameImageError(f"{old} and {new} hold the same image: there is nothing to send")
    for info, actual in ((src, stats.source_sha256), (tgt, stats.target_sha256)):
        if info.checksum is not None and info.checksum != actual:  # the reader checks this too
            raise DeltaError(f"{info.path}: rootfs-image.checksum says {info.checksum[:16]}…, the image is {actual[:16]}…")
    return stats, src, tgt


def delta_artifact_spec(payload: Path, stats: DeltaStats, target: RootfsArtifactInfo) -> ArtifactSpec:
    """The artifact spec of a delta: named and typed like the target, installable only on its source. Its
    meta-data carries the target's SBOM hash, when the target names one: the delta installs the same image, so
    the same SBOM belongs to it."""
    provides = {fmt.ROOTFS_CHECKSUM_KEY: stats.target_sha256}
    if target.version is not None:
        provides[fmt.ROOTFS_VERSION_KEY] = target.version
    if target.security_version is not None:  # the device checks it on a delta as on a full artifact
        provides[fmt.SECURITY_VERSION_KEY] = target.security_version
    return ArtifactSpec(
        name=target.name,
        device_types=target.device_types,
        payloads=(PayloadSpec(
            type=DELTA_PAYLOAD_TYPE,
            files=(payload,),
            provides=provides,
            depends={fmt.ROOTFS_CHECKSUM_KEY: stats.source_sha256},
            clears_provides=fmt.ROOTFS_DEFAULT_CLEARS,
            meta_data={"format": FORMAT_VERSION, "block_size": BLOCK_SIZE, "source_size": stats.source_size,
                       "target_size": stats.target_size,
                       **({fmt.SBOM_SHA256_KEY: target.sbom_sha256} if target.sbom_sha256 is not None else {})},
        ),),
    )


def write_delta_artifact(
    old: Path,
    new: Path,
    *,
    signer: Signer | None,
    out: Path,
    level: int = DEFAULT_LEVEL,
    verifiers: Sequence[Verifier] = (),
    payload: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> DeltaArtifactResult:
    """Write the signed delta artifact ``out`` that turns the image of ``old`` into the image of ``new`` (two
    full rootfs-image artifacts, verified while they are read).

    The delta artifact has the target's name and device types; its payload (type ``rootfs-delta``) depends on
    the source's ``rootfs-image.checksum`` and provides the target's ``rootfs-image.version``,
    ``rootfs-image.security_version`` (when it has one) and ``rootfs-image.checksum``, so it is offered to, and
    installs on, only a device running exactly the source.
    The payload is already compressed, so the artifact is not (compression ``none``). With ``payload``, an
    existing delta payload file for the same two images is reused (e.g. one per board of a release).
    Raises UserError (:class:`SameImageError` for the same image), ArtifactError for an input that does not
    verify."""
    out = out.absolute()
    if not out.parent.is_dir():
        raise UserError(f"output directory does not exist: {out.parent}")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        file = payload
        if file is None:
            file = Path(tmp) / DELTA_FILE_NAME
            stats, src, tgt = make_delta_payload(old, new, file, level=level, verifiers=verifiers, progress=progress)
        else:
            stats, src, tgt = _reuse_payload(old, new, file, verifiers)
        result = write_artifact(delta_artifact_spec(file, stats, tgt), out, compression=fmt.Compression.NONE,
                                signer=signer)
    return DeltaArtifactResult(result, stats, src, tgt)


def _reuse_payload(old: Path, new: Path, payload: Path,
                   verifiers: Sequence[Verifier]) -> tuple[DeltaStats, RootfsArtifactInfo, RootfsArtifactInfo]:
    """Stats of an existing payload file, after checking against the verified headers of ``old`` and ``new``
    that it is the delta between their images (their payloads were verified when it was made)."""
    infos = []
    for path, role in ((old, "source"), (new, "target")):
        with _open(path, verifiers) as r:
            infos.append(_rootfs_info(path, role, r.read_header()))
    src, tgt = infos
    with open(payload, "rb") as f:
        header = parse_header(f.read(HEADER_SIZE))
    if (src.checksum, tgt.checksum) != (header.source_sha256, header.target_sha256):
        raise UserError(f"{payload} is not the delta from {old} to {new}")
    _check_device_types(src, tgt)
    stats = DeltaStats(header.source_size, header.source_sha256, header.target_size, header.target_sha256,
                       0, 0, 0, 0, payload.stat().st_size, 0.0)
    return stats, src, tgt


__all__ = [
    "DeltaArtifactResult",
    "RootfsArtifactInfo",
    "delta_artifact_spec",
    "make_delta_payload",
    "write_delta_artifact",
]
