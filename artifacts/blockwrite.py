"""Writing a slot block by block, skipping the blocks it already holds: the full install's slot writer
(``device_hooks.install``) and the delta writer (:mod:`.delta.apply`) both write through it. Standard library
only (it runs on the device).

The slot is cut into aligned blocks of :data:`BLOCK_SIZE` bytes. For each block of the new image the writer
asks what the slot holds there (an :class:`OldContent`: the device's block index, or the slot itself read
back) and skips the write when it is the same; aligned all-zero blocks that differ are collected into ranges
zeroed by the kernel (:class:`~artifacts.zeroing.Zeroer`) where it can; everything else is written with
``pwrite``. It can also collect the digest of every block it was given (:func:`block_digest`), the index of
the slot after the install.

A writer may also be told the new image's digests (:attr:`BlockWriter.given`, a delta's digest table) and that
whole blocks are already held (:meth:`BlockWriter.hold`): then it neither hashes nor even sees those bytes.

A skipped block is only as right as the :class:`OldContent` that vouched for it; the caller reads the whole
slot back against the signed checksum afterwards, so a wrong answer can cost a failed install, never a slot
armed with the wrong content.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from .zeroing import Zeroer

#: 64 KiB: SD cards program pages of 16–64 KiB (a smaller write costs a read-modify-write of a page anyway) and
#: ext4 keeps an unchanged file's data in the same 4 KiB blocks. Measured on bench/delta.py's release pairs
#: (1.25 GiB slots), bytes that differ: app-only change 0.2 MB in 4 KiB blocks, 1.2 MB in 64 KiB blocks,
#: 11.5 MB in 1 MiB blocks, 38 MB in 4 MiB blocks; base rebuilt for a security update 612, 613, 626, 663 MB.
#: The index of a 1.25 GiB slot is then 20,480 digests (320 KiB), and the writer's per-block work stays small.
BLOCK_SIZE = 64 * 1024
#: 16 bytes of BLAKE2b per block: see ``device_hooks.blockindex`` for why 128 bits are enough here
DIGEST_SIZE = 16
#: flush the slot to the medium every this many bytes written, so a 1 GB board never holds much dirty data
SYNC_EVERY = 32 * 1024 * 1024

_ZEROS = bytes(BLOCK_SIZE)


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of one block in an index (BLAKE2b, 16 bytes)."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


ZERO_DIGEST = block_digest(_ZEROS)


class OldContent(Protocol):
    """What the slot holds before the install, block by block."""

    def same(self, index: int, data: memoryview, digest: bytes) -> bool:
        """True only when block ``index`` of the slot holds exactly ``data`` (whose digest is ``digest``)."""
        ...


@runtime_checkable
class IndexedOld(OldContent, Protocol):
    """Old content known by digest alone (the device's block index): it can vouch for a block without its bytes."""

    @property
    def block_size(self) -> int:
        """The size of the blocks its digests are of."""
        ...

    def holds(self, index: int, length: int, digest: bytes) -> bool:
        """True only when block ``index`` of the slot is ``length`` bytes whose digest is ``digest``."""
        ...


class SlotReadBack:
    """The slot's old content read from the slot itself (``pread`` on ``fd``, opened for reading), compared byte
    for byte: exact, at the cost of reading every block once. Used when the block index is missing or not
    trusted."""

    def __init__(self, fd: int, block_size: int = BLOCK_SIZE) -> None:
        self.fd = fd
        self.block_size = block_size

    def same(self, index: int, data: memoryview, digest: bytes) -> bool:
        old = os.pread(self.fd, len(data), index * self.block_size)
        return len(old) == len(data) and old == data.tobytes()  # bytes == bytes is a memcmp


class BlockWriter:
    """Writes a slot front to back from offset 0 (``fd`` open for writing): :meth:`write` data of any size and
    alignment, :meth:`zero` runs of zeros, then :meth:`finish`.

    ``old``: what the slot holds (None: write every block, as an install without an index did). ``digests``:
    collect the digest of every block (:attr:`index`). :attr:`given`: the digests of the new image's blocks,
    when the caller has them (a delta's digest table): they are used instead of hashing, and :meth:`hold` may
    skip whole blocks without their bytes. ``fast_zero``: zero ranges by the kernel where it can.
    ``on_block``: called after each block is handled (written, zeroed or skipped); an exception it raises
    stops the write. Counters: :attr:`written` (bytes written with ``pwrite``), :attr:`zeroed` (bytes zeroed
    by range requests), :attr:`skipped` (bytes the slot already held), :attr:`blocks`,
    :attr:`skipped_blocks`."""

    def __init__(self, fd: int, *, old: OldContent | None = None, digests: bool = False, fast_zero: bool = True,
                 on_block: Callable[[], None] | None = None, block_size: int = BLOCK_SIZE,
                 sync_every: int = SYNC_EVERY) -> None:
        if block_size <= 0 or block_size % 4096:
            raise ValueError(f"block size {block_size} is not a positive multiple of 4096")
        self.fd = fd
        self.old = old
        self.collect = digests
        self.block_size = block_size
        self.sync_every = sync_every
        self.on_block = on_block
        self.zeroer = Zeroer(fd, fast_zero)
        self.zeros = _ZEROS if block_size == BLOCK_SIZE else bytes(block_size)
        self.zero_digest = ZERO_DIGEST if block_size == BLOCK_SIZE else block_digest(self.zeros)
        self.pos = 0  # bytes handled: every block before it is written, skipped or queued in the zero range
        self.buf = bytearray()  # the start of the block at pos, not yet complete
        self.zero_from: int | None = None
        self.since_sync = 0
        self.written = self.zeroed = self.skipped = 0
        self.blocks = self.skipped_blocks = 0
        self.index = bytearray()  # the digests of the blocks handled (when collected)
        self.given: bytes | None = None  # the new image's block digests, when known
        self.finished = False

    # -- input
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)
        bs, n, i = self.block_size, len(data), 0
        if self.buf:
            i = min(bs - len(self.buf), n)
            self.buf += memoryview(data)[:i]
            if len(self.buf) < bs:
                return
            self._buffered()
        while i + bs <= n:
            self._block(data, i, bs)
            i += bs
        if i < n:
            self.buf += memoryview(data)[i:]

    def zero(self, length: int) -> None:
        """``length`` zero bytes."""
        if length < 0:
            raise ValueError("a negative zero run")
        bs = self.block_size
        if self.buf:
            take = min(bs - len(self.buf), length)
            self.buf += memoryview(self.zeros)[:take]
            length -= take
            if len(self.buf) < bs:
                return
            self._buffered()
        while length >= bs:
            self._block(self.zeros, 0, bs)
            length -= bs
        if length:
            self.buf += memoryview(self.zeros)[:length]

    def hold(self, length: int) -> None:
        """The next ``length`` bytes, whole blocks from a block boundary (the last one may be short), are what
        the slot already holds (the caller compared :attr:`given` with an :class:`IndexedOld`): nothing is
        read, hashed or written. Needs :attr:`given` when digests are collected."""
        bs = self.block_size
        if self.buf or self.pos % bs or length < 0:
            raise ValueError(f"hold() must start on a block boundary and cover whole blocks (at {self.pos}, {len(self.buf)} bytes of a block buffered, {length} held)")
        while length > 0:
            n = min(bs, length)
            if n < bs and length != n:
                raise ValueError("hold() must cover whole blocks")
            index = self.blocks
            if self.collect:
                if self.given is None or len(self.given) < (index + 1) * DIGEST_SIZE:
                    raise ValueError("hold() while collecting digests needs the given digests")
                self.index += self.given[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
            self._flush_zeros()
            self.blocks += 1
            self.skipped += n
            self.skipped_blocks += 1
            self.pos += n
            length -= n
            if self.on_block is not None:
                self.on_block()

    def finish(self) -> int:
        """Handle the last (short) block, zero what is queued, flush to the medium (``fsync``); returns the
        number of bytes the slot now holds from offset 0."""
        if self.buf:
            self._buffered()
        self._flush_zeros()
        os.fsync(self.fd)
        self.finished = True
        return self.pos

    # -- one block
    def _buffered(self) -> None:
        block = bytes(self.buf)
        self.buf.clear()
        self._block(block, 0, len(block))

    def _block(self, src: bytes, offset: int, n: int) -> None:
        """Handle the block ``src[offset:offset + n]`` (the slot's block at :attr:`pos`)."""
        part = memoryview(src)[offset : offset + n]
        whole = n == self.block_size
        is_zero = src.startswith(self.zeros if whole else self.zeros[:n], offset)
        digest = b""
        index = self.blocks
        given = self.given
        if given is not None and len(given) >= (index + 1) * DIGEST_SIZE:
            digest = given[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
        elif self.collect or self.old is not None:
            digest = self.zero_digest if is_zero and whole else block_digest(part)
        if self.collect:
            self.index += digest
        self.blocks += 1
        if self.old is not None and self.old.same(index, part, digest):
            self._flush_zeros()
            self.skipped += n
            self.skipped_blocks += 1
            self.pos += n
        elif is_zero and whole:
            if self.zero_from is None:
                self.zero_from = self.pos
            self.pos += n
        else:
            self._flush_zeros()
            self._pwrite(part, self.pos)
            self.written += n
            self.pos += n
            self._count(n)
        if self.on_block is not None:
            self.on_block()

    def _pwrite(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            try:
                k = os.pwrite(self.fd, view[done:], offset + done)
            except OSError as e:
                raise OSError(e.errno, f"writing the slot at byte {offset + done}: {e.strerror}") from None
            if k <= 0:
                raise OSError(f"writing the slot at byte {offset + done}: no progress")
            done += k

    def _count(self, n: int) -> None:
        self.since_sync += n
        if self.since_sync >= self.sync_every:  # bound the dirty page cache on a small board
            os.fdatasync(self.fd)
            self.since_sync = 0

    def _flush_zeros(self) -> None:
        if self.zero_from is None:
            return
        start, length = self.zero_from, self.pos - self.zero_from
        self.zero_from = None
        if self.zeroer(start, length):
            self.zeroed += length
            return
        zeros = memoryview(self.zeros)
        while length:
            k = min(length, self.block_size)
            self._pwrite(zeros[:k], start)
            self.written += k
            self._count(k)
            start += k
            length -= k


__all__ = ["BLOCK_SIZE", "DIGEST_SIZE", "SYNC_EVERY", "ZERO_DIGEST", "BlockWriter", "IndexedOld", "OldContent",
           "SlotReadBack", "block_digest"]
