"""The artifact manifest: ``<sha256 hex>  <path>\\n`` for every file, sorted by path.

It lists the ``version`` member, the stored (compressed) header member and every *uncompressed* payload file
as ``data/NNNN/<name>``. The signature covers these exact bytes, so parsing is strict: lowercase hex, two
spaces, safe paths, no duplicates, and the last line must end with a newline (mender-artifact refuses a
manifest without it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ota_common.errors import MalformedArtifact

from .format import MAX_MANIFEST_SIZE, SHA256_HEX_RE, is_safe_file_name

_LINE_RE = re.compile(r"^([0-9a-f]{64})  (\S+)$")
_DATA_PATH_RE = re.compile(r"^data/([0-9]{4})/(.+)$")
_TOP_LEVEL = re.compile(r"^(version|header\.tar(\.gz|\.xz|\.zst)?)$")


@dataclass(frozen=True)
class Manifest:
    """Checksums by path, in the order they appear (sorted)."""

    entries: Mapping[str, str]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.entries.items())

    def checksum(self, path: str) -> str | None:
        return self.entries.get(path)

    def data_files(self, index: int) -> dict[str, str]:
        """``{file name: sha256}`` of payload ``index``."""
        prefix = f"data/{index:04d}/"
        return {p[len(prefix) :]: c for p, c in self.entries.items() if p.startswith(prefix)}

    def serialize(self) -> bytes:
        return "".join(f"{c}  {p}\n" for p, c in sorted(self.entries.items())).encode()

    @classmethod
    def build(cls, entries: Mapping[str, str]) -> Manifest:
        for path, checksum in entries.items():
            if not SHA256_HEX_RE.match(checksum):
                raise ValueError(f"not a sha256 hex digest: {checksum!r}")
            _check_path(path)
        return cls(dict(sorted(entries.items())))

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Parse manifest bytes; raises :class:`MalformedArtifact`."""
        if len(data) > MAX_MANIFEST_SIZE:
            raise MalformedArtifact(f"manifest is {len(data)} bytes, which is absurd")
        if not data:
            raise MalformedArtifact("manifest is empty")
        if not data.endswith(b"\n"):
            raise MalformedArtifact("manifest: the last line does not end with a newline")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedArtifact("manifest is not ASCII text") from None
        entries: dict[str, str] = {}
        for n, line in enumerate(text[:-1].split("\n"), 1):
            m = _LINE_RE.match(line)
            if not m:
                raise MalformedArtifact(f"manifest line {n} is malformed: {line[:100]!r}")
            checksum, path = m.groups()
            try:
                _check_path(path)
            except ValueError as e:
                raise MalformedArtifact(f"manifest line {n}: {e}") from None
            if path in entries:
                raise MalformedArtifact(f"manifest lists {path} twice")
            entries[path] = checksum
        return cls(entries)


def _check_path(path: str) -> None:
    if _TOP_LEVEL.match(path):
        return
    m = _DATA_PATH_RE.match(path)
    if not m or not is_safe_file_name(m.group(2)):
        raise ValueError(f"unsafe or unexpected path {path!r}")
