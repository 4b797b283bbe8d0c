"""Writes signed Mender v3 artifacts that mender-artifact 3.9 validates and reads.

One pass over each payload file: the calling thread hashes while worker threads compress (see
:mod:`artifacts.compression`). The compressed payload goes to a temporary file next to the output, because
the manifest (which must come first) needs the payload checksums. The output is then assembled into a
temporary file and renamed over ``out``, so a failure never leaves a partial artifact behind.

Timestamps come from the epoch pinned by :func:`pinned_epoch`, else from ``SOURCE_DATE_EPOCH`` when it is set, so
that the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ota_common.errors import UserError

from . import format as fmt
from . import tarstream
from .compression import CHUNK, compress_bytes, open_encoder
from .header import DependValue, HeaderInfo, TypeInfo, go_json
from .keys import Signer, encode_signature
from .manifest import Manifest


@dataclass(frozen=True)
class PayloadSpec:
    """One payload: its type (``rootfs-image`` or an update module name) and files."""

    type: str
    files: tuple[Path, ...]
    provides: Mapping[str, str] = field(default_factory=dict)
    depends: Mapping[str, DependValue] = field(default_factory=dict)
    clears_provides: tuple[str, ...] = ()
    meta_data: Mapping[str, Any] | None = None
    #: add ``rootfs-image.checksum`` (the sha256 of the single file) to provides
    provide_checksum: bool = False
    #: write an empty ``meta-data`` member when there is no meta data (mender-artifact does for rootfs-image)
    empty_meta_data: bool = False


@dataclass(frozen=True)
class ArtifactSpec:
    name: str
    device_types: tuple[str, ...]
    payloads: tuple[PayloadSpec, ...]
    scripts: tuple[Path, ...] = ()
    provides_group: str | None = None
    depends_artifacts: tuple[str, ...] = ()
    depends_groups: tuple[str, ...] = ()


def parse_pairs(pairs: Sequence[str], what: str) -> dict[str, str]:
    """``KEY:VALUE`` strings (mender-artifact's notation for provides and depends) as a mapping. Raises
    :class:`UserError` naming ``what`` (``provides``, ``depends``; the CLI passes its option) for a string
    without a key or a value."""
    out: dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition(":")
        if not sep or not key or not value:
            raise UserError(f"{what} must be KEY:VALUE, got {p!r}")
        out[key] = value
    return out


#: the provide that carries a release's security version (signed with the header; DESIGN.md section 6): a device
#: refuses an artifact whose security version is below its own
SECURITY_VERSION_KEY = fmt.SECURITY_VERSION_KEY


def rootfs_image_spec(
    *,
    file: Path,
    name: str,
    device_types: Sequence[str],
    provides: Sequence[str] = (),
    depends: Sequence[str] = (),
    depends_artifacts: Sequence[str] = (),
    scripts: Sequence[Path] = (),
    software_version: str | None = None,
    security_version: int | None = None,
    sbom_sha256: str | None = None,
) -> ArtifactSpec:
    """The spec ``mender-artifact write rootfs-image`` would build: provides ``rootfs-image.version`` and
    ``rootfs-image.checksum``, with mender's default clears-provides; with ``security_version``, also
    ``rootfs-image.security_version`` (its decimal string); with ``sbom_sha256`` (the image's SBOM's sha256),
    meta-data that carries it (:data:`artifacts.format.SBOM_SHA256_KEY`) instead of mender's empty meta-data.
    Raises :class:`UserError` for a negative security version, a malformed ``KEY:VALUE`` pair or SBOM hash."""
    extra: dict[str, str] = {}
    if security_version is not None:
        if security_version < 0:
            raise UserError(f"security version must be a non-negative integer, got {security_version}")
        extra[SECURITY_VERSION_KEY] = str(security_version)
    if sbom_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sbom_sha256):
        raise UserError(f"an SBOM hash must be a sha256 of 64 lowercase hex digits, got {sbom_sha256!r}")
    payload = PayloadSpec(
        type=fmt.ROOTFS_IMAGE,
        files=(file,),
        provides={fmt.ROOTFS_VERSION_KEY: software_version or name, **extra, **parse_pairs(provides, "provides")},
        depends=parse_pairs(depends, "depends"),
        clears_provides=fmt.ROOTFS_DEFAULT_CLEARS,
        provide_checksum=True,
        meta_data=None if sbom_sha256 is None else {fmt.SBOM_SHA256_KEY: sbom_sha256},
        empty_meta_data=True,
    )
    return _single_payload(name, device_types, payload, scripts, depends_artifacts)


def module_image_spec(
    *,
    module_type: str,
    files: Sequence[Path],
    name: str,
    device_types: Sequence[str],
    provides: Sequence[str] = (),
    depends: Sequence[str] = (),
    depends_artifacts: Sequence[str] = (),
    scripts: Sequence[Path] = (),
    software_name: str | None = None,
    software_version: str | None = None,
    meta_data: Mapping[str, Any] | None = None,
) -> ArtifactSpec:
    """The spec ``mender-artifact write module-image`` would build (``rootfs-image.<module>.version``)."""
    sw = software_name or module_type
    payload = PayloadSpec(
        type=module_type,
        files=tuple(files),
        provides={f"rootfs-image.{sw}.version": software_version or name, **parse_pairs(provides, "provides")},
        depends=parse_pairs(depends, "depends"),
        clears_provides=(f"rootfs-image.{sw}.*",),
        meta_data=meta_data,
    )
    return _single_payload(name, device_types, payload, scripts, depends_artifacts)


def _single_payload(
    name: str, device_types: Sequence[str], payload: PayloadSpec, scripts: Sequence[Path], depends_artifacts: Sequence[str]
) -> ArtifactSpec:
    return ArtifactSpec(
        name=name,
        device_types=tuple(device_types),
        payloads=(payload,),
        scripts=tuple(scripts),
        depends_artifacts=tuple(depends_artifacts),
    )


def validate_spec(spec: ArtifactSpec) -> None:
    """Raise :class:`UserError` for anything the artifact could not carry or a device would refuse."""
    for label, value in [("artifact name", spec.name), *(("device type", d) for d in spec.device_types)]:
        if not fmt.TOKEN_RE.match(value) or value != value.strip():
            raise UserError(f"invalid {label} {value!r}")
    if not spec.device_types:
        raise UserError("at least one device type is required")
    if len(set(spec.device_types)) != len(spec.device_types):
        raise UserError("a device type is given twice")
    for value in (*spec.depends_artifacts, *spec.depends_groups, *([spec.provides_group] if spec.provides_group else [])):
        if not fmt.TOKEN_RE.match(value):
            raise UserError(f"invalid artifact name or group {value!r}")
    if not spec.payloads or len(spec.payloads) > fmt.MAX_PAYLOADS:
        raise UserError("an artifact needs at least one payload")
    names: set[str] = set()
    for script in spec.scripts:
        if not fmt.STATE_SCRIPT_RE.match(script.name):
            raise UserError(
                f"invalid state script name {script.name!r}: expected "
                "Artifact<Install|Reboot|Commit|Rollback|RollbackReboot|Failure>_<Enter|Leave|Error>_NN[_name]"
            )
        if script.name in names:
            raise UserError(f"state script {script.name} is given twice")
        names.add(script.name)
        _check_regular_file(script, "state script")
        if script.stat().st_size > fmt.MAX_SCRIPT_SIZE:
            raise UserError(f"state script {script} is larger than {fmt.MAX_SCRIPT_SIZE} bytes")
    for p in spec.payloads:
        if not fmt.PAYLOAD_TYPE_RE.match(p.type):
            raise UserError(f"invalid payload type {p.type!r}")
        if not p.files:
            raise UserError("a payload needs at least one file")
        if p.provide_checksum and len(p.files) != 1:
            raise UserError("a rootfs-image payload holds exactly one file")
        seen: set[str] = set()
        for f in p.files:
            _check_regular_file(f, "payload file")
            if not fmt.is_safe_file_name(f.name):
                raise UserError(f"payload file name {f.name!r} cannot be stored in an artifact")
            if f.name in seen:
                raise UserError(f"two payload files are named {f.name!r}")
            seen.add(f.name)
        for k, v in [*p.provides.items(), *((k, v) for k, v in p.depends.items() if isinstance(v, str))]:
            if not fmt.TOKEN_RE.match(k) or not fmt.TOKEN_RE.match(v):
                raise UserError(f"invalid provides/depends entry {k!r}: {v!r}")


def _check_regular_file(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} is not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} is not readable: {path}")


#: the epoch :func:`pinned_epoch` set in this context (None: ``$SOURCE_DATE_EPOCH``, else the clock)
_PINNED_EPOCH: ContextVar[int | None] = ContextVar("artifact_epoch", default=None)


@contextmanager
def pinned_epoch(epoch: int) -> Iterator[None]:
    """Artifacts written inside the block (in this thread) — also by code that calls :func:`write_artifact` itself,
    such as the delta artifact writer — take ``epoch`` as their time, as with ``SOURCE_DATE_EPOCH=epoch``, without
    touching ``os.environ`` (where it would outlive the block: a release build pins its own epoch this way)."""
    token = _PINNED_EPOCH.set(epoch)
    try:
        yield
    finally:
        _PINNED_EPOCH.reset(token)


def _source_date_epoch() -> int | None:
    pinned = _PINNED_EPOCH.get()
    if pinned is not None:
        return pinned
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if not sde:
        return None
    try:
        return int(sde)
    except ValueError:
        raise UserError(f"SOURCE_DATE_EPOCH must be an integer, got {sde!r}") from None


@dataclass(frozen=True)
class WrittenFile:
    path: str
    size: int
    sha256: str


def _write_payload(index: int, files: Sequence[Path], compression: fmt.Compression, out: BinaryIO, mtime_override: int | None) -> list[WrittenFile]:
    """Stream ``files`` as an inner tar through the encoder into ``out``; return their checksums."""
    enc = open_encoder(compression, out)
    written = []
    try:
        for f in files:
            with open(f, "rb") as src:
                st = os.fstat(src.fileno())
                mtime = mtime_override if mtime_override is not None else int(st.st_mtime)
                enc.write(
                    tarstream.member_header(f.name, st.st_size, mode=st.st_mode & 0o777, mtime=mtime, uname="root", gname="root")
                )
                h = hashlib.sha256()
                size = 0
                while data := src.read(CHUNK):
                    h.update(data)
                    enc.write(data)
                    size += len(data)
                if size != st.st_size:
                    raise UserError(f"{f} changed size while it was being read")
                enc.write(bytes(tarstream.padding(size)))
            written.append(WrittenFile(fmt.data_file_path(index, f.name), size, h.hexdigest()))
        enc.write(tarstream.END_OF_ARCHIVE)
    finally:
        enc.close()
    return written


def _header_tar(spec: ArtifactSpec, type_infos: Sequence[TypeInfo], mtime: int) -> bytes:
    info = HeaderInfo(
        artifact_name=spec.name,
        device_types=spec.device_types,
        payload_types=tuple(p.type for p in spec.payloads),
        artifact_group=spec.provides_group,
        depends_artifact_names=spec.depends_artifacts,
        depends_groups=spec.depends_groups,
    )
    buf = io.BytesIO()
    tarstream.write_member(buf, fmt.HEADER_INFO, info.to_json())
    for script in spec.scripts:
        tarstream.write_member(buf, fmt.SCRIPTS_DIR + script.name, script.read_bytes(), mode=0o755, mtime=mtime, uname="root", gname="root")
    for i, (p, ti) in enumerate(zip(spec.payloads, type_infos, strict=True)):
        tarstream.write_member(buf, f"headers/{i:04d}/type-info", ti.to_json())
        if p.meta_data is not None:
            tarstream.write_member(buf, f"headers/{i:04d}/meta-data", go_json(dict(p.meta_data)))
        elif p.empty_meta_data:
            tarstream.write_member(buf, f"headers/{i:04d}/meta-data", b"")
    buf.write(tarstream.END_OF_ARCHIVE)
    return buf.getvalue()


@dataclass(frozen=True)
class WriteResult:
    path: Path
    size: int
    files: tuple[WrittenFile, ...]
    manifest: Manifest
    signed: bool


_PLACEHOLDER_SHA256 = "0" * 64


def _round_up(n: int) -> int:
    return n + tarstream.padding(n)


def _prefix_bound(spec: ArtifactSpec, compression: fmt.Compression, signer: Signer | None, mtime: int) -> int:
    """An upper bound of the bytes before the first data member: version, manifest, signature and header.

    Everything but the compressed header size is known exactly before the payloads are read (checksums have
    a fixed length), so the payloads can be written straight into the output after this space."""
    header_name = fmt.header_member(compression)
    paths = [fmt.VERSION_MEMBER, header_name]
    paths += [fmt.data_file_path(i, f.name) for i, p in enumerate(spec.payloads) for f in p.files]
    manifest_len = sum(64 + 2 + len(p.encode()) + 1 for p in paths)
    type_infos = [_type_info(p, _PLACEHOLDER_SHA256) for p in spec.payloads]
    raw_header = len(_header_tar(spec, type_infos, mtime))
    header_bound = raw_header if compression is fmt.Compression.NONE else raw_header + raw_header // 64 + 4096
    total = tarstream.BLOCK + _round_up(len(fmt.VERSION_JSON))
    total += tarstream.BLOCK + _round_up(manifest_len)
    if signer is not None:
        total += tarstream.BLOCK + _round_up(len(encode_signature(signer.sign(b"size probe"))))
    return total + tarstream.BLOCK + _round_up(header_bound)


def _type_info(p: PayloadSpec, checksum: str) -> TypeInfo:
    provides = dict(p.provides)
    if p.provide_checksum:
        provides[fmt.ROOTFS_CHECKSUM_KEY] = checksum
    return TypeInfo(type=p.type, provides=provides, depends=dict(p.depends), clears_provides=p.clears_provides)


def write_artifact(
    spec: ArtifactSpec,
    out: Path,
    *,
    compression: fmt.Compression = fmt.Compression.GZIP,
    signer: Signer | None = None,
    fsync: bool = False,
) -> WriteResult:
    """Write ``spec`` to ``out`` (atomically replaced). Raises :class:`UserError` for a bad spec.

    The payloads are compressed straight into the output file, after space reserved for the members that
    precede them; once their checksums are known, the manifest, signature and header are written into that
    space and any rest of it becomes a PAX comment record (a standard tar extension that every reader skips).
    """
    validate_spec(spec)
    sde = _source_date_epoch()
    now = int(time.time()) if sde is None else sde
    out = out.absolute()
    if not out.parent.is_dir():
        raise UserError(f"output directory does not exist: {out.parent}")
    if out.is_dir():
        raise UserError(f"output path is a directory: {out}")
    reserved = _prefix_bound(spec, compression, signer, now)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp_out = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.seek(reserved)
            written: list[WrittenFile] = []
            type_infos: list[TypeInfo] = []
            for i, p in enumerate(spec.payloads):
                header_pos = f.tell()
                f.write(bytes(tarstream.BLOCK))
                files = _write_payload(i, p.files, compression, f, sde)
                size = f.tell() - header_pos - tarstream.BLOCK
                f.write(bytes(tarstream.padding(size)))
                end = f.tell()
                f.seek(header_pos)
                f.write(
                    tarstream.member_header(
                        fmt.data_member(i, compression), size, mtime=now, uname="root", gname="root", single_block=True
                    )
                )
                f.seek(end)
                written += files
                type_infos.append(_type_info(p, files[0].sha256))
            f.write(tarstream.END_OF_ARCHIVE)
            total = f.tell()

            header = compress_bytes(compression, _header_tar(spec, type_infos, now))
            header_name = fmt.header_member(compression)
            entries = {w.path: w.sha256 for w in written}
            entries[fmt.VERSION_MEMBER] = hashlib.sha256(fmt.VERSION_JSON).hexdigest()
            entries[header_name] = hashlib.sha256(header).hexdigest()
            manifest = Manifest.build(entries)
            manifest_bytes = manifest.serialize()
            prefix = io.BytesIO()
            tarstream.write_member(prefix, fmt.VERSION_MEMBER, fmt.VERSION_JSON)
            tarstream.write_member(prefix, fmt.MANIFEST_MEMBER, manifest_bytes)
            if signer is not None:
                tarstream.write_member(prefix, fmt.SIGNATURE_MEMBER, encode_signature(signer.sign(manifest_bytes)))
            tarstream.write_member(prefix, header_name, header, mtime=now, uname="root", gname="root")
            gap = reserved - prefix.tell()
            if gap < 0:
                raise AssertionError(f"artifact prefix exceeds its reserved space by {-gap} bytes")
            prefix.write(tarstream.filler(gap, now))
            f.seek(0)
            f.write(prefix.getvalue())
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp_out, 0o644)
        os.replace(tmp_out, out)
    except BaseException:
        tmp_out.unlink(missing_ok=True)
        raise
    return WriteResult(out, total, tuple(written), manifest, signer is not None)


def sign_artifact(src: Path, out: Path, signer: Signer) -> WriteResult:
    """Sign (or re-sign) an existing artifact into ``out``.

    The whole input is first read and verified (structure and every checksum; any existing signature is
    not trusted and gets replaced), then copied member by member with the new ``manifest.sig``."""
    from .reader import read_artifact

    info = read_artifact(src, require_signature=False)
    out = out.absolute()
    if not out.parent.is_dir():
        raise UserError(f"output directory does not exist: {out.parent}")
    with open(src, "rb") as f_in, tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        reader = tarstream.TarReader(tarstream.ByteSource(f_in, str(src)), str(src))
        tmp_out = Path(tmp) / "artifact"
        manifest_bytes = b""
        with open(tmp_out, "wb") as f:
            while (entry := reader.next()) is not None:
                if entry.name == fmt.SIGNATURE_MEMBER:
                    continue
                f.write(
                    tarstream.member_header(
                        entry.name, entry.size, mode=entry.mode, mtime=entry.mtime, uname=entry.uname, gname=entry.gname
                    )
                )
                if entry.name == fmt.MANIFEST_MEMBER:
                    manifest_bytes = reader.read_all()
                    f.write(manifest_bytes)
                    f.write(bytes(tarstream.padding(entry.size)))
                    tarstream.write_member(f, fmt.SIGNATURE_MEMBER, encode_signature(signer.sign(manifest_bytes)))
                    continue
                while data := reader.read_some(CHUNK):
                    f.write(data)
                f.write(bytes(tarstream.padding(entry.size)))
            f.write(tarstream.END_OF_ARCHIVE)
            f.flush()
            os.fsync(f.fileno())
            total = f.tell()
        reader.close()
        os.chmod(tmp_out, 0o644)
        os.replace(tmp_out, out)
    files = tuple(WrittenFile(fi.path, fi.size, fi.sha256) for fi in info.files)
    return WriteResult(out, total, files, Manifest.parse(manifest_bytes), True)
