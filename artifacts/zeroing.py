"""Zeroing a range of a slot without writing zero pages through the page cache, where the kernel can: the
delta writer (:mod:`.delta`) and the full install's slot writer (``device_hooks.install``) both use it.
Standard library only (it runs on the device)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from functools import cache


@cache
def _fallocate() -> Callable[..., int]:
    fn = ctypes.CDLL(None, use_errno=True).fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_BLKZEROOUT = 0x127F  # _IO(0x12, 127)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_ZERO_RANGE = 0x10


class Zeroer:
    """Zeroes a range of the target without writing zero pages when the kernel can: ``BLKZEROOUT`` on a
    block device, ``fallocate(FALLOC_FL_ZERO_RANGE)`` on a file. Falls back to writes (returns False) once
    either fails."""

    def __init__(self, fd: int, enabled: bool) -> None:
        self.fd = fd
        self.mode: str | None = None
        if not enabled:
            return
        try:
            st = os.fstat(fd)
        except OSError:
            return
        if stat.S_ISBLK(st.st_mode):
            self.mode = "blk"
        elif stat.S_ISREG(st.st_mode):
            self.mode = "file"

    def __call__(self, offset: int, length: int) -> bool:
        if self.mode is None or offset % 4096 or length % 4096:
            return False
        try:
            if self.mode == "blk":
                fcntl.ioctl(self.fd, _BLKZEROOUT, struct.pack("=QQ", offset, length))
            else:
                fallocate = _fallocate()
                if fallocate(self.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
                    raise OSError(ctypes.get_errno(), "fallocate")
                if os.fstat(self.fd).st_size < offset + length:  # KEEP_SIZE: extend a short file explicitly
                    os.ftruncate(self.fd, offset + length)
        except (OSError, AttributeError):
            self.mode = None
            return False
        return True
