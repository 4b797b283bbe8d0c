"""Block delta of a root filesystem image (payload type ``rootfs-delta``): make it on the build host, apply it
on the device while streaming.

Why blocks (measurements in docs/delta.md): ext4 stores file data in whole 4 KiB blocks, so a file that did
not change keeps block-aligned content wherever the new build placed it. Indexing the source image by a hash
of each 4 KiB block and walking the target block by block finds all of it; what is left (new files, changed
metadata) is compressed with xz. Only blocks that hold file data in the source are copied from it (a slot
mounted read-write gets its inodes, directories, bitmaps and journal rewritten, not the data of the files
the image shipped: :class:`.ext4.Ext4FileBlocks`), so a delta applies to a slot that was in use. On the
release pairs of ``bench/delta.py`` this is smaller than xdelta3 -9 with a 1 GiB window and zstd -19
--patch-from, made in seconds instead of a minute (or six), and applied by a process of ~45 MB instead of
one holding the source in memory: the device reads the active slot with ``pread`` where the delta says.

Modules, one job each:

- :mod:`.format` — the payload format: constants, the header, :class:`DeltaError`, :class:`SameImageError`;
- :mod:`.apply` — applying a payload, standard library only (what the device runs);
- :mod:`.ext4` — which blocks of an ext4 image hold file data (make side);
- :mod:`.make` — making a payload from two images (make side);
- :mod:`.artifact` — the signed delta artifact made from two full artifacts (make side).

Importing this package loads only :mod:`.format`; the other names are imported on first use, so the device
never loads the make side (``python -X importtime -c "import artifacts.delta.apply"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ota_common.lazy import lazy_getattr

from .format import DELTA_PAYLOAD_TYPE, HEADER_SIZE, DeltaError, DeltaHeader, SameImageError, parse_header

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports on first use
    from .apply import AppliedDelta, apply_delta, peek_header
    from .artifact import DeltaArtifactResult, RootfsArtifactInfo, make_delta_payload, write_delta_artifact
    from .make import DeltaStats, make_delta

_LAZY = {
    "AppliedDelta": "apply",
    "apply_delta": "apply",
    "peek_header": "apply",
    "DeltaStats": "make",
    "make_delta": "make",
    "DeltaArtifactResult": "artifact",
    "RootfsArtifactInfo": "artifact",
    "make_delta_payload": "artifact",
    "write_delta_artifact": "artifact",
}

__all__ = [
    "DELTA_PAYLOAD_TYPE",
    "HEADER_SIZE",
    "AppliedDelta",
    "DeltaArtifactResult",
    "DeltaError",
    "DeltaHeader",
    "DeltaStats",
    "RootfsArtifactInfo",
    "SameImageError",
    "apply_delta",
    "make_delta",
    "make_delta_payload",
    "parse_header",
    "peek_header",
    "write_delta_artifact",
]

__getattr__ = lazy_getattr(__name__, _LAZY, globals())
