"""A Raspberry Pi Imager repository file for a release's disk image, so that cards can be written with Imager's
own checks (the sizes and the sha256 of both the download and the extracted image).

Format: Imager's OS list (``os_list_imagingutility_v4.json``; the schema is ``doc/json-schema/os-list-schema.json``
in Imager's sources): ``{"imager": {"devices": [...]}, "os_list": [entry]}``. An OS entry needs ``name``,
``description``, ``icon``, ``url``, ``extract_size``, ``extract_sha256``, ``image_download_size``,
``release_date`` and ``devices`` (the tags of the boards it runs on, ``pi4-64bit``); ``image_download_sha256``
is checked when present. No ``init_format``: Imager then offers no OS customisation, which this image would not
apply (its per-device settings come from ``build.py provision`` or the update server).

The ``imager.devices`` list is there because a custom repository replaces Imager's whole list, devices
included: without it the "choose device" page is empty and no device-filtered entry is shown.

Imager passes an entry's ``url`` to its downloader as is: a relative file name is not resolved against the
repository file (Imager warns "the URL appears to be relative or missing a scheme"). So without a URL base
the entry points at the compressed image with an absolute ``file://`` URL — right on the machine that built it
(``rpi-imager --repo FILE``, double-click, or "Use custom file" in its content repository settings); for
anywhere else give the base URL the release directory is served from.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from ota_common.errors import UserError
from ota_common.files import sha256_file

#: the repository file next to a board's disk image (Imager opens this extension by double-click)
IMAGER_FILE = "os_list.rpi-imager-manifest"
#: the fields Imager's schema requires of an OS entry
REQUIRED = ("name", "description", "icon", "url", "extract_size", "extract_sha256", "image_download_size",
            "release_date", "devices")
#: Imager's device tags → (name, description) for the repository's device list
DEVICES = {
    "pi4-64bit": ("Raspberry Pi 4", "Raspberry Pi 4 Model B, 400, Compute Module 4 (64-bit)"),
    "pi3-64bit": ("Raspberry Pi 3", "Raspberry Pi 3 Model B, B+, A+, Compute Module 3 (64-bit)"),
}


def check_url_base(url_base: str) -> str:
    """An absolute http(s) or file URL (Imager downloads nothing else). Raises :class:`UserError`."""
    parts = urlsplit(url_base)
    if parts.scheme not in ("https", "http", "file") or (parts.scheme != "file" and not parts.netloc) \
            or parts.query or parts.fragment:
        raise UserError(f"image URL base {url_base!r}: an absolute https://, http:// or file:// URL without "
                        "query or fragment is needed (Imager does not resolve relative URLs)")
    return url_base


def image_url(compressed: Path, url_base: str | None) -> str:
    if url_base is None:
        return compressed.absolute().as_uri()
    return check_url_base(url_base).rstrip("/") + "/" + quote(compressed.name)


def os_list(*, name: str, description: str, url: str, disk_size: int, disk_sha256: str, download_size: int,
            download_sha256: str, release_date: str, devices: Sequence[str], icon: str = "") -> dict[str, Any]:
    """The repository document for one image. Raises :class:`UserError` for a device tag not in
    :data:`DEVICES`."""
    unknown = [d for d in devices if d not in DEVICES]
    if unknown or not devices:
        raise UserError(f"Raspberry Pi Imager device tags {unknown or '(none)'}: known are {', '.join(DEVICES)}")
    entry = {
        "name": name, "description": description, "icon": icon, "url": url,
        "extract_size": disk_size, "extract_sha256": disk_sha256,
        "image_download_size": download_size, "image_download_sha256": download_sha256,
        "release_date": release_date, "devices": list(devices), "architecture": "armv8",
    }
    return {
        "imager": {"devices": [{"name": DEVICES[d][0], "description": DEVICES[d][1], "tags": [d],
                                "matching_type": "exclusive", "default": i == 0} for i, d in enumerate(devices)]},
        "os_list": [entry],
    }


def write_imager_file(path: Path, *, disk: Path, compressed: Path, devices: Sequence[str], name: str,
                      description: str, release_date: int, url_base: str | None = None) -> Path:
    """The repository file for ``compressed`` (``disk.img.gz``, the gzip of ``disk``) at ``path``; ``release_date`` is the
    release's SOURCE_DATE_EPOCH (so the file is reproducible)."""
    doc = os_list(name=name, description=description, url=image_url(compressed, url_base),
                  disk_size=disk.stat().st_size, disk_sha256=sha256_file(disk),
                  download_size=compressed.stat().st_size, download_sha256=sha256_file(compressed),
                  release_date=time.strftime("%Y-%m-%d", time.gmtime(release_date)), devices=devices)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


__all__ = ["DEVICES", "IMAGER_FILE", "REQUIRED", "check_url_base", "image_url", "os_list",
           "write_imager_file"]
