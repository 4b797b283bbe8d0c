"""What a release's SBOM says, for the server (issue 17): the packages of a CycloneDX JSON document and the diff
between two package lists. Pure functions of bytes and lists: the routes (:mod:`.release_sbom`) and the dashboard
(:mod:`.dashboard_releases`) share them.

The document is untrusted input even though its sha256 is the one an artifact's signed header names (a release
engineer's build wrote it, but a parser must not trust a file for being signed): its shape is checked strictly
and bounded (size, components, nesting, string lengths), and only what a diff needs is kept: the components that
have a purl (a Debian package of the image is ``pkg:deb/debian/<name>@<version>?arch=...``), each with its name,
version and purl.

A package is identified across releases by its purl without version and without qualifiers other than ``arch``
(``distro=debian-bookworm`` becoming ``debian-trixie`` is an upgrade of every package, not a removal and an
addition). Versions compare as Debian versions (``debian.debian_support.Version``: epochs, ``~``, revisions),
which also orders the dotted versions of other ecosystems; two versions that Debian cannot parse compare as
strings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from debian.debian_support import Version
from packageurl import PackageURL

from ota_common.errors import ArtifactError

#: the largest SBOM the server takes (the artifact's is a few hundred kB: ~600 bytes per package)
MAX_SBOM = 16 << 20
#: the most components (nested ones included) one SBOM may list
MAX_COMPONENTS = 200_000
#: how deep components may nest (ours: the app, then its files)
MAX_DEPTH = 16
MAX_NAME = 256
MAX_VERSION = 256
MAX_PURL = 2048
#: the CycloneDX versions whose JSON has ``components[].name/version/purl`` as read here
SPEC_VERSIONS = frozenset({"1.2", "1.3", "1.4", "1.5", "1.6"})


class SbomError(ArtifactError):
    """The document is not a CycloneDX JSON SBOM the server can read (the message says why, for an operator)."""


@dataclass(frozen=True, order=True)
class Package:
    """One package of a release (a component with a purl)."""

    name: str
    version: str
    purl: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What identifies the package across releases: purl type, namespace, name and architecture."""
        return _key(self.purl, self.name)

    def doc(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "purl": self.purl}


@dataclass(frozen=True)
class Change:
    """A package in both releases with another version."""

    name: str
    purl: str  # the newer release's
    from_version: str
    to_version: str

    def doc(self) -> dict[str, str]:
        return {"name": self.name, "purl": self.purl, "from_version": self.from_version, "to_version": self.to_version}


@dataclass(frozen=True)
class PackageDiff:
    added: list[Package] = field(default_factory=list)
    removed: list[Package] = field(default_factory=list)
    upgraded: list[Change] = field(default_factory=list)
    downgraded: list[Change] = field(default_factory=list)
    unchanged: int = 0

    def doc(self) -> dict[str, Any]:
        return {"added": [p.doc() for p in self.added], "removed": [p.doc() for p in self.removed],
                "upgraded": [c.doc() for c in self.upgraded], "downgraded": [c.doc() for c in self.downgraded],
                "unchanged": self.unchanged}


def _key(purl: str, name: str) -> tuple[str, str, str, str]:
    try:
        p = PackageURL.from_string(purl)
    except ValueError:  # stored packages were parsed at upload; this is only a guard
        return ("", "", name, "")
    arch = p.qualifiers.get("arch", "") if isinstance(p.qualifiers, dict) else ""
    return (p.type, p.namespace or "", p.name, arch)


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value:
        raise SbomError(f"{what} must be a non-empty string")
    if len(value) > limit:
        raise SbomError(f"{what} is longer than {limit} characters")
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in value):
        raise SbomError(f"{what} holds a control character")
    return value


def _components(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every component (nested ones too) with its place in the document, for messages. Raises SbomError."""
    count = 0
    stack: list[tuple[str, Any, int]] = [("components", doc.get("components", []), 1)]
    while stack:
        where, items, depth = stack.pop()
        if not isinstance(items, list):
            raise SbomError(f"{where} must be a list")
        if depth > MAX_DEPTH:
            raise SbomError(f"components nest deeper than {MAX_DEPTH} levels")
        for i, c in enumerate(items):
            count += 1
            if count > MAX_COMPONENTS:
                raise SbomError(f"more than {MAX_COMPONENTS} components")
            here = f"{where}[{i}]"
            if not isinstance(c, dict):
                raise SbomError(f"{here} is not an object")
            yield here, c
            if "components" in c:
                stack.append((f"{here}.components", c["components"], depth + 1))


def read_sbom(data: bytes) -> list[Package]:
    """The packages of a CycloneDX JSON SBOM (its components with a purl), sorted. Raises :class:`SbomError`
    for a document that is not UTF-8 JSON, not CycloneDX, or whose components are malformed (a component without
    a name, a package without a version or with a purl that does not parse, one package listed twice with two
    versions)."""
    if len(data) > MAX_SBOM:
        raise SbomError(f"{len(data)} bytes is more than an SBOM may have ({MAX_SBOM})")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SbomError("not UTF-8 text") from None
    except (ValueError, RecursionError):
        raise SbomError("not JSON") from None
    if not isinstance(doc, dict) or doc.get("bomFormat") != "CycloneDX":
        raise SbomError('not a CycloneDX document (no "bomFormat": "CycloneDX")')
    spec = doc.get("specVersion")
    if spec not in SPEC_VERSIONS:
        raise SbomError(f"specVersion {spec!r} is not one of CycloneDX {', '.join(sorted(SPEC_VERSIONS))}")
    packages: dict[tuple[str, str, str, str], Package] = {}
    for where, c in _components(doc):
        name = _text(c.get("name"), f"{where}.name", MAX_NAME)
        if "purl" not in c:
            continue
        purl = _text(c["purl"], f"{where}.purl", MAX_PURL)
        try:
            PackageURL.from_string(purl)
        except ValueError as e:
            raise SbomError(f"{where}.purl {purl[:80]!r} is not a package URL: {e}") from None
        version = _text(c.get("version"), f"{where}.version (of package {name})", MAX_VERSION)
        p = Package(name, version, purl)
        seen = packages.setdefault(p.key, p)
        if seen.version != p.version:
            raise SbomError(f"package {name} is listed twice, with versions {seen.version} and {version}")
    return sorted(packages.values())


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is older than, the same as or newer than ``b`` (Debian's ordering)."""
    try:
        va, vb = Version(a), Version(b)
    except ValueError:
        return (a > b) - (a < b)
    return (va > vb) - (va < vb)


def diff_packages(old: Iterable[Package], new: Iterable[Package]) -> PackageDiff:
    """What installing the release with packages ``new`` changes on a device that runs ``old``: the packages
    added, removed, upgraded and downgraded (each list sorted by name), and how many stay as they are."""
    before = {p.key: p for p in old}
    after = {p.key: p for p in new}
    diff = PackageDiff(added=sorted(p for k, p in after.items() if k not in before),
                       removed=sorted(p for k, p in before.items() if k not in after))
    unchanged = 0
    for k in sorted(before.keys() & after.keys(), key=lambda k: (after[k].name, k)):
        o, n = before[k], after[k]
        order = compare_versions(n.version, o.version)
        if order == 0:
            unchanged += 1
        else:
            (diff.upgraded if order > 0 else diff.downgraded).append(Change(n.name, n.purl, o.version, n.version))
    return PackageDiff(diff.added, diff.removed, diff.upgraded, diff.downgraded, unchanged)


def packages_from_rows(rows: Sequence[Sequence[str]]) -> list[Package]:
    """The packages as stored (``[[name, version, purl], ...]``)."""
    return [Package(str(r[0]), str(r[1]), str(r[2])) for r in rows]


def packages_to_rows(packages: Iterable[Package]) -> list[list[str]]:
    return [[p.name, p.version, p.purl] for p in packages]


__all__ = ["MAX_SBOM", "Change", "Package", "PackageDiff", "SbomError", "compare_versions", "diff_packages",
           "packages_from_rows", "packages_to_rows", "read_sbom"]
