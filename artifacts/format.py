"""Constants of the Mender artifact format, version 3, and the limits this implementation enforces.

Reference: mender-artifact 3.9 (Debian bookworm). The outer container is a plain tar with, in order::

    version                 {"format":"mender","version":3}
    manifest                "<sha256>  <path>\\n" per file, sorted by path
    manifest.sig            optional; base64 of the signature over the exact manifest bytes
    header.tar[.gz|.xz|.zst]
    data/0000.tar[.gz|.xz|.zst]   one per payload
"""

from __future__ import annotations

import enum
import re
from typing import Final

FORMAT_NAME: Final = "mender"
FORMAT_VERSION: Final = 3
VERSION_JSON: Final = b'{"format":"mender","version":3}'

VERSION_MEMBER: Final = "version"
MANIFEST_MEMBER: Final = "manifest"
SIGNATURE_MEMBER: Final = "manifest.sig"
HEADER_MEMBER_STEM: Final = "header.tar"
AUGMENT_MEMBERS: Final = ("manifest-augment", "header-augment.tar")

HEADER_INFO: Final = "header-info"
SCRIPTS_DIR: Final = "scripts/"

ROOTFS_IMAGE: Final = "rootfs-image"
ROOTFS_CHECKSUM_KEY: Final = "rootfs-image.checksum"
ROOTFS_VERSION_KEY: Final = "rootfs-image.version"
#: the signed security version of an image: devices refuse artifacts below the highest they committed
SECURITY_VERSION_KEY: Final = "rootfs-image.security_version"
#: the sha256 of the image's SBOM (``sbom.cdx.json``), in the rootfs-image payload's signed ``meta-data``: not a
#: provide, because provides are stored by devices and matched by servers; meta-data is signed with the header,
#: and stock mender-artifact 3.9 accepts it and shows it under "Metadata" (docs/artifacts.md)
SBOM_SHA256_KEY: Final = "vv.sbom_sha256"
#: what mender-artifact 3.9 writes by default for a rootfs-image payload
ROOTFS_DEFAULT_CLEARS: Final = ("artifact_group", "rootfs_image_checksum", "rootfs-image.*")


class Compression(enum.Enum):
    """Compressions of the header and data members. zstd is beyond mender-artifact 3.9 (3.10+)."""

    NONE = "none"
    GZIP = "gzip"
    LZMA = "lzma"
    ZSTD = "zstd"

    @property
    def suffix(self) -> str:
        return _SUFFIXES[self]

    @classmethod
    def from_member_name(cls, name: str, stem: str) -> Compression:
        """The compression named by a member's suffix, e.g. ``header.tar.gz`` with stem ``header.tar``."""
        if not name.startswith(stem):
            raise ValueError(name)
        rest = name[len(stem) :]
        for comp, suffix in _SUFFIXES.items():
            if rest == suffix:
                return comp
        raise ValueError(name)


_SUFFIXES: Final = {
    Compression.NONE: "",
    Compression.GZIP: ".gz",
    Compression.LZMA: ".xz",
    Compression.ZSTD: ".zst",
}


def header_member(compression: Compression) -> str:
    return HEADER_MEMBER_STEM + compression.suffix


def data_member(index: int, compression: Compression) -> str:
    return f"data/{index:04d}.tar{compression.suffix}"


def data_file_path(index: int, name: str) -> str:
    """The path of a payload file as the manifest names it."""
    return f"data/{index:04d}/{name}"


# Names -----------------------------------------------------------------------------------------------------

#: state scripts an artifact may carry (Sync_/Idle_/Download_ scripts live on the device, not in artifacts)
STATE_SCRIPT_RE: Final = re.compile(
    r"^Artifact(Install|Reboot|Commit|Rollback|RollbackReboot|Failure)_(Enter|Leave|Error)_[0-9]{2}(_[^/\x00]*)?$"
)
#: payload (update module) type: a plain identifier
PAYLOAD_TYPE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
#: a file inside a payload: a plain file name, no directories
PAYLOAD_FILE_RE: Final = re.compile(r"^[^/\x00]{1,100}$")
#: artifact names, device types, groups, provides keys: printable, no control characters
TOKEN_RE: Final = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")
SHA256_HEX_RE: Final = re.compile(r"^[0-9a-f]{64}$")


def is_safe_file_name(name: str) -> bool:
    return bool(PAYLOAD_FILE_RE.match(name)) and name not in (".", "..")


# Limits: anything beyond them is refused as absurd before it is read ---------------------------------------

MAX_VERSION_SIZE: Final = 4096
MAX_MANIFEST_SIZE: Final = 1 << 20
MAX_SIGNATURE_SIZE: Final = 16 << 10
MAX_HEADER_SIZE: Final = 16 << 20  # compressed header.tar.*
MAX_HEADER_UNCOMPRESSED: Final = 64 << 20
MAX_SCRIPT_SIZE: Final = 4 << 20
MAX_JSON_SIZE: Final = 4 << 20
MAX_PAYLOADS: Final = 64
MAX_FILES_PER_PAYLOAD: Final = 4096
MAX_PAYLOAD_FILE_SIZE: Final = 1 << 40  # 1 TiB: no slot is bigger
MAX_DEVICE_TYPES: Final = 1024
#: the signed header part of an artifact (``version``, ``manifest``, ``manifest.sig``, ``header.tar*``) that an
#: instant rollback fetches alone: a few KB in practice; state scripts make it larger
MAX_HEADER_PART: Final = 1 << 20
