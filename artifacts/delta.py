"""Block delta of a root filesystem image (payload type ``rootfs-delta``): make it on the build host, apply it
on the device while streaming.

Why blocks (measurements in docs/delta.md): ext4 stores file data in whole 4 KiB blocks, so a file that did
not change keeps block-aligned content wherever the new build placed it. Indexing the source image by a hash
of each 4 KiB block and walking the target block by block finds all of it; what is left (new files, changed
metadata) is compressed with xz. Only blocks that hold file data in the source are copied from it (a slot
mounted read-write gets its inodes, directories, bitmaps and journal rewritten, not the data of the files
the image shipped: :class:`Ext4FileBlocks`), so a delta applies to a slot that was in use. On the release
pairs of ``bench/delta.py`` this is smaller than xdelta3 -9 with a 1 GiB window and zstd -19
--patch-from, made in seconds instead of a minute (or six), and applied by a process of ~45 MB instead of
one holding the source in memory: the device reads the active slot with ``pread`` where the delta says.

Payload file format (one file, ``rootfs.delta``; all integers little-endian)::

    header (96 bytes)
      magic        8   b"VVDELTA\\n"
      version      2   1
      compression  2   1 = xz
      block_size   4   4096
      source_size  8   bytes of the source image
      target_size  8   bytes of the target image
      source_sha256 32
      target_sha256 32
    ops: one or more concatenated xz streams (CRC32 checks, LZMA2 dictionary <= 8 MiB) whose
         concatenated output is a sequence of operations, each a tag byte and unsigned LEB128 varints:
      0x01 COPY  count, zigzag(source_block - expected)   count blocks from the source, starting at
                 source_block; ``expected`` is the block after the previous COPY (0 at first)
      0x02 ZERO  count                                    count blocks of zeros
      0x03 DATA  count, then the bytes of those blocks     literal target bytes
      0x00 END                                            nothing may follow
    The operations cover ceil(target_size / block_size) blocks in order; the last block may be short, and
    COPY/ZERO/DATA of it produce only target_size % block_size bytes.

Applying needs only the standard library (Debian's python3 on the device): ``lzma`` for the op stream,
``os.pread``/``os.pwrite`` for the slots, ``hashlib`` for the result. Making runs on the build host.
"""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ota_common.errors import ArtifactError, UserError

from .zeroing import Zeroer

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .keys import Signer, Verifier
    from .writer import ArtifactSpec, WriteResult

DELTA_PAYLOAD_TYPE = "rootfs-delta"
#: the payload file's name inside the artifact
DELTA_FILE_NAME = "rootfs.delta"
MAGIC = b"VVDELTA\n"
FORMAT_VERSION = 1
COMPRESSION_XZ = 1
BLOCK_SIZE = 4096
_HEADER = struct.Struct("<8sHHIQQ32s32s")
HEADER_SIZE = _HEADER.size  # 96

OP_END, OP_COPY, OP_ZERO, OP_DATA = 0, 1, 2, 3

#: the decoder refuses a stream that needs more memory than this (ours need ~9 MiB: an 8 MiB dictionary)
DECODER_MEMLIMIT = 32 << 20
#: output is written in pieces of at most this size, and small pieces are gathered up to it (256 KiB: with
#: the pieces in flight between the two threads, a 1 MiB size cost 8 MB more peak memory and no speed)
WRITE_CHUNK = 256 << 10
#: flush the target to the medium every this many bytes, so a 1 GB board never holds much dirty data
SYNC_EVERY = 32 << 20
#: the biggest value a varint may have here (counts and block numbers of a 1 TiB image fit easily)
_MAX_VARINT = 1 << 40


class DeltaError(ArtifactError):
    """A delta cannot be applied: malformed or truncated, made for another source, or its result does not
    match the target checksum it promises. Nothing may be booted from what it wrote."""


@dataclass(frozen=True)
class DeltaHeader:
    version: int
    compression: int
    block_size: int
    source_size: int
    target_size: int
    source_sha256: str
    target_sha256: str

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, self.version, self.compression, self.block_size, self.source_size,
                            self.target_size, bytes.fromhex(self.source_sha256), bytes.fromhex(self.target_sha256))

    @property
    def target_blocks(self) -> int:
        return -(-self.target_size // self.block_size)


def parse_header(data: bytes) -> DeltaHeader:
    """The header at the start of a delta payload (at least :data:`HEADER_SIZE` bytes). Raises DeltaError."""
    if len(data) < HEADER_SIZE:
        raise DeltaError(f"delta is truncated: {len(data)} bytes, shorter than its {HEADER_SIZE}-byte header")
    magic, version, compression, block_size, source_size, target_size, src, tgt = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DeltaError("not a rootfs delta (bad magic)")
    if version != FORMAT_VERSION:
        raise DeltaError(f"delta format version {version} is not supported (only {FORMAT_VERSION})")
    if compression != COMPRESSION_XZ:
        raise DeltaError(f"delta compression {compression} is not supported (only 1 = xz)")
    if block_size != BLOCK_SIZE:
        raise DeltaError(f"delta block size {block_size} is not supported (only {BLOCK_SIZE})")
    if target_size > _MAX_VARINT or source_size > _MAX_VARINT:
        raise DeltaError("delta header: absurd image size")
    return DeltaHeader(version, compression, block_size, source_size, target_size, src.hex(), tgt.hex())


# ---------------------------------------------------------------------------------------------------------
# Applying (on the device: standard library only)


@dataclass(frozen=True)
class AppliedDelta:
    target_size: int
    target_sha256: str
    source_sha256: str  # from the delta header: the image the delta was made from
    copied_bytes: int
    literal_bytes: int
    zero_bytes: int


class _OpStream:
    """The decompressed op stream over the payload's byte chunks: concatenated xz streams."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._in = b""
        self._dec: lzma.LZMADecompressor | None = None
        self._streams = 0
        self._buf = b""
        self._pos = 0

    def _next_input(self) -> bytes | None:
        for chunk in self._chunks:
            if chunk:
                return bytes(chunk)
        return None

    def _more(self, want: int) -> bytes:
        """Up to ``want`` more decompressed bytes; b"" at the clean end of the input (after a whole stream)."""
        while True:
            dec = self._dec
            if dec is not None:
                if dec.eof:
                    self._in = dec.unused_data + self._in
                    self._dec = None
                    continue
                if not dec.needs_input:
                    out = self._decompress(b"", want)
                    if out:
                        return out
                    continue
            if not self._in:
                nxt = self._next_input()
                if nxt is None:
                    if dec is not None:
                        raise DeltaError("delta is truncated: its compressed op stream ends in the middle")
                    if self._streams == 0:
                        raise DeltaError("delta is truncated: no op stream after the header")
                    return b""
                self._in = nxt
            if self._dec is None:
                self._dec = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=DECODER_MEMLIMIT)
                self._streams += 1
            data, self._in = self._in, b""
            out = self._decompress(data, want)
            if out:
                return out

    def _decompress(self, data: bytes, want: int) -> bytes:
        assert self._dec is not None
        try:
            return self._dec.decompress(data, want)
        except lzma.LZMAError as e:
            raise DeltaError(f"delta op stream is corrupt: {e}") from None

    def byte(self) -> int:
        if self._pos >= len(self._buf):
            self._buf = self._more(WRITE_CHUNK)
            self._pos = 0
            if not self._buf:
                raise DeltaError("delta is truncated: the op stream ends before its END op")
        b = self._buf[self._pos]
        self._pos += 1
        return b

    def varint(self) -> int:
        value = shift = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 63:
                raise DeltaError("delta op stream is corrupt: a number is too long")
        if value > _MAX_VARINT:
            raise DeltaError("delta op stream is corrupt: absurd count or block number")
        return value

    def read_some(self, n: int) -> bytes:
        """1 to ``n`` bytes of op data; raises DeltaError at the end."""
        if self._pos >= len(self._buf):
            self._buf = self._more(max(n, 1 << 16))
            self._pos = 0
            if not self._buf:
                raise DeltaError("delta is truncated: the op stream ends inside literal data")
        end = min(len(self._buf), self._pos + n)
        data = self._buf[self._pos : end] if (self._pos, end) != (0, len(self._buf)) else self._buf
        self._pos = end
        return data

    def finish(self) -> None:
        """After END: nothing may follow, neither ops nor compressed data; the payload iterator is drained
        so that its own checks (the artifact reader's checksum) run."""
        if self._pos < len(self._buf):
            raise DeltaError("delta op stream is corrupt: data after the END op")
        try:
            extra = self._more(1)
        except DeltaError:
            raise DeltaError("delta is corrupt: data after its op stream") from None
        if extra:
            raise DeltaError("delta op stream is corrupt: data after the END op")


class _Target:
    """Sequential writer of the target (the calling thread): hashes what it writes, syncs periodically."""

    def __init__(self, fd: int, total: int, *, progress: Callable[[int, int], None] | None,
                 on_chunk: Callable[[], None] | None, fast_zero: bool) -> None:
        self.fd = fd
        self.total = total
        self.written = 0
        self.sha = hashlib.sha256()
        self.unsynced = 0
        self.progress = progress
        self.on_chunk = on_chunk
        self.zeroer = Zeroer(fd, fast_zero)
        self.zeros = bytes(WRITE_CHUNK)

    def zero(self, n: int) -> None:
        if n >= WRITE_CHUNK and self.zeroer(self.written, n):
            full, rest = divmod(n, WRITE_CHUNK)
            for _ in range(full):
                self.sha.update(self.zeros)
            self.sha.update(self.zeros[:rest])
            self.written += n
            self._after_write(n)
            return
        while n:
            k = min(n, WRITE_CHUNK)
            self.write(self.zeros[:k] if k < WRITE_CHUNK else self.zeros)
            n -= k

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        while done < len(data):
            try:
                n = os.pwrite(self.fd, view[done:], self.written + done)
            except OSError as e:
                raise OSError(e.errno, f"writing the target at byte {self.written + done}: {e.strerror}") from None
            if n <= 0:
                raise OSError(f"writing the target at byte {self.written + done}: no progress")
            done += n
        self.sha.update(data)
        self.written += len(data)
        self._after_write(len(data))

    def _after_write(self, n: int) -> None:
        self.unsynced += n
        if self.unsynced >= SYNC_EVERY:
            os.fdatasync(self.fd)
            self.unsynced = 0
        if self.on_chunk is not None:
            self.on_chunk()
        if self.progress is not None:
            self.progress(self.written, self.total)

    def close(self) -> None:
        os.fdatasync(self.fd)


class _Reader:
    """Turns the op stream into the target's bytes, in order: pieces of up to :data:`WRITE_CHUNK` bytes
    (small ones gathered) and zero runs (an int). Runs in its own thread, so that reading the source and
    decompressing overlap with hashing, writing and syncing the target."""

    def __init__(self, header: DeltaHeader, ops: _OpStream, source_fd: int, put: Callable[[object], None]) -> None:
        self.header = header
        self.ops = ops
        self.source_fd = source_fd
        self.put = put
        self.pending = bytearray()
        self.copied = self.literal = self.zeros = 0

    def _data(self, data: bytes) -> None:
        if not self.pending and len(data) >= WRITE_CHUNK // 2:
            self.put(data)
            return
        self.pending += data
        if len(self.pending) >= WRITE_CHUNK // 2:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.put(bytes(self.pending))
            self.pending.clear()

    def run(self) -> None:
        header, ops = self.header, self.ops
        bs = header.block_size
        expected_src = 0
        block = 0
        blocks = header.target_blocks
        tail = header.target_size - (blocks - 1) * bs if blocks else 0
        while True:
            op = ops.byte()
            if op == OP_END:
                break
            count = ops.varint()
            if count == 0:
                raise DeltaError(f"delta op stream is corrupt: an op of 0 blocks at target block {block}")
            if block + count > blocks:
                raise DeltaError(f"delta op stream is corrupt: an op covers blocks {block}..{block + count} "
                                 f"of a {blocks}-block target")
            n = count * bs if block + count < blocks else (count - 1) * bs + tail
            if op == OP_COPY:
                z = ops.varint()
                start = expected_src + ((z >> 1) ^ -(z & 1))
                self._copy(start * bs, n)
                expected_src = start + count
                self.copied += n
            elif op == OP_ZERO:
                self._flush()
                self.put(n)
                self.zeros += n
            elif op == OP_DATA:
                left = n
                while left:
                    data = ops.read_some(min(left, WRITE_CHUNK))
                    self._data(data)
                    left -= len(data)
                self.literal += n
            else:
                raise DeltaError(f"delta op stream is corrupt: unknown op {op:#x} at target block {block}")
            block += count
        if block != blocks:
            raise DeltaError(f"delta op stream is corrupt: it ends after {block} of {blocks} target blocks")
        ops.finish()
        self._flush()

    def _copy(self, offset: int, n: int) -> None:
        size = self.header.source_size
        if offset < 0 or offset + n > size:
            raise DeltaError(f"delta reads source bytes {offset}..{offset + n}, past the end of the "
                             f"{size}-byte source it was made for")
        done = 0
        while done < n:
            want = min(WRITE_CHUNK, n - done)
            try:
                data = os.pread(self.source_fd, want, offset + done)
            except OSError as e:
                raise OSError(e.errno, f"reading the source at byte {offset + done}: {e.strerror}") from None
            if len(data) != want:
                raise DeltaError(f"the source ends at byte {offset + done + len(data)}, but the delta reads up "
                                 f"to byte {offset + n} (it was made for a {size}-byte image)")
            self._data(data)
            done += want


class _Stopped(Exception):
    """The writer gave up: the reader thread ends quietly."""


_DONE = object()
#: pieces in flight between the reader thread and the writer (each at most WRITE_CHUNK bytes)
QUEUE_DEPTH = 4


def _read_header(chunks: Iterator[bytes]) -> tuple[DeltaHeader, bytes]:
    buf = b""
    for chunk in chunks:
        buf += chunk
        if len(buf) >= HEADER_SIZE:
            break
    return parse_header(buf), buf[HEADER_SIZE:]


def apply_delta(
    payload: Iterable[bytes],
    source_fd: int,
    target_fd: int,
    *,
    progress: Callable[[int, int], None] | None = None,
    on_chunk: Callable[[], None] | None = None,
    fast_zero: bool = True,
) -> AppliedDelta:
    """Apply a delta payload (its byte chunks, e.g. ``PayloadFile.chunks()``): read the source with
    ``os.pread(source_fd)``, write the target from offset 0 of ``target_fd``, hash what was written.

    Returns only when the written target matches the target checksum in the delta header; raises
    :class:`DeltaError` for a malformed or truncated delta, a read past the end of the source, and a result
    that does not match (the message says whether the source differs from the one the delta was made from).
    ``progress(written, total)`` and ``on_chunk()`` are called in the calling thread after each write to
    the target (pieces of at most 256 KiB); an exception they raise stops the apply and is raised as is, as
    is one raised by the ``payload`` iterator (a dropped download). A helper thread reads the payload and the
    source while the calling thread hashes and writes; both are done when this returns or raises. Long runs
    of zeros are zeroed by the kernel where it can (``fast_zero``). The target is flushed (``fdatasync``)
    every 32 MiB and at the end. Memory: ~20 MB above the interpreter's (an 8 MiB xz dictionary and a few
    pieces in flight), whatever the image size."""
    import queue
    import threading

    chunks = iter(payload)
    header, rest = _read_header(chunks)
    target = _Target(target_fd, header.target_size, progress=progress, on_chunk=on_chunk, fast_zero=fast_zero)
    pieces: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
    stop = threading.Event()

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                pieces.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stopped()

    reader = _Reader(header, _OpStream(_prepend(rest, chunks)), source_fd, put)

    def run() -> None:
        try:
            reader.run()
            put(_DONE)
        except _Stopped:
            pass
        except BaseException as e:  # handed to the writer, which raises it
            with contextlib.suppress(_Stopped):
                put(e)

    thread = threading.Thread(target=run, name="delta-reader", daemon=True)
    thread.start()
    try:
        while (item := pieces.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, int):
                target.zero(item)
            else:
                target.write(item)  # type: ignore[arg-type]
    finally:
        stop.set()
        thread.join()
    target.close()
    actual = target.sha.hexdigest()
    if target.written != header.target_size:  # cannot happen: the reader checks the block count
        raise DeltaError(f"delta wrote {target.written} bytes, not the target's {header.target_size}")
    if actual != header.target_sha256:
        raise DeltaError(_mismatch_reason(header, actual, source_fd))
    return AppliedDelta(header.target_size, actual, header.source_sha256, reader.copied, reader.literal, reader.zeros)


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _mismatch_reason(header: DeltaHeader, actual: str, source_fd: int) -> str:
    """Why the result differs: hash the source (only on this failure path) to tell a changed source slot
    from a bad delta."""
    msg = (f"the result of the delta has sha256 {actual[:16]}…, not the target's {header.target_sha256[:16]}…; "
           "the written slot must not be booted")
    h = hashlib.sha256()
    pos = 0
    try:
        while pos < header.source_size:
            data = os.pread(source_fd, min(WRITE_CHUNK, header.source_size - pos), pos)
            if not data:
                break
            h.update(data)
            pos += len(data)
    except OSError:
        return msg
    if pos == header.source_size and h.hexdigest() != header.source_sha256:
        # a slot that was mounted differs anyway; the delta copies only file data, so some of that changed
        return (f"{msg}: the source is not the image the delta was made from (its sha256 is "
                f"{h.hexdigest()[:16]}…, the delta's source is {header.source_sha256[:16]}…), and differs in the "
                "file data the delta copies: was a file of the image changed in place on this slot?")
    return f"{msg}: the source is the right image, so the delta itself is corrupt"


# ---------------------------------------------------------------------------------------------------------
# Making (on the build host)


@dataclass(frozen=True)
class DeltaStats:
    source_size: int
    source_sha256: str
    target_size: int
    target_sha256: str
    copied_bytes: int
    zero_bytes: int
    literal_bytes: int
    ops: int
    delta_size: int
    seconds: float


class Ext4FileBlocks:
    """Which blocks of an ext4 image hold the data of regular files and symlinks, learnt from the image as it
    streams by (superblock, group descriptors, then each inode table as it passes).

    A device mounts its root filesystem read-write: the running system rewrites inodes (atime), directories,
    bitmaps, the journal and the superblock, but it (almost) never rewrites the data of the files the image
    shipped. So a delta copies from the source only blocks that hold file data there; every other block of
    the target is sent, even when the source has it, and the delta still applies to a slot that was mounted
    (measured in docs/delta.md: a few hundred kB more, compressed). Anything this does not understand
    (not ext4, another block size, meta_bg, a tree block before its inode) just marks fewer blocks."""

    EXT4_MAGIC = 0xEF53
    INCOMPAT_64BIT = 0x80
    INCOMPAT_META_BG = 0x10
    RO_COMPAT_GDT_CSUM = 0x10
    RO_COMPAT_METADATA_CSUM = 0x400
    BG_INODE_UNINIT = 0x1
    EXTENTS_FL = 0x80000
    EXTENT_MAGIC = 0xF30A

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.is_ext4: bool | None = None  # unknown until block 0
        self.safe = bytearray()  # bit per block
        self._gdt_blocks = 0
        self._gdt = bytearray()
        self._tables: dict[int, tuple[int, int]] = {}  # inode table block -> (first inode number, inodes to read)
        self._tree_blocks: set[int] = set()  # extent tree blocks of file inodes, still to come

    def _mark(self, start: int, count: int) -> None:
        end = min(start + count, len(self.safe) * 8)
        for b in range(max(start, 0), end):
            self.safe[b >> 3] |= 1 << (b & 7)

    def is_file_data(self, block: int) -> bool:
        return self.is_ext4 is True and block >> 3 < len(self.safe) and bool(self.safe[block >> 3] & (1 << (block & 7)))

    def feed(self, n: int, blk: memoryview) -> None:
        """Block ``n`` of the image (in order)."""
        if self.is_ext4 is None:
            self._superblock(blk)
        elif self.is_ext4 and 1 <= n <= self._gdt_blocks:
            self._gdt += blk
            if n == self._gdt_blocks:
                self._descriptors()
        elif self.is_ext4 and n in self._tables:
            self._inodes(n, blk)
        elif self.is_ext4 and n in self._tree_blocks:
            self._tree_blocks.discard(n)
            self._extents(bytes(blk), 0, n)

    def _superblock(self, blk: memoryview) -> None:
        self.is_ext4 = False
        if len(blk) < 2048 or self.bs != 4096:
            return
        sb = bytes(blk[1024:2048])
        magic, = struct.unpack_from("<H", sb, 0x38)
        log_bs, = struct.unpack_from("<I", sb, 0x18)
        if magic != self.EXT4_MAGIC or 1024 << log_bs != self.bs:
            return
        self.inodes_count, blocks_lo, = struct.unpack_from("<II", sb, 0x00)
        self.blocks_per_group, = struct.unpack_from("<I", sb, 0x20)
        self.inodes_per_group, = struct.unpack_from("<I", sb, 0x28)
        incompat, ro_compat = struct.unpack_from("<II", sb, 0x60)[0], struct.unpack_from("<I", sb, 0x64)[0]
        self.first_ino, self.inode_size = struct.unpack_from("<IH", sb, 0x54)
        blocks_hi, = struct.unpack_from("<I", sb, 0x150)
        desc_size, = struct.unpack_from("<H", sb, 0xFE)
        first_data_block, = struct.unpack_from("<I", sb, 0x14)
        if incompat & self.INCOMPAT_META_BG or first_data_block != 0 or not self.blocks_per_group \
                or not self.inodes_per_group or self.inode_size < 128:
            return
        blocks = blocks_lo | ((blocks_hi << 32) if incompat & self.INCOMPAT_64BIT else 0)
        self.desc_size = desc_size if incompat & self.INCOMPAT_64BIT and desc_size >= 32 else 32
        self.groups = -(-blocks // self.blocks_per_group)
        self.csum = bool(ro_compat & (self.RO_COMPAT_GDT_CSUM | self.RO_COMPAT_METADATA_CSUM))
        self._gdt_blocks = -(-(self.groups * self.desc_size) // self.bs)
        self.safe = bytearray(-(-blocks // 8))
        self.is_ext4 = True

    def _descriptors(self) -> None:
        per_block = self.bs // self.inode_size
        table_blocks = -(-(self.inodes_per_group * self.inode_size) // self.bs)
        for g in range(self.groups):
            d = self._gdt[g * self.desc_size : (g + 1) * self.desc_size]
            table, = struct.unpack_from("<I", d, 0x08)
            flags, = struct.unpack_from("<H", d, 0x12)
            unused, = struct.unpack_from("<H", d, 0x1C)
            if self.desc_size >= 64:
                table |= struct.unpack_from("<I", d, 0x28)[0] << 32
                unused |= struct.unpack_from("<H", d, 0x32)[0] << 16
            if self.csum and flags & self.BG_INODE_UNINIT:
                continue
            used = self.inodes_per_group - (unused if self.csum else 0)
            for i in range(table_blocks):
                inodes = min(per_block, used - i * per_block)
                if inodes <= 0:
                    break
                self._tables[table + i] = (g * self.inodes_per_group + i * per_block + 1, inodes)
        self._gdt = bytearray()

    def _inodes(self, n: int, blk: memoryview) -> None:
        first, count = self._tables.pop(n)
        data = bytes(blk)
        for i in range(count):
            if first + i < self.first_ino:
                continue  # reserved inodes: the journal (8) is a "regular file" the running system rewrites
            off = i * self.inode_size
            mode, = struct.unpack_from("<H", data, off)
            if mode & 0xF000 not in (0x8000, 0xA000):
                continue
            links, = struct.unpack_from("<H", data, off + 0x1A)
            flags, = struct.unpack_from("<I", data, off + 0x20)
            if not links or not flags & self.EXTENTS_FL:
                continue
            self._extents(data[off + 0x28 : off + 0x28 + 60], 4, n)

    def _extents(self, node: bytes, most: int, here: int) -> None:
        """An extent tree node (in the inode, or a tree block): mark the data of a leaf; an index node's
        children are parsed when they pass by (mkfs.ext4 writes a file's tree block after its data, and the
        inode tables before both); one that already passed is not (its data stays uncopied)."""
        magic, entries, _, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != self.EXTENT_MAGIC or entries > (most or (len(node) - 12) // 12):
            return
        for e in range(entries):
            if depth == 0:
                _, length, hi, lo = struct.unpack_from("<IHHI", node, 12 + 12 * e)
                if length <= 32768:  # longer: an unwritten extent, read as zeros
                    self._mark(hi << 32 | lo, length)
            else:
                _, lo, hi = struct.unpack_from("<IIH", node, 12 + 12 * e)
                child = hi << 32 | lo
                if child > here:
                    self._tree_blocks.add(child)


#: an independent xz stream every this many bytes of ops, so that both cores compress
SEGMENT = 16 << 20
DEFAULT_LEVEL = 6


def _blocks(chunks: Iterable[bytes], bs: int) -> Iterator[memoryview]:
    """Block-sized views over a stream of chunks of any size (the last block may be short)."""
    carry = b""
    for chunk in chunks:
        mv = memoryview(chunk)
        if carry:
            need = bs - len(carry)
            carry += bytes(mv[:need])
            mv = mv[need:]
            if len(carry) < bs:
                continue
            yield memoryview(carry)
            carry = b""
        full = len(mv) - len(mv) % bs
        for o in range(0, full, bs):
            yield mv[o : o + bs]
        if full < len(mv):
            carry = bytes(mv[full:])
    if carry:
        yield memoryview(carry)


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


class _Encoder:
    """Ops into segments, each compressed into its own xz stream by a thread pool, written in order."""

    def __init__(self, out: BinaryIO, level: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.out = out
        self.filters = [{"id": lzma.FILTER_LZMA2, "preset": level, "dict_size": min(8 << 20, SEGMENT)}]
        self.workers = max(1, min(4, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(max_workers=self.workers)
        self.futures: list[Future[bytes]] = []
        self.buf = bytearray()
        self.ops = 0
        self.expected_src = 0

    def _compress(self, data: bytes) -> bytes:
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=self.filters)

    def _push(self) -> None:
        data = bytes(self.buf)
        self.buf.clear()
        self.futures.append(self.pool.submit(self._compress, data))
        while len(self.futures) > self.workers + 1 or (self.futures and self.futures[0].done()):
            self.out.write(self.futures.pop(0).result())

    def op(self, tag: int, count: int, src: int = 0, data: bytes | bytearray | memoryview | None = None) -> None:
        self.ops += 1
        self.buf.append(tag)
        self.buf += _varint(count)
        if tag == OP_COPY:
            d = src - self.expected_src
            self.buf += _varint((d << 1) ^ (d >> 63) if d < 0 else d << 1)
            self.expected_src = src + count
        if data is not None:
            self.buf += data
        if len(self.buf) >= SEGMENT:
            self._push()

    def close(self) -> None:
        self.buf.append(OP_END)
        self._push()
        for f in self.futures:
            self.out.write(f.result())
        self.futures.clear()
        self.pool.shutdown()


def make_delta(
    source: Iterable[bytes],
    target: Iterable[bytes],
    out: BinaryIO,
    *,
    level: int = DEFAULT_LEVEL,
    progress: Callable[[str], None] | None = None,
) -> DeltaStats:
    """Write the delta that turns ``source`` into ``target`` (both streams of byte chunks, each read once, in
    order) to ``out`` (seekable: the header is filled in at the end). ``level`` is the xz preset (0-9).

    Memory: an index of 16 bytes per distinct non-zero source block (~50 MB for a 1.2 GiB image) and a few
    segments of ops in flight."""
    t0 = time.monotonic()
    bs = BLOCK_SIZE
    zero = bytes(bs)
    start = out.tell()
    out.write(bytes(HEADER_SIZE))

    # 1. index the source: a block number of each distinct full, non-zero block (one holding file data if
    #    there is one: see Ext4FileBlocks); digests in order
    index: dict[bytes, int] = {}
    digests = bytearray()
    src_sha = hashlib.sha256()
    src_size = 0
    n = 0
    files = Ext4FileBlocks(bs)
    for blk in _blocks(source, bs):
        src_sha.update(blk)
        src_size += len(blk)
        files.feed(n, blk)
        if len(blk) == bs and blk != zero:
            d = hashlib.sha256(blk).digest()[:16]
            old = index.get(d)
            if old is None or (not files.is_file_data(old) and files.is_file_data(n)):
                index[d] = n
            digests += d
        else:
            digests += bytes(16)
        n += 1
    if files.is_ext4:
        copyable = files.is_file_data
    else:  # not an ext4 image we understand: any block may be copied (nothing rewrites it behind our back)
        def copyable(block: int) -> bool:
            return True
    if progress:
        progress(f"source indexed: {src_size} bytes, {len(index)} distinct blocks, "
                 f"{'ext4: copying file data only' if files.is_ext4 else 'not ext4: copying any block'} "
                 f"({time.monotonic() - t0:.1f} s)")

    # 2. walk the target: runs of COPY (continuing the previous run when possible), ZERO and DATA
    enc = _Encoder(out, level)
    tgt_sha = hashlib.sha256()
    tgt_size = copied = zeros = literal = 0
    run_tag = -1
    run_count = run_src = 0
    run_data = bytearray()
    prev_src = -2

    def flush_run() -> None:
        nonlocal run_tag, run_count
        if run_tag == OP_DATA:
            enc.op(OP_DATA, run_count, data=run_data)
            run_data.clear()
        elif run_tag == OP_COPY:
            enc.op(OP_COPY, run_count, src=run_src)
        elif run_tag == OP_ZERO:
            enc.op(OP_ZERO, run_count)
        run_tag, run_count = -1, 0

    try:
        for blk in _blocks(target, bs):
            tgt_sha.update(blk)
            size = len(blk)
            tgt_size += size
            if blk == zero[:size]:
                tag, src = OP_ZERO, 0
                zeros += size
            else:
                src = -1
                if size == bs:
                    d = hashlib.sha256(blk).digest()[:16]
                    nxt = prev_src + 1
                    if run_tag == OP_COPY and nxt < n and digests[nxt * 16 : nxt * 16 + 16] == d and copyable(nxt):
                        src = nxt
                    else:
                        src = index.get(d, -1)
                        if src >= 0 and not copyable(src):
                            src = -1
                if src >= 0:
                    tag = OP_COPY
                    copied += size
                else:
                    tag = OP_DATA
                    literal += size
            if tag == OP_COPY:
                if run_tag == OP_COPY and src == prev_src + 1:
                    run_count += 1
                else:
                    flush_run()
                    run_tag, run_count, run_src = OP_COPY, 1, src
                prev_src = src
                continue
            if tag != run_tag or (tag == OP_DATA and len(run_data) >= SEGMENT):
                flush_run()
                run_tag = tag
            run_count += 1
            if tag == OP_DATA:
                run_data += blk
        flush_run()
        enc.close()
    finally:
        enc.pool.shutdown(cancel_futures=True)
    end = out.tell()
    header = DeltaHeader(FORMAT_VERSION, COMPRESSION_XZ, bs, src_size, tgt_size, src_sha.hexdigest(), tgt_sha.hexdigest())
    out.seek(start)
    out.write(header.pack())
    out.seek(end)
    stats = DeltaStats(src_size, header.source_sha256, tgt_size, header.target_sha256, copied, zeros, literal,
                       enc.ops, end - start, time.monotonic() - t0)
    if progress:
        progress(f"delta made: {stats.delta_size} bytes, {literal} literal bytes ({stats.seconds:.1f} s)")
    return stats


# ---------------------------------------------------------------------------------------------------------
# Delta artifacts


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


@dataclass(frozen=True)
class DeltaArtifactResult:
    artifact: WriteResult
    stats: DeltaStats
    source: RootfsArtifactInfo
    target: RootfsArtifactInfo


@contextlib.contextmanager
def _open_rootfs(path: Path, role: str, verifiers: Sequence[Verifier]) -> Iterator[tuple[RootfsArtifactInfo, Iterator[bytes], Callable[[], None]]]:
    """Open a full rootfs-image artifact: its description, the chunks of its image (verified against the
    manifest as they stream) and a function that checks the rest of the archive once the image was read."""
    from . import format as fmt
    from .reader import ArtifactReader
    from .writer import SECURITY_VERSION_KEY

    with ArtifactReader.open(path, verifiers=verifiers, require_signature=bool(verifiers)) as r:
        h = r.read_header()
        types = h.info.payload_types
        if types != (fmt.ROOTFS_IMAGE,):
            raise UserError(f"--{role} {path}: not a full rootfs-image artifact (payload types: {', '.join(types)})")
        files = r.files()
        pf = next(files, None)
        if pf is None:
            raise UserError(f"--{role} {path}: the rootfs-image payload has no file")
        provides = h.type_infos[0].provides
        info = RootfsArtifactInfo(path, h.info.artifact_name, h.info.device_types,
                                  provides.get(fmt.ROOTFS_VERSION_KEY), provides.get(fmt.ROOTFS_CHECKSUM_KEY), pf.size,
                                  provides.get(SECURITY_VERSION_KEY))

        def finish() -> None:
            rest = next(files, None)
            if rest is not None:
                raise UserError(f"--{role} {path}: the rootfs-image payload has more than one file ({rest.name})")
            if not r.complete:
                raise DeltaError(f"--{role} {path}: the artifact did not end cleanly")

        yield info, pf.chunks(), finish


def make_delta_payload(old: Path, new: Path, out: Path, *, level: int = DEFAULT_LEVEL,
                       verifiers: Sequence[Verifier] = (),
                       progress: Callable[[str], None] | None = None) -> tuple[DeltaStats, RootfsArtifactInfo, RootfsArtifactInfo]:
    """Read two full rootfs-image artifacts (verifying structure and checksums, and signatures when
    ``verifiers`` are given) and write the delta payload file ``out``. Raises UserError when they cannot
    make a delta (not rootfs-image, no common device type, the same image)."""
    with _open_rootfs(old, "from", verifiers) as (src, src_chunks, src_finish), \
            _open_rootfs(new, "to", verifiers) as (tgt, tgt_chunks, tgt_finish):
        missing = [t for t in tgt.device_types if t not in src.device_types]
        if missing:
            raise UserError(f"{new} is for device type(s) {', '.join(missing)} that {old} is not for "
                            f"({', '.join(src.device_types)}): a delta needs the same device types")
        if src.checksum is not None and src.checksum == tgt.checksum:
            raise UserError(f"{old} and {new} hold the same image (rootfs-image.checksum {src.checksum[:16]}…): "
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
        raise UserError(f"{old} and {new} hold the same image: there is nothing to send")
    for info, actual in ((src, stats.source_sha256), (tgt, stats.target_sha256)):
        if info.checksum is not None and info.checksum != actual:  # the reader checks this too
            raise DeltaError(f"{info.path}: rootfs-image.checksum says {info.checksum[:16]}…, the image is {actual[:16]}…")
    return stats, src, tgt


def delta_artifact_spec(payload: Path, stats: DeltaStats, target: RootfsArtifactInfo) -> ArtifactSpec:
    """The artifact spec of a delta: named and typed like the target, installable only on its source."""
    from . import format as fmt
    from .writer import SECURITY_VERSION_KEY, ArtifactSpec, PayloadSpec

    provides = {fmt.ROOTFS_CHECKSUM_KEY: stats.target_sha256}
    if target.version is not None:
        provides[fmt.ROOTFS_VERSION_KEY] = target.version
    if target.security_version is not None:  # the device checks it on a delta as on a full artifact
        provides[SECURITY_VERSION_KEY] = target.security_version
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
                       "target_size": stats.target_size},
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
    existing delta payload file for the same two images is reused (e.g. one per board of a release)."""
    import tempfile

    from .format import Compression
    from .writer import write_artifact

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
        result = write_artifact(delta_artifact_spec(file, stats, tgt), out, compression=Compression.NONE, signer=signer)
    return DeltaArtifactResult(result, stats, src, tgt)


def _reuse_payload(old: Path, new: Path, payload: Path,
                   verifiers: Sequence[Verifier]) -> tuple[DeltaStats, RootfsArtifactInfo, RootfsArtifactInfo]:
    """Stats of an existing payload file, after checking against the verified headers of ``old`` and ``new``
    that it is the delta between their images (their payloads were verified when it was made)."""
    from . import format as fmt
    from .reader import ArtifactReader
    from .writer import SECURITY_VERSION_KEY

    infos = []
    for path, role in ((old, "from"), (new, "to")):
        with ArtifactReader.open(path, verifiers=verifiers, require_signature=bool(verifiers)) as r:
            h = r.read_header()
        if h.info.payload_types != (fmt.ROOTFS_IMAGE,):
            raise UserError(f"--{role} {path}: not a full rootfs-image artifact")
        provides = h.type_infos[0].provides
        infos.append(RootfsArtifactInfo(path, h.info.artifact_name, h.info.device_types,
                                        provides.get(fmt.ROOTFS_VERSION_KEY), provides.get(fmt.ROOTFS_CHECKSUM_KEY), 0,
                                        provides.get(SECURITY_VERSION_KEY)))
    with open(payload, "rb") as f:
        header = parse_header(f.read(HEADER_SIZE))
    if (infos[0].checksum, infos[1].checksum) != (header.source_sha256, header.target_sha256):
        raise UserError(f"{payload} is not the delta from {old} to {new}")
    missing = [t for t in infos[1].device_types if t not in infos[0].device_types]
    if missing:
        raise UserError(f"{new} is for device type(s) {', '.join(missing)} that {old} is not for")
    stats = DeltaStats(header.source_size, header.source_sha256, header.target_size, header.target_sha256,
                       0, 0, 0, 0, payload.stat().st_size, 0.0)
    return stats, infos[0], infos[1]


__all__ = [
    "DELTA_PAYLOAD_TYPE",
    "AppliedDelta",
    "DeltaArtifactResult",
    "DeltaError",
    "DeltaHeader",
    "DeltaStats",
    "apply_delta",
    "make_delta",
    "make_delta_payload",
    "parse_header",
    "write_delta_artifact",
]
