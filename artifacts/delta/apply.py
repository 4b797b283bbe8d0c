"""Applying a delta payload (on the device: standard library only, Debian's python3): ``lzma`` for the op
stream, ``os.pread``/``os.pwrite`` for the slots, ``hashlib`` for the result. It imports nothing of the make
side (:mod:`.make`, :mod:`.ext4`, :mod:`.artifact`). The format is :mod:`.format`."""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..blockwrite import SYNC_EVERY, BlockWriter, IndexedOld
from .format import (
    HEADER_SIZE,
    MAX_TABLE_BLOCK,
    MAX_TABLE_BYTES,
    MAX_VARINT,
    MIN_TABLE_BLOCK,
    OP_COPY,
    OP_DATA,
    OP_END,
    OP_ZERO,
    TABLE_DIGEST_SIZE,
    TABLE_VERSION,
    DeltaError,
    DeltaHeader,
    parse_header,
)

#: the decoder refuses a stream that needs more memory than this (ours need ~9 MiB: an 8 MiB dictionary)
DECODER_MEMLIMIT = 32 << 20
#: output is written in pieces of at most this size, and small pieces are gathered up to it (256 KiB: with
#: the pieces in flight between the two threads, a 1 MiB size cost 8 MB more peak memory and no speed)
WRITE_CHUNK = 256 << 10


@dataclass(frozen=True)
class AppliedDelta:
    target_size: int
    target_sha256: str | None  # None: not hashed (``apply_delta(..., hash_target=False)``)
    source_sha256: str  # from the delta header: the image the delta was made from
    copied_bytes: int
    literal_bytes: int
    zero_bytes: int
    held_bytes: int = 0  # not produced at all: the slot's index says it holds them (the delta's digest table)


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
        if value > MAX_VARINT:
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

    def table(self, target_size: int) -> tuple[int, bytes]:
        """The digest table at the start of a version-2 op stream: its block size and digests."""
        block = self.varint()
        count = self.varint()
        if block < MIN_TABLE_BLOCK or block > MAX_TABLE_BLOCK or block & (block - 1):
            raise DeltaError(f"delta digest table: block size {block} is not a power of two from "
                             f"{MIN_TABLE_BLOCK} to {MAX_TABLE_BLOCK}")
        if count != -(-target_size // block):
            raise DeltaError(f"delta digest table: {count} digests for a {target_size}-byte target in "
                             f"{block}-byte blocks")
        want = count * TABLE_DIGEST_SIZE
        if want > MAX_TABLE_BYTES:
            raise DeltaError(f"delta digest table: {want} bytes is absurd")
        table = bytearray()
        while len(table) < want:
            table += self.read_some(want - len(table))
        return block, bytes(table)

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
    """Sequential writer of the target (the calling thread): hashes what it is given, writes it through a
    :class:`~artifacts.blockwrite.BlockWriter` (which skips what the slot already holds when it knows, zeroes
    zero ranges, and syncs periodically)."""

    def __init__(self, blocks: BlockWriter, total: int, *, progress: Callable[[int, int], None] | None,
                 on_chunk: Callable[[], None] | None, hash_target: bool = True) -> None:
        self.blocks = blocks
        self.total = total
        self.written = 0
        self.sha = hashlib.sha256() if hash_target else None
        self.progress = progress
        self.on_chunk = on_chunk
        self.zeros = bytes(WRITE_CHUNK)

    def zero(self, n: int) -> None:
        if self.sha is not None:
            full, rest = divmod(n, WRITE_CHUNK)
            for _ in range(full):
                self.sha.update(self.zeros)
            self.sha.update(self.zeros[:rest])
        self.blocks.zero(n)
        self.written += n
        self._after_write()

    def hold(self, n: int) -> None:
        assert self.sha is None, "held blocks are never produced, so they cannot be hashed"
        self.blocks.hold(n)
        self.written += n
        self._after_write()

    def write(self, data: bytes) -> None:
        if self.sha is not None:
            self.sha.update(data)
        self.blocks.write(data)
        self.written += len(data)
        self._after_write()

    def _after_write(self) -> None:
        if self.on_chunk is not None:
            self.on_chunk()
        if self.progress is not None:
            self.progress(self.written, self.total)

    def close(self) -> None:
        self.blocks.finish()


@dataclass(frozen=True)
class _Held:
    """A run of whole blocks of the target that the slot already holds: nothing to produce or write."""

    length: int


class _Reader:
    """Turns the op stream into the target's bytes, in order: pieces of up to :data:`WRITE_CHUNK` bytes
    (small ones gathered), zero runs (an int) and runs the slot already holds (:class:`_Held`). Runs in its
    own thread, so that reading the source and decompressing overlap with hashing, writing and syncing the
    target.

    ``held(i)``: whether block ``i`` (of ``held_block`` bytes) of the target is already in the slot; its bytes
    are then neither read from the source nor taken from the op stream's literals (they are decompressed and
    dropped)."""

    def __init__(self, header: DeltaHeader, ops: _OpStream, source_fd: int, put: Callable[[object], None],
                 held: Callable[[int], bool] | None = None, held_block: int = 0) -> None:
        self.header = header
        self.ops = ops
        self.source_fd = source_fd
        self.put = put
        self.pending = bytearray()
        self.copied = self.literal = self.zeros = self.held_bytes = 0
        self.held = held
        self.held_block = held_block
        self.holding = 0  # bytes of a held run not yet handed over
        self._last: tuple[int, bool] = (-1, False)

    def _is_held(self, block: int) -> bool:
        if self._last[0] != block:
            assert self.held is not None
            self._last = (block, self.held(block))
        return self._last[1]

    def _hold(self, n: int) -> None:
        if self.pending:  # (a held run and gathered data are never both pending)
            self.put(bytes(self.pending))
            self.pending.clear()
        self.holding += n
        self.held_bytes += n

    def _release(self) -> None:
        if self.holding:
            self.put(_Held(self.holding))
            self.holding = 0

    def _data(self, data: bytes) -> None:
        self._release()
        if not self.pending and len(data) >= WRITE_CHUNK // 2:
            self.put(data)
            return
        self.pending += data
        if len(self.pending) >= WRITE_CHUNK // 2:
            self._flush()

    def _flush(self) -> None:
        self._release()
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
                self._check_source(start * bs, n)
                self._span(op, block * bs, n, start * bs)
                expected_src = start + count
                self.copied += n
            elif op == OP_ZERO:
                self._span(op, block * bs, n, 0)
                self.zeros += n
            elif op == OP_DATA:
                self._span(op, block * bs, n, 0)
                self.literal += n
            else:
                raise DeltaError(f"delta op stream is corrupt: unknown op {op:#x} at target block {block}")
            block += count
        if block != blocks:
            raise DeltaError(f"delta op stream is corrupt: it ends after {block} of {blocks} target blocks")
        ops.finish()
        self._flush()

    def _span(self, op: int, pos: int, n: int, src: int) -> None:
        """Produce target bytes ``pos..pos + n`` of one op (``src``: where a COPY reads), leaving out the blocks
        the slot holds."""
        if self.held is None:
            self._produce(op, n, src)
            return
        hb = self.held_block
        while n:
            seg = min(n, hb - pos % hb)
            if self._is_held(pos // hb):
                if op == OP_DATA:
                    self._drop_literal(seg)
                self._hold(seg)
            else:
                self._produce(op, seg, src)
            pos += seg
            src += seg
            n -= seg

    def _produce(self, op: int, n: int, src: int) -> None:
        if op == OP_COPY:
            self._copy(src, n)
        elif op == OP_ZERO:
            self._flush()
            self.put(n)
        else:
            left = n
            while left:
                data = self.ops.read_some(min(left, WRITE_CHUNK))
                self._data(data)
                left -= len(data)

    def _drop_literal(self, n: int) -> None:
        while n:
            n -= len(self.ops.read_some(min(n, WRITE_CHUNK)))

    def _check_source(self, offset: int, n: int) -> None:
        size = self.header.source_size
        if offset < 0 or offset + n > size:
            raise DeltaError(f"delta reads source bytes {offset}..{offset + n}, past the end of the "
                             f"{size}-byte source it was made for")

    def _copy(self, offset: int, n: int) -> None:
        size = self.header.source_size
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


def _head(chunks: Iterator[bytes]) -> bytes:
    """The first chunks of a payload: at least its :data:`HEADER_SIZE` bytes, unless it is shorter."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        if len(buf) >= HEADER_SIZE:
            break
    return buf


def peek_header(payload: Iterable[bytes]) -> tuple[DeltaHeader, Iterator[bytes]]:
    """The header of a delta payload (byte chunks), and the payload's chunks again from its first byte, to
    give to :func:`apply_delta`: so a caller checks the header (the target checksum against a signed one, the
    target size against the slot) before it opens or writes anything. Raises :class:`DeltaError`."""
    chunks = iter(payload)
    head = _head(chunks)
    return parse_header(head), _prepend(head, chunks)


def apply_delta(
    payload: Iterable[bytes],
    source_fd: int,
    target_fd: int,
    *,
    progress: Callable[[int, int], None] | None = None,
    on_chunk: Callable[[], None] | None = None,
    fast_zero: bool = True,
    blocks: BlockWriter | None = None,
    hash_target: bool = True,
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
    every 32 MiB and at the end. ``blocks``: the writer of ``target_fd`` to use instead of a plain one (one
    that skips the blocks the slot already holds; ``fast_zero`` is then its own). Memory: ~20 MB above the interpreter's (an 8 MiB xz dictionary and a few
    pieces in flight), whatever the image size. ``hash_target=False``: the result is not hashed (and
    ``target_sha256`` is None): for a caller that reads the written target back against the signed checksum
    anyway (the device's install), hashing it twice is the larger part of an install's CPU time on a Pi. Then, for a
    delta with a digest table (format 2) and ``blocks`` whose old content is the slot's block index
    (:class:`~artifacts.blockwrite.IndexedOld`), the blocks the index says the slot already holds are not produced
    at all (``held_bytes``): nothing is read from the source for them, and their literals are dropped."""
    import queue
    import threading

    chunks = iter(payload)
    head = _head(chunks)
    header = parse_header(head)
    if blocks is None:
        blocks = BlockWriter(target_fd, fast_zero=fast_zero)
    elif blocks.fd != target_fd or blocks.pos or blocks.buf:
        raise ValueError("the block writer given must be a fresh one of the target")
    target = _Target(blocks, header.target_size, progress=progress, on_chunk=on_chunk, hash_target=hash_target)
    ops = _OpStream(_prepend(head[HEADER_SIZE:], chunks))
    held, held_block = _held_blocks(header, ops, blocks, hash_target)
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

    reader = _Reader(header, ops, source_fd, put, held, held_block)

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
            elif isinstance(item, _Held):
                target.hold(item.length)
            else:
                target.write(item)  # type: ignore[arg-type]
    finally:
        stop.set()
        thread.join()
    target.close()
    if target.written != header.target_size:  # cannot happen: the reader checks the block count
        raise DeltaError(f"delta wrote {target.written} bytes, not the target's {header.target_size}")
    actual = None if target.sha is None else target.sha.hexdigest()
    if actual is not None and actual != header.target_sha256:
        raise DeltaError(mismatch_reason(header, actual, source_fd))
    return AppliedDelta(header.target_size, actual, header.source_sha256, reader.copied, reader.literal, reader.zeros,
                        reader.held_bytes)


def _held_blocks(header: DeltaHeader, ops: _OpStream, blocks: BlockWriter,
                 hash_target: bool) -> tuple[Callable[[int], bool] | None, int]:
    """Read a version-2 delta's digest table (from the calling thread, before the reader starts) and say which
    blocks the slot already holds: those whose digest the slot's index (``blocks.old``, an
    :class:`~artifacts.blockwrite.IndexedOld`) records for that block. The table also spares the writer hashing
    the blocks it writes (``blocks.given``). Nothing is held when the result is hashed (held bytes are never
    produced), without an index, or when block sizes differ."""
    if header.version < TABLE_VERSION:
        return None, 0
    table_block, table = ops.table(header.target_size)
    if table_block != blocks.block_size:
        return None, 0
    blocks.given = table
    old = blocks.old
    if hash_target or not isinstance(old, IndexedOld) or old.block_size != table_block:
        return None, 0
    size = header.target_size

    def held(i: int) -> bool:
        return old.holds(i, min(table_block, size - i * table_block),
                         table[i * TABLE_DIGEST_SIZE : (i + 1) * TABLE_DIGEST_SIZE])

    return held, table_block


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def mismatch_reason(header: DeltaHeader, actual: str, source_fd: int) -> str:
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


__all__ = ["DECODER_MEMLIMIT", "SYNC_EVERY", "WRITE_CHUNK", "AppliedDelta", "apply_delta", "mismatch_reason",
           "peek_header"]
