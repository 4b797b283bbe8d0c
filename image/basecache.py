"""Whether the cached base rootfs is still good enough, and rebuilding it when not.

The base is cached by the hash of its inputs (:class:`image.rootfs.BaseSpec`), but its package *versions* come
from the archive on the day it was bootstrapped: kept forever, a rebuild months later would ship the same
versions and security updates would never arrive. So a cached base is valid for the archive state it was built
from. Before each build (:func:`ensure_base`):

- not cached → bootstrap;
- a rebuild asked for (``refresh``) → bootstrap;
- offline → reuse whatever is cached, say so, and never touch the network (nothing cached: an error);
- otherwise the archive's indexes are fetched (:mod:`image.archive`, a few seconds): unreachable → an error
  (:class:`image.archive.ArchiveUnreachable`: building offline must be asked for, so that a stale base is never
  shipped without a word); the base older than ``max_age_days`` → bootstrap; the archive has a newer version of
  any of the base's packages (except versions the layers pin, ``pkg=version``) → bootstrap; else reuse.

Every decision is one progress line. What the base holds is recorded next to its tarball (``<tar>`` →
``<name>.json``: when it was built, its packages and versions from its dpkg status, the archive releases it was
last found current with); a base cached before records existed gets one from the dpkg status inside its tarball.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ota_common.errors import UserError

from . import archive as archive_mod
from . import rootfs as rootfs_mod
from .archive import ArchiveRelease, ArchiveState

DEFAULT_MAX_AGE_DAYS = 7.0
DPKG_STATUS = "var/lib/dpkg/status"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BasePolicy:
    """How to treat a cached base: ``refresh`` always rebuilds it, ``offline`` reuses it without asking the
    archive, ``max_age_days`` rebuilds one older than that."""

    refresh: bool = False
    offline: bool = False
    max_age_days: float = DEFAULT_MAX_AGE_DAYS

    def __post_init__(self) -> None:
        if self.refresh and self.offline:
            raise UserError("a base rebuild and an offline build exclude each other: a bootstrap needs the archive")
        if self.max_age_days < 0:
            raise UserError(f"the base's maximum age must not be negative, got {self.max_age_days}")


@dataclass
class BaseRecord:
    """What a cached base holds (kept next to its tarball as JSON)."""

    built_at: int
    packages: dict[str, str]  # name → version, from the base's dpkg status
    archive: list[ArchiveRelease] = field(default_factory=list)  # last found current with these (empty: unknown)
    checked_at: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BaseRecord:
        """Raises ValueError, KeyError or TypeError for anything else."""
        doc = json.loads(text)
        packages = doc["packages"]
        if not isinstance(packages, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in packages.items()):
            raise TypeError("packages is not a map of names to versions")
        checked = doc.get("checked_at")
        return cls(int(doc["built_at"]), packages, [ArchiveRelease(**r) for r in doc.get("archive", [])],
                   None if checked is None else int(checked))


@dataclass(frozen=True)
class BaseInfo:
    """What the release manifest says about the base: when it was built, the archive releases its packages
    were current with (empty: unknown, e.g. offline with a base cached before records existed), and the
    decision line."""

    built_at: int
    archive: tuple[ArchiveRelease, ...]
    decision: str


def record_path(tar: Path) -> Path:
    return tar.with_suffix(".json")


def packages_of_tar(tar: Path) -> dict[str, str]:
    """The installed packages (name → version) from the dpkg status inside a base tarball. Raises
    :class:`UserError` when the tarball has none."""
    try:
        with tarfile.open(tar) as tf:
            for member in tf:
                if member.name.lstrip("./") == DPKG_STATUS and member.isfile():
                    f = tf.extractfile(member)
                    assert f is not None
                    return {p["name"]: p["version"] for p in rootfs_mod.dpkg_packages(f.read().decode())}
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"the cached base {tar} cannot be read ({e}); delete it to bootstrap it again") from None
    raise UserError(f"the cached base {tar} has no {DPKG_STATUS}; delete it to bootstrap it again")


def read_record(tar: Path) -> BaseRecord:
    """The record of a cached base; made from the tarball (and saved) when missing or unreadable."""
    path = record_path(tar)
    try:
        return BaseRecord.from_json(path.read_text())
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError):
        pass  # a damaged record is rebuilt from the tarball, which is the truth
    record = BaseRecord(int(tar.stat().st_mtime), packages_of_tar(tar))
    write_record(tar, record)
    return record


def write_record(tar: Path, record: BaseRecord) -> None:
    path = record_path(tar)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(record.to_json())
    os.replace(tmp, path)


def check_archive(suite: str, mirror: str, cache_dir: Path) -> ArchiveState:
    """The archive's current state for the suites a base of ``suite`` comes from (apt's lists are kept in the
    cache, so an unchanged archive costs little more than its ``InRelease`` files). Raises
    :class:`ArchiveUnreachable`, or :class:`UserError` when the machine has no apt source for the suite."""
    sources = archive_mod.archive_sources(suite, mirror)
    lists = archive_mod.fetch_indexes(sources, cache_dir / "archive-index" / suite)
    return archive_mod.read_indexes(lists)


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def _examples(upgrades: list[archive_mod.Upgrade], n: int = 3) -> str:
    shown = ", ".join(str(u) for u in upgrades[:n])
    return shown + (", …" if len(upgrades) > n else "")


def ensure_base(
    spec: rootfs_mod.BaseSpec,
    cache_dir: Path,
    policy: BasePolicy = BasePolicy(),
    *,
    progress: Progress = lambda msg: None,
    check: Callable[[], ArchiveState] | None = None,
    bootstrap: Callable[..., Path] | None = None,
    now: float | None = None,
) -> tuple[Path, BaseInfo]:
    """The base tarball to build from, bootstrapped (again) when the decision in the module docstring says so,
    and what the manifest records about it. ``check`` returns the archive's state (default:
    :func:`check_archive` for the spec's suite and mirror); ``bootstrap`` is :func:`image.rootfs.bootstrap`
    (replaceable in tests). Raises :class:`UserError` (offline without a cached base),
    :class:`ArchiveUnreachable`, or what the bootstrap raises."""
    now = time.time() if now is None else now
    target = rootfs_mod.base_path(spec, cache_dir)
    cached = target.exists()
    record = read_record(target) if cached else None
    if policy.offline:
        if record is None:
            raise UserError(f"building offline, but no base rootfs is cached for these packages ({target.name} in "
                            f"{target.parent}): build once with access to the archive")
        line = (f"cached {_day(record.built_at)}, offline: reused without checking the archive (it may lack "
                "security updates published since)")
        progress(line)
        return target, BaseInfo(record.built_at, tuple(record.archive), line)
    state = (check or (lambda: check_archive(spec.suite, spec.mirror, cache_dir)))()
    if record is None:
        line = f"not cached: bootstrapping from the archive ({state.summary()})"
    elif policy.refresh:
        line = f"cached {_day(record.built_at)}, a rebuild was asked for: rebuilding"
    elif now - record.built_at > policy.max_age_days * 86400:
        line = (f"cached {_day(record.built_at)}, older than {policy.max_age_days:g} days: rebuilding from the "
                f"archive ({state.summary()})")
    else:
        # a version the layers pin (``pkg=version``) is what was asked for, not out of date
        pinned = {p.partition("=")[0].partition(":")[0] for p in spec.packages if "=" in p}
        newer = archive_mod.newer_packages(record.packages, state)
        upgrades = [u for u in newer if u.name not in pinned]
        if not upgrades:
            held = [u.name for u in newer if u.name in pinned]
            line = (f"cached {_day(record.built_at)}, up to date with the archive ({state.summary()})"
                    f"{'; older as pinned: ' + ', '.join(held) if held else ''}: reused")
            progress(line)
            record.archive, record.checked_at = list(state.releases), int(now)
            write_record(target, record)
            return target, BaseInfo(record.built_at, state.releases, line)
        line = (f"cached {_day(record.built_at)}, the archive has {len(upgrades)} newer "
                f"package{'s' if len(upgrades) != 1 else ''} (e.g. {_examples(upgrades)}): rebuilding")
    progress(line)
    run_bootstrap = bootstrap or rootfs_mod.bootstrap
    path = run_bootstrap(spec, cache_dir, progress, **({"force": True} if cached else {}))
    built = time.time()
    record = BaseRecord(int(built), packages_of_tar(path), list(state.releases), int(built))
    write_record(path, record)
    return path, BaseInfo(record.built_at, state.releases, line)


__all__ = ["DEFAULT_MAX_AGE_DAYS", "BaseInfo", "BasePolicy", "BaseRecord", "check_archive", "ensure_base",
           "packages_of_tar", "read_record", "record_path"]
