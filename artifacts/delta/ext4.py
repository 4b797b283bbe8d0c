"""Which blocks of an ext4 image hold file data, learnt from the image as it streams by (the make side only:
:func:`.make.make_delta` copies from the source only those)."""

from __future__ import annotations

import struct


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
