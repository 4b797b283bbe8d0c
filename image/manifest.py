"""``manifest.json`` of a release: what was built, from what, with which tools, how long it took.

:class:`ReleaseManifest` is the document (``to_json()`` writes it, ``from_json()`` reads it back); its fields are
in the order of the file's keys. :class:`PreviousRelease` is what a release needs of the one it updates from,
read leniently from that release's ``manifest.json`` (an older build's or a hand-written one serves as long as
it names its version).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ota_common.errors import UserError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BoardEntry:
    device_type: str


@dataclass(frozen=True)
class TrustEntry:
    """Fingerprints (sha256 of the DER SubjectPublicKeyInfo) of the keys the image trusts and revokes, and the
    agent's server settings."""

    release_key: str | None
    trusted_keys: list[str]
    revoked_keys: list[str]
    server_ca: int  # how many certificates
    server_url: str
    insecure_http: bool
    config_variables: list[str]


@dataclass(frozen=True)
class PreviousEntry:
    """The release this one updates from, and the delta artifacts from it (``delta-from-<old>-<board>.mender``):
    by board, the entries :func:`image.release.write_release_deltas` returns."""

    version: str
    artifact_name: str | None
    rootfs_sha256: str | None
    deltas: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class DiskEntry:
    disk_id: str
    slot_mib: int


@dataclass(frozen=True)
class ArchiveEntry:
    """A suite of the Debian archive as its ``Release`` file describes it (``date``: ISO 8601 UTC)."""

    suite: str
    codename: str
    version: str
    date: str
    origin: str = ""


@dataclass(frozen=True)
class BaseEntry:
    """The cached base rootfs the image was made from: its cache key, when it was bootstrapped, the archive's
    suites its package versions were current with (empty: unknown, e.g. built offline from a base cached before
    this was recorded), and the build's decision about it (reused, rebuilt and why). The image's packages and
    versions are :attr:`ReleaseManifest.packages`."""

    key: str
    suite: str
    mirror: str
    built_at: int | None = None
    archive: list[ArchiveEntry] = dataclasses.field(default_factory=list)
    decision: str = ""

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> BaseEntry:
        return cls(**{**doc, "archive": [ArchiveEntry(**a) for a in doc.get("archive", [])]})


@dataclass(frozen=True)
class OutputEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class PackageEntry:
    name: str
    version: str
    architecture: str


@dataclass(frozen=True)
class ReleaseManifest:
    name: str
    version: str
    artifact_name: str
    boards: dict[str, BoardEntry]
    source_date_epoch: int
    built_at: int
    build_seconds: float
    signed: bool
    security_version: int
    trust: TrustEntry
    previous: PreviousEntry | None
    kernel: str
    disk: DiskEntry
    layers: dict[str, str]  # layer name → sha256 of its file and sources
    base: BaseEntry
    outputs: dict[str, OutputEntry]  # by name (sorted), relative to the release directory
    packages: list[PackageEntry]
    tools: dict[str, str]  # program → its version line
    timings: dict[str, float]  # step → seconds

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> ReleaseManifest:
        """Raises :class:`UserError` for a document that is not a release manifest of this format."""
        try:
            doc = json.loads(text)
            previous = doc["previous"]
            return cls(
                **{k: doc[k] for k in ("name", "version", "artifact_name", "source_date_epoch", "built_at",
                                       "build_seconds", "signed", "security_version", "kernel", "layers", "tools",
                                       "timings")},
                boards={b: BoardEntry(**e) for b, e in doc["boards"].items()},
                trust=TrustEntry(**doc["trust"]),
                previous=None if previous is None else PreviousEntry(**previous),
                disk=DiskEntry(**doc["disk"]),
                base=BaseEntry.from_dict(doc["base"]),
                outputs={n: OutputEntry(**e) for n, e in doc["outputs"].items()},
                packages=[PackageEntry(**p) for p in doc["packages"]],
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"not a release manifest: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class PreviousRelease:
    """The release a new one updates from: its output directory and what its manifest says about it."""

    path: Path
    version: str
    artifact_name: str | None
    rootfs_sha256: str | None

    @classmethod
    def load(cls, path: Path) -> PreviousRelease:
        """Read ``path/manifest.json``. Raises :class:`UserError` naming the directory."""
        try:
            doc = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise UserError(f"the previous release {path}: no {MANIFEST} there; pass a release output directory "
                            "(OUT/<version>)") from None
        except ValueError:
            raise UserError(f"the previous release {path}: {MANIFEST} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise UserError(f"the previous release {path}: {MANIFEST} is not a release manifest")
        return cls.from_manifest(path, doc)

    @classmethod
    def from_manifest(cls, path: Path, doc: Mapping[str, Any]) -> PreviousRelease:
        """From a manifest document read already. Raises :class:`UserError` when it names no version."""
        version, name = doc.get("version"), doc.get("artifact_name")
        if not isinstance(version, str) or not isinstance(name, str | None):
            raise UserError(f"the previous release {path}: {MANIFEST} is not a release manifest")
        outputs = doc.get("outputs")
        rootfs = outputs.get("rootfs.ext4") if isinstance(outputs, dict) else None
        sha = rootfs.get("sha256") if isinstance(rootfs, dict) else None
        return cls(path, version, name, sha if isinstance(sha, str) else None)

    def artifact(self, board: str) -> Path:
        """Its full artifact for ``board`` (which may not exist)."""
        return self.path / f"{self.artifact_name}-{board}.mender"

    def entry(self, deltas: dict[str, dict[str, Any]]) -> PreviousEntry:
        return PreviousEntry(self.version, self.artifact_name, self.rootfs_sha256, deltas)


__all__ = ["MANIFEST", "ArchiveEntry", "BaseEntry", "BoardEntry", "DiskEntry", "OutputEntry", "PackageEntry", "PreviousEntry",
           "PreviousRelease", "ReleaseManifest", "TrustEntry"]
