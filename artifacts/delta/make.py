"""Making a delta (on the build host): index the source image by a hash of each 4 KiB block, walk the target
block by block, and write COPY runs for what the source has (file data only, :mod:`.ext4`), ZERO runs, and
the rest as literal DATA; the op stream is compressed with xz in independent segments on all cores. The same
walk makes the target's digest table (64 KiB blocks, the device's block index), which goes before the ops: they
are spooled to a temporary file meanwhile. The format is :mod:`.format`; the artifact around the payload is
:mod:`.artifact`."""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from ..blockwrite import BLOCK_SIZE as TABLE_BLOCK
from ..blockwrite import DIGEST_SIZE
from .ext4 import Ext4FileBlocks
from .format import (
    BLOCK_SIZE,
    COMPRESSION_XZ,
    FORMAT_VERSION,
    OP_COPY,
    OP_DATA,
    OP_END,
    OP_ZERO,
    DeltaHeader,
)

if TYPE_CHECKING:
    from concurrent.futures import Future


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

    def compress(self, data: bytes) -> bytes:
        """One xz stream of ``data``, as the ops are compressed."""
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=self.filters)

    def _push(self) -> None:
        data = bytes(self.buf)
        self.buf.clear()
        self.futures.append(self.pool.submit(self.compress, data))
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
    order) to ``out`` (written front to back once the target has been read: the header and the digest table
    come first). ``level`` is the xz preset (0-9).

    Memory: an index of 16 bytes per distinct non-zero source block (~50 MB for a 1.2 GiB image), the target's
    digest table (16 bytes per 64 KiB) and a few segments of ops in flight; the ops are spooled to a temporary
    file (as large as the delta)."""
    with tempfile.TemporaryFile(prefix="vv-delta-ops-") as spool:
        return _make_delta(source, target, out, spool, level, progress)


def _make_delta(source: Iterable[bytes], target: Iterable[bytes], out: BinaryIO, spool: BinaryIO, level: int,
                progress: Callable[[str], None] | None) -> DeltaStats:
    t0 = time.monotonic()
    bs = BLOCK_SIZE
    zero = bytes(bs)
    assert TABLE_BLOCK % bs == 0
    per_table_block = TABLE_BLOCK // bs

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

    # 2. walk the target: runs of COPY (continuing the previous run when possible), ZERO and DATA; and the
    #    digest of every 64 KiB of it
    enc = _Encoder(spool, level)
    table = bytearray()
    table_hash = hashlib.blake2b(digest_size=DIGEST_SIZE)
    in_table_block = 0
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
            table_hash.update(blk)
            in_table_block += 1
            if in_table_block == per_table_block:
                table += table_hash.digest()
                table_hash, in_table_block = hashlib.blake2b(digest_size=DIGEST_SIZE), 0
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
    if in_table_block:
        table += table_hash.digest()
    header = DeltaHeader(FORMAT_VERSION, COMPRESSION_XZ, bs, src_size, tgt_size, src_sha.hexdigest(), tgt_sha.hexdigest())
    head = header.pack() + enc.compress(_varint(TABLE_BLOCK) + _varint(len(table) // DIGEST_SIZE) + bytes(table))
    out.write(head)
    spool.seek(0)
    shutil.copyfileobj(spool, out, 1 << 20)
    size = len(head) + spool.tell()
    stats = DeltaStats(src_size, header.source_sha256, tgt_size, header.target_sha256, copied, zeros, literal,
                       enc.ops, size, time.monotonic() - t0)
    if progress:
        progress(f"delta made: {stats.delta_size} bytes, {literal} literal bytes ({stats.seconds:.1f} s)")
    return stats


__all__ = ["DEFAULT_LEVEL", "DeltaStats", "make_delta"]
