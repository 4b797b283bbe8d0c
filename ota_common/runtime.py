"""Process-wide runtime tuning, called once by entry points (never by library code)."""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc_for_streaming() -> bool:
    """Keep glibc from returning multi-megabyte buffers to the kernel after every chunk.

    Streaming a payload allocates and frees a few 2–8 MiB buffers per chunk in several threads. With
    glibc's defaults each of them is a fresh ``mmap``, so every byte of the stream is also a page fault
    (measured: a third of the CPU time of verifying a 1.2 GiB artifact was spent in the kernel). Raising
    the mmap and trim thresholds lets the buffers be reused; memory stays bounded by the chunks in flight.

    What the allocator keeps is bounded too: glibc gives each thread an arena of its own, and every free chunk
    below the trim threshold stays resident in each. So at most two arenas, and a trim threshold of four
    chunks. (With an arena per thread and a 32 MiB threshold, writing a 2 GiB artifact in CI, beside a busy
    QEMU worker, once peaked at 150 MB instead of about 45; tests/test_streaming.py prints the allocator's
    statistics when that test fails.)
    Trimming only gives back the top of a heap; :func:`release_free_memory` gives back the free pages inside
    them, and the streaming loops call it every few dozen chunks.
    Returns False where this is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")  # not find_library: it runs ldconfig, 10 ms of start-up
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = (bool(mallopt(_M_MMAP_THRESHOLD, 16 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 8 << 20))
          and bool(mallopt(_M_ARENA_MAX, 2)))
    log.debug("malloc tuned for streaming: %s", ok)
    return ok


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_free_memory() -> None:
    """Give the free pages inside every malloc arena back to the kernel (glibc ``malloc_trim(0)``).

    A stream allocates and frees chunk-sized buffers of varying sizes in several threads; what the allocator
    then holds free depends on how the threads happened to interleave, and it is resident until trimmed. The
    streaming loops call this every :data:`TRIM_EVERY_CHUNKS` chunks so that memory stays the chunks in
    flight plus what one stretch could fragment, whatever the length of the stream. Cheap (it walks the free
    lists, a few dozen microseconds here) and safe from any thread; a no-op where this is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


#: how often (in chunks of artifacts.compression.CHUNK) a stream calls :func:`release_free_memory`
TRIM_EVERY_CHUNKS = 32
