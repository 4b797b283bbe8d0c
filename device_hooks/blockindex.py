"""The block index of a slot: what each 64 KiB block of it holds, kept on /data so that the next install into the
slot writes only the blocks that differ (:class:`artifacts.blockwrite.BlockWriter`).

One file per slot, ``<state dir>/blockindex-<A|B>.bin``, written atomically (temporary file, ``fsync``, rename,
``fsync`` of the directory) after the slot was written and read back against the signed checksum, and again when
the device leaves the slot (the other slot committed: :func:`.slot_rollback.record_left` reads it whole for its
hash, and the same read gives its blocks), because the slot's first boot changed what it holds. It is bound to
what it describes: the slot's name, the slot device's size, the block size, the checksum and size of the image
written there, and a random generation that the agent also records in the slot's record (``slots.json``), so an
index is used only while that record says the slot still holds that install. The file ends in the SHA-256 of
everything before it (a torn or corrupted file is refused whole).

It is never trusted blindly:

- it is removed, durably, before the first byte of an install is written to its slot (:meth:`SlotIndex.take`
  reads it first): an install cut short by a power cut never leaves an index that claims the old content;
- one that is missing, of another slot, stale (generation or checksum not the slot record's), truncated or corrupt,
  or whose first block does not match the slot is not used; the install then compares with the slot itself,
  read block by block (:class:`artifacts.blockwrite.SlotReadBack`), and writes a new index afterwards. The first
  block is read because it holds an ext4 file system's superblock, which every read-write mount changes (mount
  count and time): a slot that was booted since it was indexed is refused that way;
- the slot is read back whole against the signed checksum after the install, as without an index: an index that
  lies makes blocks be skipped that should have been written, so that install fails (it is never armed) and the
  next one, with no index, writes them.

Digests are 16 bytes of BLAKE2b (on the Pi's Cortex-A53/A72, which lack the ARMv8 SHA instructions, BLAKE2b is
the faster of hashlib's cryptographic hashes). 128 bits are enough because nothing depends on them for
correctness (above) and nobody can exploit a collision: by chance, the probability that any two of the ~20,000
blocks of a slot collide is about 20,000² / 2¹²⁹, below 10⁻²⁹; on purpose, an attacker would need both a
signed image and the old slot's content to collide, and the read-back would still refuse the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifacts.blockwrite import BLOCK_SIZE, DIGEST_SIZE, block_digest

log = logging.getLogger(__name__)

MAGIC = b"VVOTA-BLOCKINDEX"
FORMAT = 1
ALGORITHM_BLAKE2B = 1
#: magic, format, slot, block size, device size, payload size, payload sha256, generation, digest size,
#: algorithm, block count
_HEADER = struct.Struct("<16sHcxIQQ32s16sBBxxI")
_TRAILER = 32  # sha256 of everything before it
#: refuse index files larger than this without reading them (a 64 GiB slot has a 16 MiB index)
MAX_INDEX_BYTES = 16 * 1024 * 1024 + _HEADER.size + _TRAILER
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
SLOTS = ("A", "B")


class BlockIndexError(Exception):
    """An index file that cannot be used (the message says why); never raised out of :meth:`SlotIndex.take`."""


@dataclass(frozen=True)
class Binding:
    """What the slot's record says the slot holds: the checksum of the image installed there and the generation
    of the index written with it."""

    checksum: str
    generation: str


def binding_from_record(record: Mapping[str, Any]) -> Binding | None:
    """The binding in a slot record of ``slots.json`` (``provides["rootfs-image.checksum"]`` and ``blockindex``),
    None when it names no valid pair."""
    provides = record.get("provides")
    checksum = provides.get("rootfs-image.checksum") if isinstance(provides, Mapping) else None
    generation = record.get("blockindex")
    if not (isinstance(checksum, str) and _HEX64.fullmatch(checksum)):
        return None
    if not (isinstance(generation, str) and _HEX32.fullmatch(generation)):
        return None
    return Binding(checksum, generation)


@dataclass(frozen=True)
class IndexFile:
    slot: str
    block_size: int
    device_size: int
    payload_size: int
    checksum: str
    generation: str
    digests: bytes

    @property
    def count(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    def encode(self) -> bytes:
        head = _HEADER.pack(MAGIC, FORMAT, self.slot.encode(), self.block_size, self.device_size, self.payload_size,
                            bytes.fromhex(self.checksum), bytes.fromhex(self.generation), DIGEST_SIZE,
                            ALGORITHM_BLAKE2B, self.count)
        body = head + self.digests
        return body + hashlib.sha256(body).digest()


def parse_index(data: bytes) -> IndexFile:
    """Parse and check an index file's bytes. Raises :class:`BlockIndexError` saying what is wrong."""
    if len(data) < _HEADER.size + _TRAILER:
        raise BlockIndexError(f"truncated ({len(data)} bytes)")
    body, trailer = data[:-_TRAILER], data[-_TRAILER:]
    if hashlib.sha256(body).digest() != trailer:
        magic = data[:len(MAGIC)]
        raise BlockIndexError("corrupt or truncated (its checksum does not match)" if magic == MAGIC
                              else "not a block index")
    (magic, fmt, slot, block_size, device_size, payload_size, checksum, generation, digest_size, algorithm,
     count) = _HEADER.unpack_from(body)
    if magic != MAGIC or fmt != FORMAT:
        raise BlockIndexError(f"unknown format {fmt}")
    if digest_size != DIGEST_SIZE or algorithm != ALGORITHM_BLAKE2B:
        raise BlockIndexError(f"unknown digest (algorithm {algorithm}, {digest_size} bytes)")
    label = slot.decode("ascii", "replace")
    if label not in SLOTS:
        raise BlockIndexError(f"names no slot ({slot!r})")
    if block_size <= 0 or block_size % 4096:
        raise BlockIndexError(f"block size {block_size} is not a multiple of 4096")
    if payload_size > device_size or count != -(-payload_size // block_size):
        raise BlockIndexError(f"{count} blocks do not describe a {payload_size}-byte image on a "
                              f"{device_size}-byte slot")
    digests = body[_HEADER.size:]
    if len(digests) != count * DIGEST_SIZE:
        raise BlockIndexError(f"holds {len(digests)} bytes of digests, not {count} digests")
    return IndexFile(label, block_size, device_size, payload_size, checksum.hex(), generation.hex(), digests)


class IndexedContent:
    """:class:`artifacts.blockwrite.OldContent` from an index: block ``i`` is the same when it has the length and
    the digest the index records for it."""

    def __init__(self, index: IndexFile) -> None:
        self.index = index

    @property
    def block_size(self) -> int:
        return self.index.block_size

    def same(self, i: int, data: memoryview, digest: bytes) -> bool:
        return self.holds(i, len(data), digest)

    def holds(self, i: int, length: int, digest: bytes) -> bool:
        ix = self.index
        if i >= ix.count or length != min(ix.block_size, ix.payload_size - i * ix.block_size):
            return False
        return ix.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] == digest


class SlotIndex:
    """The block index of slot ``slot`` (``A`` or ``B``) in ``directory``. ``binding``: what the slot's record
    says it holds (None: no index can be trusted). ``enabled=False`` (``[install] block_index = no``): no index is
    used or written, but an existing one is still removed before the slot is written."""

    def __init__(self, directory: Path, slot: str, binding: Binding | None, *, enabled: bool = True,
                 block_size: int = BLOCK_SIZE) -> None:
        if slot not in SLOTS:
            raise ValueError(f"slot {slot!r} is not A or B")
        self.directory = directory
        self.slot = slot
        self.binding = binding
        self.enabled = enabled
        self.block_size = block_size

    @property
    def path(self) -> Path:
        return self.directory / f"blockindex-{self.slot}.bin"

    def load(self, target: Path, device_size: int) -> IndexFile:
        """The index, checked against its binding, the slot device ``target`` and its first block. Raises
        :class:`BlockIndexError` saying why it cannot be used, ``OSError`` when the slot cannot be read."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise BlockIndexError("missing") from None
        if size > MAX_INDEX_BYTES:
            raise BlockIndexError(f"too large ({size} bytes)")
        ix = parse_index(self.path.read_bytes())
        if ix.slot != self.slot:
            raise BlockIndexError(f"it is the index of slot {ix.slot}")
        if self.binding is None:
            raise BlockIndexError("stale: the slot's record names no indexed install")
        if (ix.checksum, ix.generation) != (self.binding.checksum, self.binding.generation):
            raise BlockIndexError(f"stale: it describes generation {ix.generation[:8]} of image "
                                  f"{ix.checksum[:12]}…, the slot's record generation "
                                  f"{self.binding.generation[:8]} of image {self.binding.checksum[:12]}…")
        if ix.device_size != device_size:
            raise BlockIndexError(f"it describes a {ix.device_size}-byte slot, this one has {device_size} bytes")
        if ix.block_size != self.block_size:
            raise BlockIndexError(f"block size {ix.block_size}, the writer's is {self.block_size}")
        if ix.count:
            n = min(ix.block_size, ix.payload_size)
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            try:
                first = os.pread(fd, n, 0)
            finally:
                os.close(fd)
            if len(first) != n or block_digest(first) != ix.digests[:DIGEST_SIZE]:
                raise BlockIndexError("the slot changed since it was indexed (its first block differs: mounted "
                                      "read-write?)")
        return ix

    def take(self, target: Path, device_size: int) -> tuple[IndexedContent | None, str]:
        """Before writing the slot: the index, if it can be used, and a note saying what was decided; the index
        file is removed (and the removal made durable) whatever the answer. Raises ``OSError`` when the file
        cannot be removed (the caller must not write the slot then)."""
        content: IndexedContent | None = None
        if not self.enabled:
            note = "block index disabled: every block is written"
        else:
            try:
                content = IndexedContent(self.load(target, device_size))
                note = f"block index of slot {self.slot} used"
            except BlockIndexError as e:
                note = f"block index of slot {self.slot} not used ({e}): the slot is read and compared instead"
            except OSError as e:
                note = (f"block index of slot {self.slot} not used (cannot read it: {e.strerror or e}): the slot is "
                        "read and compared instead")
        self.invalidate()
        return content, note

    def invalidate(self) -> None:
        """Remove the index durably (nothing to do when there is none)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(self.directory)

    def save(self, *, device_size: int, payload_size: int, checksum: str, digests: bytes) -> str | None:
        """Write the index of what the slot now holds (after it was read back against ``checksum``); returns
        its generation for the slot's record, None when disabled. Raises ``OSError``."""
        if not self.enabled:
            return None
        generation = os.urandom(16).hex()
        ix = IndexFile(self.slot, self.block_size, device_size, payload_size, checksum, generation, bytes(digests))
        data = ix.encode()
        parse_index(data)  # what we write must be what we read
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.directory)
        return generation


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["Binding", "BlockIndexError", "IndexFile", "IndexedContent", "SlotIndex", "binding_from_record",
           "parse_index"]
