"""The delta payload's format: constants, the header, the package's errors. Standard library only and cheap to
import: the device loads it with every install (``device_hooks.install`` names the payload type with it).

Payload file format (one file, ``rootfs.delta``; all integers little-endian)::

    header (96 bytes)
      magic        8   b"VVDELTA\\n"
      version      2   2 (1: no digest table; both are applied)
      compression  2   1 = xz
      block_size   4   4096
      source_size  8   bytes of the source image
      target_size  8   bytes of the target image
      source_sha256 32
      target_sha256 32
    then one or more concatenated xz streams (CRC32 checks, LZMA2 dictionary <= 8 MiB) whose concatenated
    output is, in version 2, first the target's digest table:
      index block size  varint                 a power of two, 4 KiB to 16 MiB (our writer: 64 KiB)
      count             varint                 ceil(target_size / index block size)
      digests           count x 16 bytes       BLAKE2b-128 of each block of the target (the last may be short):
                                               the digests of artifacts.blockwrite.block_digest, those of the
                                               device's block index
    and then (in version 1 at once) a sequence of operations, each a tag byte and unsigned LEB128 varints:
      0x01 COPY  count, zigzag(source_block - expected)   count blocks from the source, starting at
                 source_block; ``expected`` is the block after the previous COPY (0 at first)
      0x02 ZERO  count                                    count blocks of zeros
      0x03 DATA  count, then the bytes of those blocks     literal target bytes
      0x00 END                                            nothing may follow
    The operations cover ceil(target_size / block_size) blocks in order; the last block may be short, and
    COPY/ZERO/DATA of it produce only target_size % block_size bytes.

Why the digest table: a device that knows what its inactive slot holds (its block index) compares the two
tables and neither reads the source nor hashes anything for the blocks the slot already holds; on a small
update that is nearly all of them (``artifacts.delta.apply``). The table is as trusted as the rest of the
payload: signed with it (the artifact's checksum), and the slot is read back against the signed target checksum
whatever it said.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ota_common.errors import ArtifactError, UserError

DELTA_PAYLOAD_TYPE = "rootfs-delta"
#: the payload file's name inside the artifact
DELTA_FILE_NAME = "rootfs.delta"
MAGIC = b"VVDELTA\n"
FORMAT_VERSION = 2
#: versions :func:`parse_header` accepts (1: the same without the digest table)
FORMAT_VERSIONS = (1, 2)
#: the first version with the target's digest table
TABLE_VERSION = 2
#: digest table bounds: index block sizes (powers of two) and the table's size
MIN_TABLE_BLOCK, MAX_TABLE_BLOCK = 4096, 16 << 20
MAX_TABLE_BYTES = 64 << 20
TABLE_DIGEST_SIZE = 16
COMPRESSION_XZ = 1
BLOCK_SIZE = 4096
_HEADER = struct.Struct("<8sHHIQQ32s32s")
HEADER_SIZE = _HEADER.size  # 96

OP_END, OP_COPY, OP_ZERO, OP_DATA = 0, 1, 2, 3

#: the biggest value a varint may have here (counts and block numbers of a 1 TiB image fit easily)
MAX_VARINT = 1 << 40


class DeltaError(ArtifactError):
    """A delta cannot be applied: malformed or truncated, made for another source, or its result does not
    match the target checksum it promises. Nothing may be booted from what it wrote."""


class SameImageError(UserError):
    """The two full artifacts a delta was asked for hold the same image: there is nothing to send (a release
    step skips the delta; the CLI refuses it)."""


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
    if version not in FORMAT_VERSIONS:
        raise DeltaError(f"delta format version {version} is not supported (only "
                         f"{', '.join(map(str, FORMAT_VERSIONS))})")
    if compression != COMPRESSION_XZ:
        raise DeltaError(f"delta compression {compression} is not supported (only 1 = xz)")
    if block_size != BLOCK_SIZE:
        raise DeltaError(f"delta block size {block_size} is not supported (only {BLOCK_SIZE})")
    if target_size > MAX_VARINT or source_size > MAX_VARINT:
        raise DeltaError("delta header: absurd image size")
    return DeltaHeader(version, compression, block_size, source_size, target_size, src.hex(), tgt.hex())


__all__ = [
    "BLOCK_SIZE",
    "COMPRESSION_XZ",
    "DELTA_FILE_NAME",
    "DELTA_PAYLOAD_TYPE",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_TABLE_BLOCK",
    "MAX_TABLE_BYTES",
    "MAX_VARINT",
    "MIN_TABLE_BLOCK",
    "OP_COPY",
    "OP_DATA",
    "OP_END",
    "OP_ZERO",
    "DeltaError",
    "DeltaHeader",
    "TABLE_DIGEST_SIZE",
    "TABLE_VERSION",
    "SameImageError",
    "parse_header",
]
