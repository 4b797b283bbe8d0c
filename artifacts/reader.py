"""Streaming, verifying reader of Mender v3 artifacts.

The reader is what the device agent uses to write a slot while downloading, so its order of checks is the
security contract:

1. ``version``, ``manifest`` and ``manifest.sig`` are read (size-limited) and the manifest signature is
   checked against the trusted keys **before anything else is trusted**;
2. the stored header member is hashed and compared with the manifest before it is decompressed or parsed;
3. payload bytes are handed out only after 1 and 2, hashed as they stream, and the file's iterator raises
   :class:`ChecksumMismatch` at the end of a file whose hash differs — before the caller can treat the file
   as complete;
4. after the last payload, the archive must end cleanly: a manifest entry never seen, an extra member or
   trailing garbage is an error.

Nothing is buffered beyond a few chunks, whatever the payload size. The reader needs only the standard
library and ``cryptography`` (ISA-L and zstandard are used when installed), so it runs on a device with
Debian's ``python3-cryptography``.
"""

from __future__ import annotations

import enum
import hashlib
import io
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from ota_common.errors import (
    ArtifactError,
    BadSignature,
    ChecksumMismatch,
    MalformedArtifact,
    TruncatedArtifact,
    UnsignedArtifact,
    UnsupportedArtifact,
    UserError,
)

from . import format as fmt
from .compression import CHUNK, decompress_bytes, iter_decompressed
from .header import (
    ArtifactHeader,
    TypeInfo,
    check_script_name,
    load_json_object,
    parse_header_info,
    parse_meta_data,
    parse_type_info,
)
from .keys import Verifier, decode_signature
from .manifest import Manifest
from .tarstream import ByteSource, TarEntry, TarReader


class SignatureStatus(enum.Enum):
    UNSIGNED = "unsigned"
    SIGNED = "signed (not verified)"
    VERIFIED = "verified"


@dataclass
class PayloadFile:
    """One file of a payload, streamed. Iterate :meth:`chunks` once; it raises
    :class:`ChecksumMismatch` after the last chunk when the content does not match the manifest."""

    payload_index: int
    name: str
    size: int
    mode: int
    mtime: int
    expected_sha256: str
    _reader: ArtifactReader = field(repr=False)
    sha256: str | None = None  # set once the whole file has been read and verified

    @property
    def path(self) -> str:
        return fmt.data_file_path(self.payload_index, self.name)

    def chunks(self) -> Iterator[bytes]:
        return self._reader._stream_file(self)


class _ChunkStream:
    """A file-like ``read(n)`` over an iterator of chunks, returning slices without joining them."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""
        self._pos = 0

    def read(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
            self._buf = next(self._chunks, b"")
            self._pos = 0
            if not self._buf:
                return b""
        end = self._pos + n
        whole = self._pos == 0 and end >= len(self._buf)
        data = self._buf if whole else self._buf[self._pos : end]
        self._pos += len(data)
        return data

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close:
            close()


class _MemberRaw:
    """The raw bytes of the current outer member, as a reader for a decoder."""

    def __init__(self, tar: TarReader) -> None:
        self._tar = tar

    def read(self, n: int) -> bytes:
        return self._tar.read_some(n)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactReader:
    """Reads and verifies an artifact from a binary stream in one pass.

    :param verifiers: trusted keys; when given, the artifact must be signed by one of them.
    :param require_signature: defaults to ``bool(verifiers)``.
    :param payload_types: if given, payload types outside it are refused as unsupported.
    :param source_size: total size of the stream if known (a file size, an HTTP Content-Length): members that
        claim more bytes than remain are refused before they are read.
    """

    def __init__(
        self,
        stream: BinaryIO | Any,
        *,
        verifiers: Sequence[Verifier] = (),
        require_signature: bool | None = None,
        payload_types: Collection[str] | None = None,
        source_size: int | None = None,
        what: str = "artifact",
    ) -> None:
        self._src = ByteSource(stream, what)
        self._tar = TarReader(self._src, what)
        self._verifiers = list(verifiers)
        self._require_signature = bool(verifiers) if require_signature is None else require_signature
        if self._require_signature and not self._verifiers:
            raise UserError("a signature is required but no verification key was given")
        self._payload_types = None if payload_types is None else frozenset(payload_types)
        self._source_size = source_size
        self.what = what
        self.version: dict[str, Any] = {}
        self.manifest: Manifest | None = None
        self.manifest_bytes = b""
        self.signature_status = SignatureStatus.UNSIGNED
        self.signed_by: str | None = None
        self.header_member = ""
        self.header: ArtifactHeader | None = None
        self._files_started = False
        self._done = False
        self.data_members: list[str] = []
        self._open_file: PayloadFile | None = None
        self._inner: TarReader | None = None
        self._decoded: _ChunkStream | None = None
        self._owned: BinaryIO | None = None

    # -- opening
    @classmethod
    def open(cls, path: Path, **kw: Any) -> ArtifactReader:
        """Open a file; use as a context manager."""
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            raise UserError(f"artifact not found: {path}") from None
        except OSError as e:
            raise UserError(f"cannot open {path}: {e.strerror}") from None
        try:
            size = os.fstat(f.fileno()).st_size
            reader = cls(f, source_size=size, what=kw.pop("what", str(path)), **kw)
        except BaseException:
            f.close()
            raise
        reader._owned = f
        return reader

    def __enter__(self) -> ArtifactReader:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._decoded is not None:
            self._decoded.close()
            self._decoded = None
        owned = getattr(self, "_owned", None)
        if owned is not None:
            owned.close()
            self._owned = None

    # -- outer members
    def _next_member(self) -> TarEntry | None:
        entry = self._tar.next()
        if entry is not None and self._source_size is not None:
            left = self._source_size - self._src.pos
            if entry.size > left:
                raise TruncatedArtifact(
                    f"{self.what} is truncated: member {entry.name} claims {entry.size} bytes but only {left} remain"
                )
        if entry is not None and (entry.name in fmt.AUGMENT_MEMBERS or entry.name.startswith("header-augment.tar")):
            raise UnsupportedArtifact(f"{self.what}: augmented artifacts ({entry.name}) are not supported")
        return entry

    def _small_member(self, entry: TarEntry, limit: int) -> bytes:
        if entry.size > limit:
            raise MalformedArtifact(f"{self.what}: member {entry.name} is {entry.size} bytes, which is absurd")
        data = self._tar.read_all()
        self._tar.finish_member()
        return data

    def read_header(self) -> ArtifactHeader:
        """Read and verify everything before the payloads. Idempotent."""
        if self.header is not None:
            return self.header
        entry = self._next_member()
        if entry is None or entry.name != fmt.VERSION_MEMBER:
            raise MalformedArtifact(f"{self.what}: the first member must be 'version', found {_name(entry)}")
        version_bytes = self._small_member(entry, fmt.MAX_VERSION_SIZE)
        self.version = load_json_object(version_bytes, "version")
        if self.version.get("format") != fmt.FORMAT_NAME:
            raise MalformedArtifact(f"{self.what}: not a Mender artifact (format {self.version.get('format')!r})")
        if self.version.get("version") != fmt.FORMAT_VERSION:
            raise UnsupportedArtifact(
                f"{self.what}: artifact format version {self.version.get('version')!r} is not supported (only 3)"
            )

        entry = self._next_member()
        if entry is None or entry.name != fmt.MANIFEST_MEMBER:
            raise MalformedArtifact(f"{self.what}: the second member must be 'manifest', found {_name(entry)}")
        self.manifest_bytes = self._small_member(entry, fmt.MAX_MANIFEST_SIZE)
        manifest = Manifest.parse(self.manifest_bytes)

        entry = self._next_member()
        if entry is not None and entry.name == fmt.SIGNATURE_MEMBER:
            signature = decode_signature(self._small_member(entry, fmt.MAX_SIGNATURE_SIZE))
            self._check_signature(signature)
            entry = self._next_member()
        elif self._require_signature:
            raise UnsignedArtifact(f"{self.what} is not signed (no manifest.sig), but a signature is required")
        # From here on the manifest is trusted (or the caller chose not to require a signature).
        self.manifest = manifest
        self._check_manifest_entry(fmt.VERSION_MEMBER, _sha256(version_bytes))

        if entry is None or not entry.name.startswith(fmt.HEADER_MEMBER_STEM):
            raise MalformedArtifact(f"{self.what}: expected the header member after the manifest, found {_name(entry)}")
        try:
            compression = fmt.Compression.from_member_name(entry.name, fmt.HEADER_MEMBER_STEM)
        except ValueError:
            raise UnsupportedArtifact(f"{self.what}: unsupported header compression in {entry.name!r}") from None
        self.header_member = entry.name
        header_bytes = self._small_member(entry, fmt.MAX_HEADER_SIZE)
        self._check_manifest_entry(entry.name, _sha256(header_bytes))
        self.header = self._parse_header(header_bytes, compression)
        return self.header

    def _check_signature(self, signature: bytes) -> None:
        if not self._verifiers:
            self.signature_status = SignatureStatus.SIGNED
            return
        errors = []
        for v in self._verifiers:
            try:
                v.verify(self.manifest_bytes, signature)
            except BadSignature as e:
                errors.append(str(e))
                continue
            self.signature_status = SignatureStatus.VERIFIED
            self.signed_by = v.description
            return
        if len(errors) == 1:
            raise BadSignature(f"{self.what}: bad signature: {errors[0]}")
        raise BadSignature(f"{self.what}: bad signature: it verifies with none of the {len(errors)} trusted keys")

    def _check_manifest_entry(self, path: str, actual: str) -> None:
        assert self.manifest is not None
        expected = self.manifest.checksum(path)
        if expected is None:
            raise MalformedArtifact(f"{self.what}: the manifest does not list {path}")
        if expected != actual:
            raise ChecksumMismatch(path, expected, actual)

    def _parse_header(self, stored: bytes, compression: fmt.Compression) -> ArtifactHeader:
        raw = decompress_bytes(compression, stored, self.header_member, fmt.MAX_HEADER_UNCOMPRESSED)
        tar = TarReader(ByteSource(io.BytesIO(raw), self.header_member), self.header_member)
        entry = tar.next()
        if entry is None or entry.name != fmt.HEADER_INFO:
            raise MalformedArtifact(f"{self.header_member}: the first member must be 'header-info', found {_name(entry)}")
        info = parse_header_info(self._read_limited(tar, entry, fmt.MAX_JSON_SIZE))
        if self._payload_types is not None:
            for t in info.payload_types:
                if t not in self._payload_types:
                    raise UnsupportedArtifact(
                        f"{self.what}: payload type {t!r} is not supported here "
                        f"(supported: {', '.join(sorted(self._payload_types))})"
                    )
        scripts: dict[str, bytes] = {}
        entry = tar.next()
        while entry is not None and entry.name.startswith(fmt.SCRIPTS_DIR):
            name = check_script_name(entry.name[len(fmt.SCRIPTS_DIR) :])
            if name in scripts:
                raise MalformedArtifact(f"{self.header_member}: state script {name} appears twice")
            scripts[name] = self._read_limited(tar, entry, fmt.MAX_SCRIPT_SIZE)
            entry = tar.next()
        type_infos: list[TypeInfo] = []
        meta: list[Any] = []
        for i, ptype in enumerate(info.payload_types):
            expected = f"headers/{i:04d}/type-info"
            if entry is None or entry.name != expected:
                raise MalformedArtifact(f"{self.header_member}: expected {expected}, found {_name(entry)}")
            type_infos.append(parse_type_info(self._read_limited(tar, entry, fmt.MAX_JSON_SIZE), i, ptype))
            entry = tar.next()
            if entry is not None and entry.name == f"headers/{i:04d}/meta-data":
                meta.append(parse_meta_data(self._read_limited(tar, entry, fmt.MAX_JSON_SIZE), i))
                entry = tar.next()
            else:
                meta.append(None)
        if entry is not None:
            raise MalformedArtifact(f"{self.header_member}: unexpected member {entry.name!r}")
        tar.close()
        assert self.manifest is not None
        for path, _ in self.manifest:
            if path.startswith("data/") and int(path[5:9]) >= len(info.payload_types):
                raise MalformedArtifact(f"{self.what}: the manifest lists {path} but there is no such payload")
        return ArtifactHeader(
            info=info,
            type_infos=tuple(type_infos),
            meta_data=tuple(meta),
            scripts=scripts,
            compression=compression,
        )

    @staticmethod
    def _read_limited(tar: TarReader, entry: TarEntry, limit: int) -> bytes:
        if entry.size > limit:
            raise MalformedArtifact(f"{tar.what}: {entry.name} is {entry.size} bytes, which is absurd")
        return tar.read_all()

    # -- payloads
    def files(self) -> Iterator[PayloadFile]:
        """Yield every payload file in order. A file whose chunks the caller does not read is still read and
        verified before the next one is yielded. Ends by checking that the archive ends cleanly."""
        header = self.read_header()
        if self._files_started:
            raise RuntimeError("files() can only be iterated once")
        self._files_started = True
        assert self.manifest is not None
        for index in range(len(header.info.payload_types)):
            entry = self._next_member()
            expected_stem = f"data/{index:04d}.tar"
            if entry is None or not entry.name.startswith(expected_stem):
                raise MalformedArtifact(f"{self.what}: expected payload {expected_stem}*, found {_name(entry)}")
            try:
                compression = fmt.Compression.from_member_name(entry.name, expected_stem)
            except ValueError:
                raise UnsupportedArtifact(f"{self.what}: unsupported payload compression in {entry.name!r}") from None
            self.data_members.append(entry.name)
            yield from self._payload(index, entry.name, compression)
            self._tar.finish_member()
        entry = self._next_member()
        if entry is not None:
            raise MalformedArtifact(f"{self.what}: unexpected member {entry.name!r} after the last payload")
        self._tar.close()
        self._done = True

    def _payload(self, index: int, member: str, compression: fmt.Compression) -> Iterator[PayloadFile]:
        assert self.manifest is not None and self.header is not None
        expected = self.manifest.data_files(index)
        self._decoded = _ChunkStream(iter_decompressed(compression, _MemberRaw(self._tar), member))
        inner = TarReader(ByteSource(self._decoded, member), member, max_member_size=fmt.MAX_PAYLOAD_FILE_SIZE)
        self._inner = inner
        seen: set[str] = set()
        while (entry := inner.next()) is not None:
            name = entry.name
            if not fmt.is_safe_file_name(name):
                raise MalformedArtifact(f"{member}: unsafe file name {name!r}")
            if name in seen:
                raise MalformedArtifact(f"{member}: file {name!r} appears twice")
            if len(seen) >= fmt.MAX_FILES_PER_PAYLOAD:
                raise MalformedArtifact(f"{member}: more than {fmt.MAX_FILES_PER_PAYLOAD} files")
            checksum = expected.get(name)
            if checksum is None:
                raise MalformedArtifact(f"{self.what}: payload file {fmt.data_file_path(index, name)} is not in the manifest")
            seen.add(name)
            pf = PayloadFile(index, name, entry.size, entry.mode, entry.mtime, checksum, self)
            self._open_file = pf
            yield pf
            if pf.sha256 is None:  # the caller did not read it: verify it anyway
                for _ in self._stream_file(pf):
                    pass
            self._check_rootfs_checksum(index, pf)
        missing = sorted(set(expected) - seen)
        if missing:
            raise MalformedArtifact(
                f"{self.what}: the manifest lists {fmt.data_file_path(index, missing[0])} but the payload does not contain it"
            )
        self._decoded.close()
        self._decoded = None
        self._inner = None

    def _stream_file(self, pf: PayloadFile) -> Iterator[bytes]:
        if self._open_file is not pf or pf.sha256 is not None:
            raise RuntimeError(f"{pf.path} can only be read once, while it is the current file")
        inner = self._inner
        assert inner is not None
        h = hashlib.sha256()
        while inner.remaining:
            data = inner.read_some(CHUNK)
            h.update(data)
            yield data
        inner.finish_member()
        actual = h.hexdigest()
        if actual != pf.expected_sha256:
            raise ChecksumMismatch(pf.path, pf.expected_sha256, actual)
        pf.sha256 = actual

    def _check_rootfs_checksum(self, index: int, pf: PayloadFile) -> None:
        assert self.header is not None
        ti = self.header.type_infos[index]
        claimed = ti.provides.get(fmt.ROOTFS_CHECKSUM_KEY)
        if ti.type == fmt.ROOTFS_IMAGE and claimed is not None and claimed != pf.sha256:
            raise MalformedArtifact(
                f"{self.what}: type-info provides {fmt.ROOTFS_CHECKSUM_KEY}={claimed[:16]}… but the image's checksum "
                f"is {str(pf.sha256)[:16]}…"
            )

    @property
    def complete(self) -> bool:
        """True once every payload has been read and verified and the archive ended cleanly."""
        return self._done


def header_part_size(stream: BinaryIO | Any, *, what: str = "artifact", limit: int = fmt.MAX_HEADER_PART) -> int:
    """How many leading bytes of an artifact are its signed header part: the members ``version``, ``manifest``,
    ``manifest.sig`` (when signed) and ``header.tar*``, with their tar padding. Those bytes alone are what
    :meth:`ArtifactReader.read_header` reads and verifies, so an instant rollback (the server's header route,
    the device's check of a slot it kept) needs only them. Nothing is verified here; raises
    :class:`MalformedArtifact` for another layout or a part larger than ``limit``."""
    src = ByteSource(stream, what)
    tar = TarReader(src, what)
    leading = (fmt.VERSION_MEMBER, fmt.MANIFEST_MEMBER, fmt.SIGNATURE_MEMBER)
    while True:
        entry = tar.next()
        if entry is None or not (entry.name in leading or entry.name.startswith(fmt.HEADER_MEMBER_STEM)):
            raise MalformedArtifact(f"{what}: expected the header members first, found {_name(entry)}")
        if src.pos + entry.size > limit:
            raise MalformedArtifact(f"{what}: the header part is larger than {limit} bytes")
        tar.finish_member()
        if src.pos > limit:
            raise MalformedArtifact(f"{what}: the header part is larger than {limit} bytes")
        if entry.name.startswith(fmt.HEADER_MEMBER_STEM):
            return src.pos


def _name(entry: TarEntry | None) -> str:
    return "the end of the archive" if entry is None else repr(entry.name)


# ---------------------------------------------------------------------------------------------------------
# Convenience


@dataclass(frozen=True)
class FileInfo:
    path: str
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ArtifactInfo:
    """What ``artifact show`` prints: the verified header and every payload file."""

    path: str
    size: int
    format: str
    version: int
    header: ArtifactHeader
    header_member: str
    data_members: tuple[str, ...]
    files: tuple[FileInfo, ...]
    signature: SignatureStatus
    signed_by: str | None


def read_artifact(
    path: Path,
    verifiers: Sequence[Verifier] = (),
    *,
    require_signature: bool | None = None,
    payload_types: Collection[str] | None = None,
) -> ArtifactInfo:
    """Read and verify a whole artifact file. Raises an :class:`ArtifactError` subclass on any problem."""
    with ArtifactReader.open(
        path, verifiers=verifiers, require_signature=require_signature, payload_types=payload_types
    ) as r:
        files = []
        for pf in r.files():
            for _ in pf.chunks():
                pass
            assert pf.sha256 is not None
            files.append(FileInfo(pf.path, pf.name, pf.size, pf.sha256))
        assert r.header is not None and r.complete
        return ArtifactInfo(
            path=str(path),
            size=path.stat().st_size,
            format=str(r.version.get("format")),
            version=int(r.version.get("version", 0)),
            header=r.header,
            header_member=r.header_member,
            data_members=tuple(r.data_members),
            files=tuple(files),
            signature=r.signature_status,
            signed_by=r.signed_by,
        )


__all__ = [
    "ArtifactError",
    "ArtifactInfo",
    "ArtifactReader",
    "FileInfo",
    "PayloadFile",
    "SignatureStatus",
    "header_part_size",
    "read_artifact",
]
