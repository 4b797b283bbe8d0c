"""The Debian archive's state, read cheaply: the ``Release`` files and ``Packages`` indexes of the suites a base
rootfs is bootstrapped from, fetched by apt itself with a private state directory (no bootstrap, host apt state
untouched), then compared with what a cached base holds.

Where from: the machine's own apt sources for the release's suite and its ``-updates`` and ``-security``
suites — the suites mmdebstrap puts in a bootstrapped system's sources.list when no mirror is given — or the
release's ``mirror`` when it sets one (mmdebstrap then uses that mirror and suite only). No mirror host name is
written here: the machine's configuration decides, as it does for mmdebstrap.
"""

from __future__ import annotations

import calendar
import email.utils
import gzip
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from debian.deb822 import Deb822, Release
from debian.debian_support import Version

from ota_common.errors import DownloadError, ToolError, UserError
from ota_common.tools import run

from .manifest import ArchiveEntry as ArchiveRelease  # what a suite's Release file says, as the manifest records it

ARCH = "arm64"
#: mmdebstrap's default component; the base installs nothing from others
COMPONENTS = ("main",)
APT_ETC = Path("/etc/apt")


class ArchiveUnreachable(DownloadError):
    """The archive's indexes could not be fetched: whether the cached base is current is unknown. The build
    stops rather than ship a base that may lack security updates without saying so; the caller may build
    offline instead."""


@dataclass(frozen=True)
class Source:
    """One suite of one archive, as apt needs it."""

    uri: str
    suite: str
    components: tuple[str, ...] = COMPONENTS
    signed_by: str = ""

    def stanza(self) -> str:
        text = f"Types: deb\nURIs: {self.uri}\nSuites: {self.suite}\nComponents: {' '.join(self.components)}\n"
        return text + (f"Signed-By: {self.signed_by}\n" if self.signed_by else "")


@dataclass(frozen=True)
class ArchiveState:
    """The suites' releases and the newest version of every package (for the architecture and ``all``)."""

    releases: tuple[ArchiveRelease, ...]
    versions: Mapping[str, str]

    def summary(self) -> str:
        """``bookworm 12.15 of 2026-07-11, bookworm-security 12 of 2026-12-01``"""
        return ", ".join(f"{r.codename or r.suite}{' ' + r.version if r.version else ''} of {r.date[:10]}"
                         for r in self.releases)


@dataclass(frozen=True)
class Upgrade:
    name: str
    installed: str
    archive: str

    def __str__(self) -> str:
        return f"{self.name} {self.installed} → {self.archive}"


def suites_for(suite: str) -> tuple[str, ...]:
    """The suites mmdebstrap's sources.list holds for a Debian codename given without a mirror."""
    return (suite, f"{suite}-updates", f"{suite}-security")


def configured_sources(suites: Sequence[str], etc: Path = APT_ETC) -> list[Source]:
    """The machine's apt sources (deb822 ``*.sources`` and one-line ``*.list``) for ``suites``, first source of
    each suite, in the order of ``suites``; only the :data:`COMPONENTS` the base uses."""
    found: dict[str, Source] = {}

    def add(uri: str, suite: str, components: Iterable[str], signed_by: str) -> None:
        if suite in suites and suite not in found and set(COMPONENTS) <= set(components):
            found[suite] = Source(uri.rstrip("/"), suite, COMPONENTS, signed_by)

    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        for para in Deb822.iter_paragraphs(f.read_text()):
            if "deb" not in para.get("Types", "").split() or para.get("Enabled", "yes").lower() == "no":
                continue
            for uri in para.get("URIs", "").split()[:1]:
                for s in para.get("Suites", "").split():
                    add(uri, s, para.get("Components", "").split(), para.get("Signed-By", "").strip())
    lists = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for f in lists:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            m = re.match(r"^\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line)
            if m:
                opts = dict(o.partition("=")[::2] for o in (m.group(1) or "").split())
                add(m.group(2), m.group(3), m.group(4).split(), opts.get("signed-by", ""))
    return [found[s] for s in suites if s in found]


def archive_sources(suite: str, mirror: str, etc: Path = APT_ETC) -> list[Source]:
    """The sources a base of ``suite`` is bootstrapped from (see the module docstring). Raises
    :class:`UserError` when the machine has no source for ``suite`` itself."""
    if mirror:
        return [Source(mirror.rstrip("/"), suite)]
    sources = configured_sources(suites_for(suite), etc)
    if not any(s.suite == suite for s in sources):
        raise UserError(f"no apt source for {suite} ({' '.join(COMPONENTS)}) on this machine; add one, or set "
                        "'mirror' in release.yaml")
    return sources


def fetch_indexes(sources: Sequence[Source], work: Path, *, arch: str = ARCH, timeout: float = 600) -> Path:
    """``apt-get update`` for ``sources`` and ``arch`` with a private state directory under ``work`` (the
    host's trusted keys still verify the ``InRelease`` signatures). Returns the lists directory. Raises
    :class:`ArchiveUnreachable` when any suite's indexes could not be fetched."""
    for d in ("lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d"):
        (work / d).mkdir(parents=True, exist_ok=True)
    (work / "status").touch()
    (work / "etc" / "sources.list").write_text("")
    (work / "etc" / "sources.list.d" / "archive.sources").write_text("\n".join(s.stanza() for s in sources))
    opts = {
        "Dir::State": work, "Dir::State::Lists": work / "lists", "Dir::State::status": work / "status",
        "Dir::Cache": work / "cache", "Dir::Etc::SourceList": work / "etc" / "sources.list",
        "Dir::Etc::SourceParts": work / "etc" / "sources.list.d",
        "Dir::Etc::Preferences": work / "etc" / "preferences", "Dir::Etc::PreferencesParts": work / "etc" / "preferences.d",
        "APT::Architecture": arch, "APT::Architectures": arch, "Acquire::GzipIndexes": "false",
        "Acquire::Languages": "none", "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled": "false",
        "Debug::NoLocking": "1",
    }
    argv = ["apt-get", "-q"]
    for k, v in opts.items():
        argv += ["-o", f"{k}={v}"]
    try:
        proc = run([*argv, "update"], stage="archive indexes (apt-get update)", timeout=timeout)
    except ToolError as e:
        if e.returncode is None and not e.stderr:  # apt-get is not installed
            raise
        raise ArchiveUnreachable(f"could not fetch the archive's indexes ({', '.join(s.suite for s in sources)}): "
                                 f"{_apt_said(e.stderr)}", transient=True) from None
    said = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    if re.search(r"^(W|E|Err):", said, re.M) and ("Failed to fetch" in said or "Err:" in said):
        raise ArchiveUnreachable(f"could not fetch the archive's indexes: {_apt_said(said)}", transient=True)
    return work / "lists"


def _apt_said(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.startswith(("E:", "Err:", "W:")) or "Failed" in ln]
    return " / ".join(lines[:3]) or text.strip()[-300:] or "no reason given"


def read_indexes(lists: Path, *, arch: str = ARCH) -> ArchiveState:
    """The state of the archive from a directory of ``Release``/``InRelease`` files and ``Packages`` indexes
    (apt's lists directory, or any directory holding files named like them). Raises :class:`UserError` when
    there is no ``Release`` or no ``Packages`` file."""
    releases = []
    for f in sorted(lists.iterdir()):
        if f.name.endswith("InRelease") or f.name.endswith("_Release") or f.name == "Release":
            releases.append(_release(f))
    packages = [f for f in sorted(lists.iterdir())
                if re.search(r"(^|_)Packages(\.gz)?$", f.name) and ("binary-" not in f.name or
                                                                   f"binary-{arch}_" in f.name)]
    if not releases or not packages:
        raise UserError(f"{lists}: no Release file or no Packages index for {arch}")
    versions: dict[str, str] = {}
    for f in packages:
        for name, version, parch in _stanzas(f):
            if parch not in (arch, "all"):
                continue
            old = versions.get(name)
            if old is None or Version(version) > Version(old):
                versions[name] = version
    return ArchiveState(tuple(sorted(releases, key=lambda r: r.codename or r.suite)), versions)


def _release(f: Path) -> ArchiveRelease:
    rel = Release(f.read_bytes())
    date = rel.get("Date", "")
    try:
        parsed = email.utils.parsedate_tz(date)
        iso = "" if parsed is None else _iso(calendar.timegm(parsed[:9]) - (parsed[9] or 0))
    except (TypeError, ValueError, OverflowError):
        iso = ""
    return ArchiveRelease(suite=rel.get("Suite", ""), codename=rel.get("Codename", ""),
                          version=rel.get("Version", ""), date=iso, origin=rel.get("Origin", ""))


def _iso(t: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _stanzas(f: Path) -> Iterator[tuple[str, str, str]]:
    """(Package, Version, Architecture) of each stanza. A line scan, not python-debian's full parser: a suite's
    index has ~60,000 stanzas of which three fields are needed, and this reads them ~20× faster."""
    opener = gzip.open if f.name.endswith(".gz") else open
    name = version = parch = ""
    with opener(f, "rt", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith("Package: "):
                name = line[9:].strip()
            elif line.startswith("Version: "):
                version = line[9:].strip()
            elif line.startswith("Architecture: "):
                parch = line[14:].strip()
            elif line in ("\n", ""):
                if name and version:
                    yield name, version, parch
                name = version = parch = ""
    if name and version:
        yield name, version, parch


def newer_packages(installed: Mapping[str, str], archive: ArchiveState) -> list[Upgrade]:
    """Packages of ``installed`` (name → version) of which the archive has a newer version, by name."""
    out = []
    for name, version in sorted(installed.items()):
        newest = archive.versions.get(name)
        if newest is not None and Version(newest) > Version(version):
            out.append(Upgrade(name, version, newest))
    return out


__all__ = ["ARCH", "ArchiveRelease", "ArchiveState", "ArchiveUnreachable", "Source", "Upgrade", "archive_sources",
           "configured_sources", "fetch_indexes", "newer_packages", "read_indexes", "suites_for"]
