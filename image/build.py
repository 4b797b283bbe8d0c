"""Turning a finished rootfs tree into per-board outputs: the slot filesystem, the boot partition and the A/B
disk image. Each step is a small function; :mod:`image.release` strings them together."""

from __future__ import annotations

import glob
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from device_hooks import boottune
from device_hooks.bootenv import ENV_SIZE, INITIAL_STATE, encode
from ota_common.errors import UserError
from ota_common.tools import run

from .config import BoardModel, ReleaseModel
from .disk import DiskLayout, assemble, bmap, make_ext4, make_vfat
from .epoch import tool_env
from .trust import KEYS_DIR, REVOKED_KEYS, SERVER_CA

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BOOT_CMD = REPO / "device_hooks" / "boot.cmd.j2"


def disk_context(layout: DiskLayout) -> dict[str, str]:
    return {
        "id": f"{layout.disk_id:08x}",
        "partuuid_boot": layout.partuuid(1),
        "partuuid_a": layout.partuuid(2),
        "partuuid_b": layout.partuuid(3),
        "partuuid_data": layout.partuuid(4),
    }


def tune_context() -> dict[str, Any]:
    """What boot.cmd.j2 needs of the local boot tuning: the variable names and the characters each accepts."""
    return {"names": boottune.NAMES, "chars": boottune.BOOT_SCR_CHARS, "bootargs": boottune.BOOTARGS,
            "console": boottune.CONSOLE, "fdt_disable": boottune.FDT_DISABLE, "fdt_delprop": boottune.FDT_DELPROP}


def render_boot_script(work: Path, board_name: str, board: BoardModel, layout: DiskLayout, *,
                       signed: bool = True, epoch: int | None = None) -> Path:
    """boot.cmd from its template, compiled to boot.scr with mkimage (which stamps the build's ``epoch`` into its
    header). An unsigned image's script says so at every boot. Raises :class:`ToolError` when mkimage fails."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    text = env.from_string(BOOT_CMD.read_text()).render(
        board={"name": board_name, **board.model_dump()}, disk=disk_context(layout), env={"size": hex(ENV_SIZE)},
        signed=signed, tune=tune_context(),
    )
    cmd = work / "boot.cmd"
    cmd.write_text(text)
    scr = work / "boot.scr"
    run(["mkimage", "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none", "-n", "ota boot script",
         "-d", cmd, scr], stage="boot script", env=tool_env(epoch))
    return scr


def _host_debian_source(suite: str) -> tuple[str, str]:
    """The machine's Debian archive URI (and keyring) for ``suite``, from its apt sources."""
    candidates: list[tuple[str, str]] = []
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in f.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    k, _, v = line.partition(":")
                    fields[k.strip()] = v.strip()
            if suite in fields.get("Suites", "").split() and fields.get("URIs"):
                candidates.append((fields["URIs"].split()[0], fields.get("Signed-By", "")))
    sl = Path("/etc/apt/sources.list")
    if sl.exists():
        for line in sl.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and suite in parts:
                uri = next(p for p in parts[1:] if not p.startswith("["))
                candidates.append((uri, ""))
    if not candidates:
        raise UserError(f"no apt source for {suite} on this machine; set 'mirror' in release.yaml")
    return candidates[0]


def _apt_download(packages: list[str], dest: Path, cache_dir: Path, mirror: str, suite: str) -> None:
    """Download arm64 .debs with a private apt instance on the host (native speed, host untouched): the
    machine's apt sources, or ``mirror`` when the release sets one."""
    apt = cache_dir / "apt-arm64"
    for d in ("state/lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "state" / "status").touch()
    opts = ["-o", f"Dir::State={apt / 'state'}", "-o", f"Dir::State::status={apt / 'state' / 'status'}",
            "-o", f"Dir::Cache={apt / 'cache'}", "-o", "APT::Architecture=arm64", "-o", "APT::Architectures=arm64",
            "-o", f"Dir::Etc::Preferences={apt / 'etc' / 'preferences'}", "-o", f"Dir::Etc::PreferencesParts={apt / 'etc' / 'preferences.d'}",
            "-o", "Debug::NoLocking=1"]
    uri, signed_by = (mirror, "") if mirror else _host_debian_source(suite)
    # firmware lives in non-free-firmware, which the machine's sources may not list
    stanza = f"Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: main non-free-firmware\n"
    if signed_by:
        stanza += f"Signed-By: {signed_by}\n"
    (apt / "etc" / "sources.list.d" / "debian.sources").write_text(stanza)
    (apt / "etc" / "sources.list").write_text("")
    opts += ["-o", f"Dir::Etc::SourceList={apt / 'etc' / 'sources.list'}",
             "-o", f"Dir::Etc::SourceParts={apt / 'etc' / 'sources.list.d'}"]
    run(["apt-get", *opts, "-qq", "update"], stage="firmware packages (apt update)", timeout=900)
    run(["apt-get", *opts, "-qq", "download", *packages], stage="firmware packages (download)", cwd=dest, timeout=900)


def firmware_files(board: BoardModel, work: Path, cache_dir: Path, *, root: Path | None = None, mirror: str = "",
                   suite: str = "bookworm", offline: bool = False) -> dict[str, Path]:
    """Files for the boot partition taken from arm64 firmware packages, unpacked on the host so they stay
    out of the rootfs; plus the board's literal files (config.txt). ``offline``: packages not in the cache are
    an error instead of a download."""
    out: dict[str, Path] = {}
    if board.firmware_packages:
        pkgdir = cache_dir / "firmware"
        pkgdir.mkdir(parents=True, exist_ok=True)
        missing = [p for p in board.firmware_packages if not sorted(pkgdir.glob(f"{p}_*_arm64.deb"))
                   and not sorted(pkgdir.glob(f"{p}_*_all.deb"))]
        if missing and offline:
            raise UserError(f"building offline, but the firmware packages {', '.join(missing)} are not in the "
                            f"build cache ({pkgdir}): build once with access to the archive")
        if missing:
            _apt_download(missing, pkgdir, cache_dir, mirror, suite)
        unpacked = work / "firmware"
        if unpacked.exists():
            shutil.rmtree(unpacked)
        unpacked.mkdir(parents=True)
        for pkg in board.firmware_packages:
            debs = sorted(pkgdir.glob(f"{pkg}_*.deb"))
            if not debs:
                raise UserError(f"firmware package {pkg} could not be downloaded")
            run(["dpkg-deb", "-x", debs[-1], unpacked], stage=f"unpack {pkg}")
        for dest, src in board.boot_files.items():
            matches = sorted(glob.glob(str(unpacked / src)))
            if not matches:
                raise UserError(f"board file {src} not found in {', '.join(board.firmware_packages)}")
            out[dest] = Path(matches[0])
    for pattern in board.rootfs_boot_globs:
        if root is None:
            raise UserError("this board copies files from the rootfs; build the rootfs first")
        found = sorted(root.glob(pattern))
        if not found:
            raise UserError(f"board file pattern {pattern} matches nothing in the rootfs")
        for path in found:
            out[path.name] = path
    for dest, text in board.boot_text.items():
        p = work / "boot-text" / dest
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        out[dest] = p
    return out


@dataclass(frozen=True)
class BoardImage:
    board: str
    rootfs: Path
    disk: Path
    bmap: Path


def build_disk(
    *,
    board_name: str,
    board: BoardModel,
    layout: DiskLayout,
    rootfs_image: Path,
    boot_files: dict[str, Path],
    out_dir: Path,
    seed: str,
    signed: bool,
    data_files: dict[str, bytes] | None = None,
    epoch: int | None = None,
) -> BoardImage:
    """boot FAT + slot A (the rootfs) + empty slot B + empty data → disk.img and its bmap.

    ``signed``: whether the image trusts a release key (an unsigned one's boot script warns at every boot).
    ``data_files`` (relative path → content) are placed on the data partition besides ``ota/device_type``.
    ``epoch``: the build's SOURCE_DATE_EPOCH (default: ``$SOURCE_DATE_EPOCH`` if set)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="disk-", dir=out_dir) as tmp:
        work = Path(tmp)
        files = dict(boot_files)
        files["boot.scr"] = render_boot_script(work, board_name, board, layout, signed=signed, epoch=epoch)
        # two valid initial copies of the boot state (libubootenv refuses to write when both are invalid)
        initial = work / "uboot.env"
        initial.write_bytes(encode(INITIAL_STATE, 1))
        files["ota/uboot.env.a"] = initial
        files["ota/uboot.env.b"] = initial
        boot_img = work / "boot.vfat"
        make_vfat(boot_img, files, size_mib=layout.by_name("boot").size_mib, label="boot", seed=f"{seed}:boot",
                  epoch=epoch)
        data_tree = work / "data"
        (data_tree / "ota").mkdir(parents=True)
        (data_tree / "ota" / "device_type").write_text(f"device_type={board.device_type}\n")
        (data_tree / "log" / "journal").mkdir(parents=True)  # the persistent journal, shared by both slots
        for rel, content in (data_files or {}).items():
            dest = data_tree / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content)
        data_img = work / "data.ext4"
        make_ext4(data_img, data_tree, size_mib=layout.by_name("data").size_mib, label="data", seed=f"{seed}:data",
                  epoch=epoch)
        disk = out_dir / "disk.img"
        assemble(disk, layout, {"boot": boot_img, "rootfs-a": rootfs_image, "data": data_img})
    return BoardImage(board_name, rootfs_image, disk, bmap(disk))


def template_context(release: ReleaseModel, layout: DiskLayout, variables: dict[str, str], *, signed: bool,
                     config_variables: Sequence[str] = (), server_ca: bool = False,
                     required_config: Sequence[str] = (), config_placeholders: Mapping[str, str] | None = None
                     ) -> dict[str, Any]:
    """What layer templates see. Nothing board-specific: one rootfs serves every board (the device type is
    written to the data partition instead).

    ``ota`` holds the agent's trust settings (rendered into ota.conf): the security version, whether the image is
    unsigned, the configuration variables the server may set, those the health verdict requires with their
    placeholders, the server CA file (when ``server_ca``), whether plain http is allowed, and where the keys and
    the revocation list are."""
    return {
        **variables,
        "release": {"name": release.name, "version": release.version,
                    "artifact_name": f"{release.name}-{release.version}",
                    "security_version": release.security_version},
        "disk": disk_context(layout),
        "server_url": release.server_url,
        "ota": {
            "security_version": release.security_version,
            "unsigned": not signed,
            "config_variables": tuple(config_variables),
            # the health verdict's required configuration and each one's placeholder (NAME=value)
            "required_config": tuple(required_config),
            "config_placeholders": tuple(f"{k}={v}" for k, v in (config_placeholders or {}).items()),
            "ca_file": SERVER_CA if server_ca else "",
            "insecure_http": release.insecure_http,
            "trusted_keys": KEYS_DIR,
            "revoked_keys": REVOKED_KEYS,
        },
    }
