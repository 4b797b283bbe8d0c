"""The cached base rootfs is valid for the archive state it was built from (image/basecache.py, image/archive.py).

Every decision on a fake cache (a base tarball with a dpkg status, made here) and a fake archive (Release and
Packages files in a temporary directory, read by the real index reader): not cached, up to date, newer packages
in the archive, too old, a rebuild asked for, offline (with and without a cached base), the archive unreachable
(a real ``apt-get update`` against a source that does not exist: no network). The stand-in bootstrap writes a
base with the archive's versions, as mmdebstrap would. Then — slow — the real indexes of bookworm arm64 through
this machine's apt sources, compared with the real cached base when there is one.
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import image.basecache
from build import main as build_main
from image import archive, rootfs
from image.archive import ArchiveState, ArchiveUnreachable, Source, Upgrade
from image.basecache import BasePolicy, BaseRecord, ensure_base, read_record, record_path
from ota_common.errors import UserError

DAY = 86400
NOW = 1_796_000_000  # 2026-11-30
BUILT = NOW - 2 * DAY
SPEC = rootfs.BaseSpec("bookworm", "", ("openssl", "systemd"))
OLD = {"libssl3": "3.0.20-1~deb12u2", "openssl": "3.0.20-1~deb12u2", "systemd": "252.39-1~deb12u1",
       "base-files": "12.4+deb12u12"}
DEFAULT = BasePolicy()

INRELEASE = """-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA512

Origin: Debian
Label: Debian-Security
Suite: oldstable-security
Version: 12
Codename: bookworm-security
Date: Tue, 01 Dec 2026 01:33:13 UTC
Architectures: amd64 arm64
Components: updates/main
-----BEGIN PGP SIGNATURE-----

iQIzBAEBCgAdFiEE
-----END PGP SIGNATURE-----
"""
RELEASE = ("Origin: Debian\nLabel: Debian\nSuite: oldstable\nVersion: 12.15\nCodename: bookworm\n"
           "Date: Sat, 11 Jul 2026 10:16:37 UTC\nArchitectures: amd64 arm64\nComponents: main\n")


def _packages(versions: dict[str, str], arch: str = "arm64") -> str:
    return "".join(f"Package: {n}\nSource: x\nVersion: {v}\nArchitecture: {'all' if n == 'base-files' else arch}\n"
                   f"Description: {n}\n continued line\n\n" for n, v in versions.items())


def fake_archive(root: Path, main: dict[str, str], security: dict[str, str] | None = None) -> Path:
    """A lists directory as apt leaves it: bookworm (Release) and bookworm-security (InRelease, signed form)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "mirror_debian_dists_bookworm_Release").write_text(RELEASE)
    (root / "mirror_debian_dists_bookworm_main_binary-arm64_Packages").write_text(_packages(main))
    # another architecture's index must not count
    (root / "mirror_debian_dists_bookworm_main_binary-amd64_Packages").write_text(
        _packages({n: "99:9" for n in main}, "amd64"))
    if security is not None:
        (root / "mirror_debian-security_dists_bookworm-security_InRelease").write_text(INRELEASE)
        (root / "mirror_debian-security_dists_bookworm-security_main_binary-arm64_Packages").write_text(
            _packages(security))
    return root


def _status(versions: dict[str, str]) -> str:
    return "".join(f"Package: {n}\nStatus: install ok installed\nPriority: optional\nVersion: {v}\n"
                   f"Architecture: arm64\nDescription: {n}\n more\n\n" for n, v in versions.items())


def fake_base(tar: Path, versions: dict[str, str], mtime: float = BUILT) -> Path:
    """A base tarball holding a dpkg status (what the cache check reads of it)."""
    tar.parent.mkdir(parents=True, exist_ok=True)
    data = _status(versions).encode()
    with tarfile.open(tar, "w") as tf:
        for d in ("./var", "./var/lib", "./var/lib/dpkg"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        info = tarfile.TarInfo("./var/lib/dpkg/status")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    import os

    os.utime(tar, (mtime, mtime))
    return tar


class Bootstraps:
    """Stands in for mmdebstrap: writes a base with ``versions`` (the archive's) where the real one would."""

    def __init__(self, versions: dict[str, str]) -> None:
        self.versions = versions
        self.calls: list[dict[str, Any]] = []

    def __call__(self, spec: rootfs.BaseSpec, cache: Path, progress: Any, **kw: Any) -> Path:
        self.calls.append(kw)
        return fake_base(rootfs.base_path(spec, cache), self.versions, time.time())


def _decide(tmp_path: Path, state: ArchiveState | None, policy: BasePolicy = DEFAULT, *,
            now: float = NOW, boot: Bootstraps | None = None, spec: rootfs.BaseSpec = SPEC) -> tuple[list[str], Any]:
    lines: list[str] = []

    def check() -> ArchiveState:
        if state is None:
            raise AssertionError("the archive must not be asked")
        return state

    path, info = ensure_base(spec, tmp_path / "cache", policy, progress=lines.append, check=check,
                             bootstrap=boot or Bootstraps({}), now=now)
    assert path == rootfs.base_path(spec, tmp_path / "cache")
    return lines, info


def cached(tmp_path: Path, versions: dict[str, str] = OLD, spec: rootfs.BaseSpec = SPEC) -> Path:
    return fake_base(rootfs.base_path(spec, tmp_path / "cache"), versions)


NEW = {**OLD, "libssl3": "3.0.22-1~deb12u2", "openssl": "3.0.22-1~deb12u2"}


@pytest.fixture
def current(tmp_path: Path) -> ArchiveState:
    """The archive with openssl's security update: bookworm has the old versions, bookworm-security the new."""
    return archive.read_indexes(fake_archive(tmp_path / "lists", OLD, {k: NEW[k] for k in ("libssl3", "openssl")}))


def test_the_archive_index_gives_the_newest_version_of_each_package_and_its_releases(current: ArchiveState) -> None:
    assert current.versions["openssl"] == "3.0.22-1~deb12u2"  # from -security, over the point release
    assert current.versions["systemd"] == "252.39-1~deb12u1"
    assert current.versions["base-files"] == "12.4+deb12u12"  # Architecture: all counts
    assert "99:9" not in current.versions.values()  # amd64 does not
    assert [(r.codename, r.suite, r.version, r.date) for r in current.releases] == [
        ("bookworm", "oldstable", "12.15", "2026-07-11T10:16:37Z"),
        ("bookworm-security", "oldstable-security", "12", "2026-12-01T01:33:13Z")]
    assert current.summary() == "bookworm 12.15 of 2026-07-11, bookworm-security 12 of 2026-12-01"
    # Debian's version order, not the strings': 1:1.0 > 9.0 (the epoch), 1.0~rc1 < 1.0, 1.0~rc1 > 1.0~beta
    state = ArchiveState((), {"a": "1:1.0", "b": "1.0~rc1"})
    assert archive.newer_packages({"a": "1:1.0", "b": "1.0"}, state) == []
    assert archive.newer_packages({"a": "9.0", "b": "1.0~beta"}, state) == [Upgrade("a", "9.0", "1:1.0"),
                                                                             Upgrade("b", "1.0~beta", "1.0~rc1")]


def test_an_empty_or_foreign_directory_is_no_archive(tmp_path: Path) -> None:
    (tmp_path / "Packages").write_text(_packages({"x": "1"}))
    with pytest.raises(UserError, match="no Release file"):
        archive.read_indexes(tmp_path)


def test_not_cached_bootstraps(tmp_path: Path, current: ArchiveState) -> None:
    boot = Bootstraps(NEW)
    lines, info = _decide(tmp_path, current, boot=boot)
    assert lines == ["not cached: bootstrapping from the archive (bookworm 12.15 of 2026-07-11, bookworm-security 12 "
                     "of 2026-12-01)"]
    assert boot.calls == [{}]
    record = read_record(rootfs.base_path(SPEC, tmp_path / "cache"))
    assert record.packages == NEW and [r.codename for r in record.archive] == ["bookworm", "bookworm-security"]
    assert info.archive == current.releases and info.decision == lines[0]


def test_a_cached_base_current_with_the_archive_is_reused(tmp_path: Path) -> None:
    tar = cached(tmp_path, NEW)
    state = archive.read_indexes(fake_archive(tmp_path / "lists", NEW))
    boot = Bootstraps(NEW)
    lines, info = _decide(tmp_path, state, boot=boot)
    assert lines == ["cached 2026-11-28, up to date with the archive (bookworm 12.15 of 2026-07-11): reused"]
    assert boot.calls == [] and info.built_at == BUILT
    record = read_record(tar)  # made from the tarball's dpkg status (a base cached before records existed) ...
    assert record.packages == NEW and record.built_at == BUILT
    assert record.checked_at == NOW and [r.codename for r in record.archive] == ["bookworm"]  # ... and checked


def test_newer_packages_in_the_archive_rebuild_the_base(tmp_path: Path, current: ArchiveState) -> None:
    tar = cached(tmp_path, OLD)
    boot = Bootstraps(NEW)
    lines, info = _decide(tmp_path, current, boot=boot)
    assert lines == ["cached 2026-11-28, the archive has 2 newer packages (e.g. libssl3 3.0.20-1~deb12u2 → "
                     "3.0.22-1~deb12u2, openssl 3.0.20-1~deb12u2 → 3.0.22-1~deb12u2): rebuilding"]
    assert boot.calls == [{"force": True}]  # the cached tarball is replaced
    assert read_record(tar).packages["openssl"] == "3.0.22-1~deb12u2"
    assert info.built_at > BUILT
    # the next build finds it current
    lines, _ = _decide(tmp_path, current, boot=boot, now=time.time())
    assert lines[0].endswith(": reused") and len(boot.calls) == 1


def test_many_newer_packages_are_counted_and_a_few_named(tmp_path: Path) -> None:
    many = {f"lib{i:02d}": "1.0" for i in range(12)}
    cached(tmp_path, many)
    state = ArchiveState((), {n: "1.0+deb12u1" for n in many})
    lines, _ = _decide(tmp_path, state, boot=Bootstraps(many))
    assert lines[0].startswith("cached 2026-11-28, the archive has 12 newer packages (e.g. lib00 1.0 → 1.0+deb12u1, "
                               "lib01 1.0 → 1.0+deb12u1, lib02 1.0 → 1.0+deb12u1, …): rebuilding")


def test_a_version_the_layers_pin_is_not_out_of_date(tmp_path: Path, current: ArchiveState) -> None:
    pinned = rootfs.BaseSpec("bookworm", "", ("openssl=3.0.20-1~deb12u2", "libssl3=3.0.20-1~deb12u2", "systemd"))
    cached(tmp_path, OLD, pinned)
    boot = Bootstraps(NEW)
    lines, _ = _decide(tmp_path, current, boot=boot, spec=pinned)
    assert lines[0].endswith("; older as pinned: libssl3, openssl: reused") and boot.calls == []


def test_a_base_older_than_the_maximum_age_is_rebuilt(tmp_path: Path) -> None:
    cached(tmp_path, NEW)
    state = archive.read_indexes(fake_archive(tmp_path / "lists", NEW))
    boot = Bootstraps(NEW)
    lines, _ = _decide(tmp_path, state, BasePolicy(max_age_days=7), boot=boot, now=BUILT + 7 * DAY + 60)
    assert lines == ["cached 2026-11-28, older than 7 days: rebuilding from the archive (bookworm 12.15 of "
                     "2026-07-11)"]
    assert boot.calls == [{"force": True}]
    lines, _ = _decide(tmp_path, state, BasePolicy(max_age_days=0.5), boot=boot, now=time.time() + DAY)
    assert "older than 0.5 days" in lines[0] and len(boot.calls) == 2


def test_a_rebuild_asked_for_rebuilds_a_current_base(tmp_path: Path) -> None:
    cached(tmp_path, NEW)
    state = archive.read_indexes(fake_archive(tmp_path / "lists", NEW))
    boot = Bootstraps(NEW)
    lines, _ = _decide(tmp_path, state, BasePolicy(refresh=True), boot=boot)
    assert lines == ["cached 2026-11-28, a rebuild was asked for: rebuilding"] and boot.calls == [{"force": True}]


def test_offline_reuses_the_cached_base_without_asking_the_archive(tmp_path: Path) -> None:
    cached(tmp_path, OLD)
    boot = Bootstraps(NEW)
    lines, info = _decide(tmp_path, None, BasePolicy(offline=True), boot=boot)
    assert lines == ["cached 2026-11-28, offline: reused without checking the archive (it may lack security updates "
                     "published since)"]
    assert boot.calls == [] and info.archive == () and info.built_at == BUILT


def test_offline_without_a_cached_base_and_offline_with_a_rebuild_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="building offline, but no base rootfs is cached"):
        _decide(tmp_path, None, BasePolicy(offline=True))
    with pytest.raises(UserError, match="exclude each other"):
        BasePolicy(offline=True, refresh=True)
    result = CliRunner().invoke(build_main, ["release", "--unsigned", "--offline", "--refresh-base"])
    assert result.exit_code == 2 and "--refresh-base and --offline exclude each other" in result.output


def test_an_unreachable_archive_stops_the_build_and_the_cli_names_the_way_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the base is current is unknown: the build does not guess (and never ships a stale base without a
    word); building offline is the explicit way. A real apt-get update against a source that is not there."""
    cached(tmp_path, OLD)
    boot = Bootstraps(NEW)
    with pytest.raises(ArchiveUnreachable, match="could not fetch the archive's indexes") as e:
        ensure_base(SPEC, tmp_path / "cache", progress=lambda m: None, bootstrap=boot,
                    check=lambda: archive.read_indexes(archive.fetch_indexes(
                        [Source(f"file://{tmp_path}/no-mirror", "bookworm")], tmp_path / "apt")))
    assert e.value.transient and e.value.exit_code == 4 and boot.calls == []

    def unreachable(*a: Any, **kw: Any) -> Any:
        raise ArchiveUnreachable("could not fetch the archive's indexes (bookworm): Err: no route", transient=True)

    monkeypatch.setattr(image.release, "build_release", unreachable)
    result = CliRunner().invoke(build_main, ["release", "--unsigned"])
    assert result.exit_code == 4
    assert "no route; to build from the cached base rootfs as it is, pass --offline" in result.output


def test_a_damaged_record_is_made_again_from_the_tarball(tmp_path: Path) -> None:
    tar = cached(tmp_path, OLD)
    record_path(tar).write_text('{"built_at": "soon", "packages": []}')
    assert read_record(tar).packages == OLD
    assert BaseRecord.from_json(record_path(tar).read_text()).packages == OLD


def test_the_machines_apt_sources_are_read_for_the_suite_and_its_updates_and_security(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main contrib\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://other.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm-security\nComponents: main\n")
    (etc / "sources.list").write_text("# comment\ndeb [arch=arm64 signed-by=/k.gpg] http://sec.example/debian-security "
                                      "bookworm-security main\ndeb http://x.example/ trixie main\n")
    (etc / "sources.list.d" / "off.list.disabled").write_text("deb http://no.example/ bookworm main\n")
    got = archive.archive_sources("bookworm", "", etc)
    assert got == [Source("http://mirror.example/debian", "bookworm", ("main",),
                          "/usr/share/keyrings/debian-archive-keyring.gpg"),
                   Source("http://mirror.example/debian", "bookworm-updates", ("main",),
                          "/usr/share/keyrings/debian-archive-keyring.gpg"),
                   Source("http://sec.example/debian-security", "bookworm-security", ("main",), "/k.gpg")]
    # a release's mirror is mmdebstrap's only source
    assert archive.archive_sources("bookworm", "http://m.example/debian/", etc) == [
        Source("http://m.example/debian", "bookworm")]
    with pytest.raises(UserError, match="no apt source for sid"):
        archive.archive_sources("sid", "", etc)


@pytest.mark.slow
def test_the_real_archive_index_for_bookworm_arm64_and_the_real_cached_base(tmp_path: Path) -> None:
    """The fetch through this machine's apt sources (a few seconds), then — when a base is cached on this machine
    — its packages against the archive (read only: the shared cache is not written)."""
    state = image.basecache.check_archive("bookworm", "", tmp_path)
    codenames = {r.codename for r in state.releases}
    assert {"bookworm", "bookworm-security"} <= codenames, state.releases
    assert all(r.date[:2] == "20" for r in state.releases)
    for name in ("openssl", "libssl3", "systemd", "linux-image-arm64", "python3-cryptography", "base-files"):
        assert name in state.versions
    assert len(state.versions) > 30_000
    from image.release import default_cache_dir

    bases = sorted((default_cache_dir() / "base").glob("bookworm-arm64-*.tar"))
    if not bases:
        pytest.skip("no base rootfs cached on this machine: the fetch was checked, the comparison not")
    installed = image.basecache.packages_of_tar(bases[-1])
    assert {"systemd", "openssl", "python3"} <= set(installed)
    missing = sorted(set(installed) - set(state.versions))
    assert not missing, f"packages of the cached base not in the archive: {missing}"
    from debian.debian_support import Version

    ahead = [n for n, v in installed.items() if Version(v) > Version(state.versions[n])]
    assert not ahead, f"the cached base has versions the archive does not: {ahead}"
    upgrades = archive.newer_packages(installed, state)
    print(f"{bases[-1].name}: {len(installed)} packages, {len(upgrades)} newer in the archive "
          f"({', '.join(map(str, upgrades[:5]))}); archive: {state.summary()}")
