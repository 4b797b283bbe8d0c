"""Streaming compression and decompression of artifact members, using both cores.

gzip is written as a series of independent gzip members of about 4 MiB each (a multi-member gzip file is a
valid gzip file: Go's ``compress/gzip``, Python's :mod:`gzip`, zcat and mender-artifact all read it).
Each member carries an extra-field subfield ``OT`` holding its total size in bytes, so a reader that knows
it can split the stream and inflate members in parallel; a reader that does not ignores the subfield
(RFC 1952 §2.3.1.1). Compression and inflation run in worker threads (ISA-L and zlib release the GIL),
while the calling thread hashes. gzip streams from other writers are inflated sequentially in a background
thread, so hashing still overlaps with inflation.

Memory stays bounded: at most a few chunks are in flight whatever the size of the payload.
"""

from __future__ import annotations

import contextlib
import io
import lzma
import os
import queue
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from ota_common.errors import MalformedArtifact, TruncatedArtifact, UnsupportedArtifact
from ota_common.runtime import TRIM_EVERY_CHUNKS, release_free_memory

from .format import Compression

try:  # ISA-L: 3-5x faster deflate/inflate; optional so the device agent runs on Debian's python3 alone
    from isal import igzip_lib, isal_zlib

    _zlib: Any = isal_zlib
except ImportError:
    igzip_lib = None  # type: ignore[assignment]
    _zlib = zlib

CHUNK = 2 << 20
#: a gzip member may not inflate to more than this (our writer uses CHUNK + a tar header)
MAX_MEMBER_OUTPUT = 16 << 20
MAX_MEMBER_INPUT = 17 << 20
_SUBFIELD_ID = b"OT"
_GZIP_MAGIC = b"\x1f\x8b\x08"
_FTEXT, _FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 1, 2, 4, 8, 16
DEFAULT_GZIP_LEVEL = 1  # ISA-L level 1: measured fastest at ~1.06x the size of Go's default (bench/)


def workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class OrderedWork:
    """Runs ``fn`` on submitted arguments in a thread pool and hands results back in submission order.

    The calling thread never sits idle while work is queued: when the oldest result is not ready, it runs
    queued jobs itself (the oldest one if nobody started it yet, else later ones) instead of waiting. So the
    caller's own work (hashing) and the jobs share the cores without oversubscribing them. Every
    ``TRIM_EVERY_CHUNKS`` results it gives the allocator's free pages back (``release_free_memory``)."""

    def __init__(self, fn: Callable[..., bytes], threads: int, window: int, name: str) -> None:
        self._fn = fn
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name) if threads > 0 else None
        self._jobs: deque[tuple[Future[bytes], tuple[Any, ...]]] = deque()
        self.window = window
        self._popped = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def submit(self, *args: Any) -> None:
        if self._pool is None:
            done: Future[bytes] = Future()
            done.set_result(self._fn(*args))
            self._jobs.append((done, args))
        else:
            self._jobs.append((self._pool.submit(self._fn, *args), args))

    def full(self) -> bool:
        return len(self._jobs) >= self.window

    def pop(self) -> bytes:
        """The oldest job's result."""
        self._popped += 1
        if self._popped % TRIM_EVERY_CHUNKS == 0:
            release_free_memory()
        fut, args = self._jobs.popleft()
        if fut.cancel():
            return self._fn(*args)
        for i in range(len(self._jobs) - 1, -1, -1):
            if fut.done():
                break
            other, other_args = self._jobs[i]
            if other.cancel():
                stolen: Future[bytes] = Future()
                try:
                    stolen.set_result(self._fn(*other_args))
                except BaseException as e:  # delivered in order, when its turn comes
                    stolen.set_exception(e)
                self._jobs[i] = (stolen, other_args)
        return fut.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._jobs.clear()


def helper_threads() -> int:
    """Threads besides the caller's: the caller hashes and helps (see :class:`OrderedWork`)."""
    return max(1, workers() - 1)


# ---------------------------------------------------------------------------------------------------------
# Encoders: write(data) any number of times, then close(). They never close the underlying file.


class Encoder(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class _PlainEncoder:
    def __init__(self, out: Sink) -> None:
        self._out = out

    def write(self, data: bytes) -> None:
        self._out.write(data)

    def close(self) -> None:
        pass


def _gzip_member(pieces: list[bytes], level: int) -> bytes:
    """One complete gzip member with our size subfield."""
    total = sum(len(p) for p in pieces)
    if len(pieces) == 1 and total == CHUNK and pieces[0][:4096] == _ZEROS[:4096] and pieces[0] == _ZEROS:
        return _zero_member(level)
    comp = _zlib.compressobj(level, _zlib.DEFLATED, -15)
    body = [comp.compress(p) for p in pieces]
    body.append(comp.flush())
    crc = 0
    for p in pieces:
        crc = _zlib.crc32(p, crc)
    size = 10 + 2 + 8 + sum(len(b) for b in body) + 8
    header = _GZIP_MAGIC + bytes([_FEXTRA]) + b"\x00\x00\x00\x00\x00\xff"
    extra = _SUBFIELD_ID + struct.pack("<HI", 4, size)
    # one join: every intermediate copy of a chunk-sized buffer is more churn for the allocator (see
    # ota_common.runtime.tune_malloc_for_streaming)
    return b"".join([header, struct.pack("<H", len(extra)), extra, *body, struct.pack("<II", crc, total & 0xFFFFFFFF)])


_ZEROS = bytes(CHUNK)
_zero_members: dict[int, bytes] = {}


def _zero_member(level: int) -> bytes:
    """Empty filesystem space is common in slot images: compress a chunk of zeros once."""
    member = _zero_members.get(level)
    if member is None:
        member = _zero_members[level] = _gzip_member([_ZEROS, b""], level)
    return member


class ParallelGzipEncoder:
    """Compresses ~CHUNK-sized pieces of the input as independent gzip members in a thread pool and writes
    them in order."""

    def __init__(self, out: Sink, level: int = DEFAULT_GZIP_LEVEL, threads: int | None = None) -> None:
        self._out = out
        self._level = level
        n = helper_threads() if threads is None else threads
        self._work = OrderedWork(_gzip_member, n, n + 2, "gzip")
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._members = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pieces.append(bytes(data))
        self._buffered += len(data)
        if self._buffered >= CHUNK:
            self._submit()

    def _submit(self) -> None:
        pieces, self._pieces, self._buffered = self._pieces, [], 0
        self._work.submit(pieces, self._level)
        self._members += 1
        while self._work.full():
            self._out.write(self._work.pop())

    def close(self) -> None:
        try:
            if self._pieces or self._members == 0:
                self._submit()
            while len(self._work):
                self._out.write(self._work.pop())
        finally:
            self._work.close()


class ThreadedEncoder:
    """Runs a single-stream compressor (lzma, zstd) in a background thread so the caller can hash at the same
    time."""

    def __init__(self, out: Sink, compress: Callable[[bytes], bytes], flush: Callable[[], bytes]) -> None:
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(out, compress, flush), daemon=True)
        self._thread.start()

    def _run(self, out: Sink, compress: Callable[[bytes], bytes], flush: Callable[[], bytes]) -> None:
        try:
            while (data := self._q.get()) is not None:
                if self._error is None:
                    out.write(compress(data))
            out.write(flush())
        except BaseException as e:  # re-raised in the caller's thread
            self._error = e
            while self._q.get() is not None:
                pass

    def write(self, data: bytes) -> None:
        if self._error:
            raise self._error
        if data:
            self._q.put(bytes(data))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self._error:
            raise self._error


def open_encoder(compression: Compression, out: Sink, *, level: int | None = None) -> Encoder:
    """An encoder writing ``compression``-compressed data to ``out``."""
    if compression is Compression.NONE:
        return _PlainEncoder(out)
    if compression is Compression.GZIP:
        return ParallelGzipEncoder(out, DEFAULT_GZIP_LEVEL if level is None else level)
    if compression is Compression.LZMA:
        lz = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=6 if level is None else level)
        return ThreadedEncoder(out, lz.compress, lz.flush)
    if compression is Compression.ZSTD:
        zstandard = _require_zstandard()
        zc = zstandard.ZstdCompressor(level=3 if level is None else level, threads=-1).compressobj()
        return ThreadedEncoder(out, zc.compress, zc.flush)
    raise AssertionError(compression)


def compress_bytes(compression: Compression, data: bytes) -> bytes:
    """Compress a small in-memory blob (the header)."""
    parts: list[bytes] = []

    class _Collect:
        def write(self, b: bytes) -> None:
            parts.append(b)

    enc = open_encoder(compression, _Collect())
    enc.write(data)
    enc.close()
    return b"".join(parts)


def _require_zstandard() -> Any:
    try:
        import zstandard
    except ImportError:
        raise UnsupportedArtifact("zstd compression needs the Python module 'zstandard', which is not installed") from None
    return zstandard


# ---------------------------------------------------------------------------------------------------------
# Decoders: iterate decompressed chunks from a raw reader whose end is the end of the compressed member.


class RawReader(Protocol):
    def read(self, n: int, /) -> bytes: ...


class _Pushback:
    """A raw reader with bytes pushed back in front of it."""

    def __init__(self, raw: RawReader) -> None:
        self._raw = raw
        self._front = b""

    def push(self, data: bytes) -> None:
        self._front = data + self._front

    def read(self, n: int) -> bytes:
        if self._front:
            data, self._front = self._front[:n], self._front[n:]
            return data
        return self._raw.read(n)

    def read_exact(self, n: int, what: str) -> bytes:
        parts = []
        got = 0
        while got < n:
            b = self.read(n - got)
            if not b:
                raise TruncatedArtifact(f"{what} is truncated inside a gzip member")
            parts.append(b)
            got += len(b)
        return b"".join(parts)


def _parse_gzip_header(src: _Pushback, what: str) -> tuple[bytes, int | None]:
    """Read one gzip member header; return its bytes and the member size from our subfield, if present."""
    head = src.read_exact(10, what)
    if head[:3] != _GZIP_MAGIC:
        raise MalformedArtifact(f"{what}: not gzip data (bad magic or method)")
    flags = head[3]
    if flags & 0xE0:
        raise MalformedArtifact(f"{what}: gzip header has reserved flags set")
    parts = [head]
    size: int | None = None
    if flags & _FEXTRA:
        xlen_b = src.read_exact(2, what)
        (xlen,) = struct.unpack("<H", xlen_b)
        extra = src.read_exact(xlen, what)
        parts += [xlen_b, extra]
        pos = 0
        while pos + 4 <= len(extra):
            sid, slen = extra[pos : pos + 2], struct.unpack("<H", extra[pos + 2 : pos + 4])[0]
            if sid == _SUBFIELD_ID and slen == 4 and pos + 8 <= len(extra):
                size = struct.unpack("<I", extra[pos + 4 : pos + 8])[0]
            pos += 4 + slen
        if pos != len(extra):
            raise MalformedArtifact(f"{what}: malformed gzip extra field")
    for flag in (_FNAME, _FCOMMENT):
        if flags & flag:
            while True:
                c = src.read_exact(1, what)
                parts.append(c)
                if c == b"\x00":
                    break
                if sum(len(p) for p in parts) > 65536:
                    raise MalformedArtifact(f"{what}: gzip header name or comment is absurdly long")
    if flags & _FHCRC:
        parts.append(src.read_exact(2, what))
    return b"".join(parts), size


def _inflate_member(member: bytes, what: str) -> bytes:
    """Inflate one complete gzip member (CRC and size checked), refusing absurd output."""
    # The trailer's ISIZE sizes the output buffer (decompressors allocate max_length up front); a member
    # that lies about it fails the length check or stops short of its end, both refused below.
    if len(member) == len(zero := _zero_member(DEFAULT_GZIP_LEVEL)) and member == zero:
        return _ZEROS  # empty filesystem space written by us: known content, no need to inflate
    (isize,) = struct.unpack("<I", member[-4:])
    if isize > MAX_MEMBER_OUTPUT:
        raise MalformedArtifact(f"{what}: gzip member claims to inflate to {isize} bytes, which is absurd")
    limit = isize + 1
    try:
        if igzip_lib is not None:
            # isal_zlib.decompressobj(...).decompress(data, max_length) costs 4x the CPU: use igzip_lib
            d: Any = igzip_lib.IgzipDecompressor(igzip_lib.DECOMP_GZIP)
            out = d.decompress(member, limit)
            tail = not d.eof and not d.needs_input
        else:
            d = zlib.decompressobj(31)
            out = d.decompress(member, limit)
            tail = bool(d.unconsumed_tail)
    except (zlib.error, getattr(_zlib, "error", zlib.error)) as e:
        raise MalformedArtifact(f"{what}: corrupt gzip data ({e})") from None
    if not d.eof:
        if tail:
            raise MalformedArtifact(f"{what}: gzip member inflates to more than its trailer says ({isize} bytes)")
        raise MalformedArtifact(f"{what}: gzip member is cut short (corrupt size field)")
    if d.unused_data:
        raise MalformedArtifact(f"{what}: gzip member is followed by stray bytes (corrupt size field)")
    return bytes(out)


class _StreamInflater:
    """Inflates one gzip member incrementally (ISA-L or zlib)."""

    def __init__(self) -> None:
        self._tail = b""
        if igzip_lib is not None:
            self._d: Any = igzip_lib.IgzipDecompressor(igzip_lib.DECOMP_GZIP)
            self._isal = True
        else:
            self._d = zlib.decompressobj(31)
            self._isal = False

    @property
    def eof(self) -> bool:
        return bool(self._d.eof)

    @property
    def needs_input(self) -> bool:
        return bool(self._d.needs_input) if self._isal else not self._tail

    @property
    def unused_data(self) -> bytes:
        return bytes(self._d.unused_data)

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._isal:
            return bytes(self._d.decompress(data, max_length))
        out = self._d.decompress(self._tail + data, max_length)
        self._tail = self._d.unconsumed_tail
        return bytes(out)


def _gzip_chunks(raw: RawReader, what: str, background: bool) -> Iterator[bytes]:
    src = _Pushback(raw)
    work = OrderedWork(_inflate_member, helper_threads(), helper_threads() + 2, "inflate")
    try:
        first = True
        while True:
            probe = src.read(1)
            if not probe:
                if first:
                    raise TruncatedArtifact(f"{what} is empty: no gzip data")
                break
            src.push(probe)
            first = False
            header, size = _parse_gzip_header(src, what)
            if size is not None:
                if size > MAX_MEMBER_INPUT or size < len(header) + 8:
                    raise MalformedArtifact(f"{what}: gzip member size {size} is absurd")
                member = header + src.read_exact(size - len(header), what)
                work.submit(member, what)
                while work.full():
                    yield work.pop()
                continue
            while len(work):
                yield work.pop()
            # a member of unknown size (another writer): inflate it in a thread of its own, overlapping hashing
            yield from _prefetch(_inflate_stream_member(src, header, what)) if background else _inflate_stream_member(src, header, what)
        while len(work):
            yield work.pop()
    except (zlib.error, getattr(_zlib, "error", zlib.error)) as e:
        raise MalformedArtifact(f"{what}: corrupt gzip data ({e})") from None
    finally:
        work.close()


def _decode_stream(src: _Pushback, d: Any, data: bytes, what: str, kind: str) -> Iterator[bytes]:
    """Drive an incremental decompressor (``decompress(data, max_length)``, ``needs_input``, ``eof``,
    ``unused_data``) through one stream; bytes after its end are pushed back for the next one."""
    while True:
        if d.needs_input and not data:
            data = src.read(1 << 20)
            if not data:
                raise TruncatedArtifact(f"{what} is truncated: the {kind} stream ends early")
        out = d.decompress(data, CHUNK)
        data = b""
        if out:
            yield out
        if d.eof:
            src.push(d.unused_data)
            return


def _inflate_stream_member(src: _Pushback, header: bytes, what: str) -> Iterator[bytes]:
    return _decode_stream(src, _StreamInflater(), header, what, "gzip")


def _lzma_chunks(raw: RawReader, what: str) -> Iterator[bytes]:
    """xz streams, possibly concatenated (as xz itself allows)."""
    src = _Pushback(raw)
    first = True
    while probe := src.read(1):
        src.push(probe)
        first = False
        try:
            yield from _decode_stream(src, lzma.LZMADecompressor(format=lzma.FORMAT_XZ), b"", what, "xz")
        except lzma.LZMAError as e:
            raise MalformedArtifact(f"{what}: corrupt xz data ({e})") from None
    if first:
        raise TruncatedArtifact(f"{what} is empty: no xz data")


def _zstd_chunks(raw: RawReader, what: str) -> Iterator[bytes]:
    zstandard = _require_zstandard()
    reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(raw, read_across_frames=True)
    try:
        produced = False
        while out := reader.read(CHUNK):
            produced = True
            yield out
        if not produced:
            raise TruncatedArtifact(f"{what} is empty or truncated: no zstd data")
    except zstandard.ZstdError as e:
        raise MalformedArtifact(f"{what}: corrupt zstd data ({e})") from None


def _plain_chunks(raw: RawReader, what: str) -> Iterator[bytes]:
    while data := raw.read(CHUNK):
        yield data


def _prefetch(gen: Iterator[bytes], depth: int = 3) -> Iterator[bytes]:
    """Run a decoder in a background thread so that inflation overlaps with the caller's hashing."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(("data", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as e:
            q.put(("error", e))

    t = threading.Thread(target=run, daemon=True, name="decode")
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "data":
                yield item
            elif kind == "end":
                return
            else:
                raise item
    finally:
        stop.set()
        while t.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.1)
        t.join()


def iter_decompressed(compression: Compression, raw: RawReader, what: str, *, background: bool = True) -> Iterator[bytes]:
    """Decompressed chunks of a member, raising :class:`MalformedArtifact` on corrupt or truncated data.
    With ``background``, sequential decoders run in a thread of their own."""
    if compression is Compression.NONE:
        return _plain_chunks(raw, what)
    if compression is Compression.GZIP:
        return _gzip_chunks(raw, what, background)
    if compression is Compression.LZMA:
        gen = _lzma_chunks(raw, what)
    elif compression is Compression.ZSTD:
        gen = _zstd_chunks(raw, what)
    else:
        raise AssertionError(compression)
    return _prefetch(gen) if background else gen


def decompress_bytes(compression: Compression, data: bytes, what: str, limit: int) -> bytes:
    """Decompress a small member (the header) fully, refusing more than ``limit`` bytes of output."""
    out = bytearray()
    for chunk in iter_decompressed(compression, io.BytesIO(data), what, background=False):
        out += chunk
        if len(out) > limit:
            raise MalformedArtifact(f"{what} decompresses to more than {limit} bytes")
    return bytes(out)
