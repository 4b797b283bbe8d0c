"""Release configuration (``release.yaml``) and board definitions (``image/boards/*.yaml``), validated on load
into frozen models. Errors name the file and the key path, all at once."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError

from ota_common.errors import UserError

from .layers import Model, format_validation_errors, load_yaml_mapping

BOARDS_DIR = Path(__file__).resolve().parent / "boards"
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def _token(v: str) -> str:
    if not _TOKEN.match(v):
        raise ValueError(f"must be letters, digits, '.', '_', '+' or '-', got {v!r}")
    return v


Token = Annotated[str, AfterValidator(_token)]


class BoardModel(Model):
    """What differs between boards: the boot partition, the console and the device type."""

    description: str = ""
    device_type: Token
    console: str
    #: Debian packages (arm64) whose files go on the boot partition, not into the rootfs
    firmware_packages: tuple[str, ...] = ()
    #: ``{"dest on boot partition": "path inside the extracted firmware packages"}``; globs allowed in src
    boot_files: dict[str, str] = Field(default_factory=dict)
    #: files from the built rootfs copied to the boot partition root (globs, e.g. the firmware's DTBs)
    rootfs_boot_globs: tuple[str, ...] = ()
    #: file contents written on the boot partition (e.g. config.txt)
    boot_text: dict[str, str] = Field(default_factory=dict)
    #: U-Boot device tree handling: "control" uses ${fdtcontroladdr} (QEMU), "slot" loads dtb_path from the slot
    fdt: str = "control"
    dtb_path: str = ""
    #: power-of-two disk size for QEMU's SD emulation
    sd_power_of_two: bool = False
    #: Raspberry Pi Imager's device tags (``pi4-64bit``): an Imager repository file for ``disk.img.gz`` is
    #: written next to the board's disk image (:mod:`image.imager`)
    imager_devices: tuple[Token, ...] = ()


class ReleaseModel(Model):
    name: Token = "vv-video-ai"
    version: Token = "1.0.0"
    suite: Token = "bookworm"
    mirror: str = ""
    layers: tuple[Token, ...] = ("base", "boot", "ota", "app")
    boards: tuple[Token, ...] = ("qemu-virt", "rpi4")
    slot_size_mib: int = Field(default=1024, ge=64, le=65536)
    boot_size_mib: int = Field(default=256, ge=64, le=4096)
    data_size_mib: int = Field(default=128, ge=16, le=65536)
    compression: str = Field(default="gzip", pattern="^(gzip|lzma|none|zstd)$")
    server_url: str = ""
    #: the image's security version (``rootfs-image.security_version``): devices refuse releases below their own
    security_version: int = Field(default=0, ge=0, le=999_999_999, strict=True)
    #: PEM certificates the server's TLS certificate must chain to (relative to this file); empty: the device
    #: uses the system's trust store
    server_ca: str = ""
    #: allow a plain http:// server_url (a lab only: anyone on the network path reads and changes the traffic)
    insecure_http: bool = Field(default=False, strict=True)
    #: public keys the devices trust besides the signing key (relative to this file)
    trusted_keys: tuple[str, ...] = ()
    #: public keys the devices must never trust again (relative to this file): written to /etc/ota/keys.revoked
    revoked_keys: tuple[str, ...] = ()
    variables: dict[str, str] = Field(default_factory=dict)


def load_release(path: Path) -> ReleaseModel:
    """Raises :class:`UserError` naming the file and every bad key."""
    try:
        return ReleaseModel.model_validate(load_yaml_mapping(path, "release configuration"))
    except ValidationError as e:
        raise UserError(format_validation_errors(path, e)) from None


def with_overrides(release: ReleaseModel, overrides: Mapping[str, Any], source: str = "options") -> ReleaseModel:
    """``release`` with some keys replaced (command-line options), validated like the file.

    Raises :class:`UserError` naming ``source`` and the bad keys."""
    if not overrides:
        return release
    try:
        return ReleaseModel.model_validate({**release.model_dump(), **overrides})
    except ValidationError as e:
        raise UserError(format_validation_errors(Path(source), e)) from None


def load_board(name: str, boards_dir: Path = BOARDS_DIR) -> BoardModel:
    path = boards_dir / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in boards_dir.glob("*.yaml")))
        raise UserError(f"unknown board {name!r} (known: {known})")
    try:
        return BoardModel.model_validate(load_yaml_mapping(path, "board definition"))
    except ValidationError as e:
        raise UserError(format_validation_errors(path, e)) from None
