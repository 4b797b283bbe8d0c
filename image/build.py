"""Turning a finished rootfs tree into per-board outputs: the slot filesystem, the boot partition and the A/B
disk image. Each step is a small function; :mod:`image.release` strings them together."""

from __future__ import annotations

import glob
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ota_common.errors import UserError
from ota_common.tools import run

from .config import BoardModel
from .disk import DiskLayout, assemble, bmap, make_ext4, make_vfat

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


def render_boot_script(work: Path, board_name: str, board: BoardModel, layout: DiskLayout) -> Path:
    """boot.cmd from its template, compiled to boot.scr with mkimage."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    text = env.from_string(BOOT_CMD.read_text()).render(
        board={"name": board_name, **board.model_dump()}, disk=disk_context(layout)
    )
    cmd = work / "boot.cmd"
    cmd.write_text(text)
    scr = work / "boot.scr"
    run(["mkimage", "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none", "-n", "ota boot script",
         "-d", cmd, scr], stage="boot script")
    return scr


def firmware_files(board: BoardModel, base_root: Path, work: Path, cache_dir: Path) -> dict[str, Path]:
    """Files for the boot partition taken from arm64 firmware packages (downloaded with the rootfs's apt
    configuration and unpacked on the host, so they stay out of the rootfs)."""
    if not board.firmware_packages:
        return {}
    pkgdir = cache_dir / "firmware"
    pkgdir.mkdir(parents=True, exist_ok=True)
    unpacked = work / "firmware"
    unpacked.mkdir(exist_ok=True)
    for pkg in board.firmware_packages:
        debs = sorted(pkgdir.glob(f"{pkg}_*.deb"))
        if not debs:
            run(["chroot", base_root, "sh", "-c", f"cd /tmp && apt-get update -qq && apt-get download -qq {pkg}"],
                stage=f"download {pkg}")
            for deb in (base_root / "tmp").glob(f"{pkg}_*.deb"):
                shutil.move(deb, pkgdir / deb.name)
            debs = sorted(pkgdir.glob(f"{pkg}_*.deb"))
        if not debs:
            raise UserError(f"firmware package {pkg} could not be downloaded")
        run(["dpkg-deb", "-x", debs[-1], unpacked], stage=f"unpack {pkg}")
    out: dict[str, Path] = {}
    for dest, src in board.boot_files.items():
        matches = sorted(glob.glob(str(unpacked / src)))
        if not matches:
            raise UserError(f"board file {src} not found in {', '.join(board.firmware_packages)}")
        out[dest] = Path(matches[0])
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
) -> BoardImage:
    """boot FAT + slot A (the rootfs) + empty slot B + empty data → disk.img and its bmap."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="disk-", dir=out_dir) as tmp:
        work = Path(tmp)
        files = dict(boot_files)
        files["boot.scr"] = render_boot_script(work, board_name, board, layout)
        boot_img = work / "boot.vfat"
        make_vfat(boot_img, files, size_mib=layout.by_name("boot").size_mib, label="boot", seed=f"{seed}:boot")
        data_tree = work / "data"
        (data_tree / "ota").mkdir(parents=True)
        (data_tree / "ota" / "device_type").write_text(f"device_type={board.device_type}\n")
        data_img = work / "data.ext4"
        make_ext4(data_img, data_tree, size_mib=layout.by_name("data").size_mib, label="data", seed=f"{seed}:data")
        disk = out_dir / "disk.img"
        assemble(disk, layout, {"boot": boot_img, "rootfs-a": rootfs_image, "data": data_img})
    return BoardImage(board_name, rootfs_image, disk, bmap(disk))


def template_context(release: Any, layout: DiskLayout, variables: dict[str, str]) -> dict[str, Any]:
    """What layer templates see. Nothing board-specific: one rootfs serves every board (the device type is
    written to the data partition instead)."""
    return {
        **variables,
        "release": {"name": release.name, "version": release.version,
                    "artifact_name": f"{release.name}-{release.version}"},
        "disk": disk_context(layout),
        "server_url": release.server_url,
    }
