"""The Raspberry Pi Imager repository file written next to a Pi release's disk image (image/imager.py).

The document is checked against what Imager requires (its schema, ``doc/json-schema/os-list-schema.json`` in
Imager's sources: an OS entry needs name, description, icon, url, extract_size, extract_sha256,
image_download_size, release_date and devices; device entries need name, description and tags) and against the
files it describes: the gzip file's size and sha256, and the size and sha256 of what it decompresses to. Then a
small release (the stand-in base of tests/test_release_steps.py) for a board that Imager knows.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import image.release
from artifacts.keys import load_signer
from image.config import load_board
from image.imager import IMAGER_FILE, write_imager_file
from image.manifest import ReleaseManifest
from image.release import build_release
from ota_common.errors import UserError
from ota_common.files import sha256_file
from tests.test_release_steps import small_release  # noqa: F401  (the fixture)

SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
#: what Imager requires of a repository file with one image (its schema's "required" lists, its field types)
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["os_list"],
    "properties": {
        "imager": {"type": "object", "properties": {"devices": {"type": "array", "items": {
            "type": "object", "required": ["name", "description", "tags"],
            "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                           "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                           "default": {"type": "boolean"}}}}}},
        "os_list": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["name", "description", "icon", "url", "extract_size", "extract_sha256",
                         "image_download_size", "release_date", "devices"],
            "properties": {
                "name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
                "icon": {"type": "string"}, "url": {"type": "string", "pattern": "^(https?|file)://"},
                "extract_size": {"type": "integer", "minimum": 1}, "extract_sha256": SHA256,
                "image_download_size": {"type": "integer", "minimum": 1}, "image_download_sha256": SHA256,
                "release_date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
                "devices": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            },
            "not": {"required": ["init_format"]},  # no OS customisation: the image would not apply it
        }},
    },
}


def check_imager_file(listing: Path, disk: Path) -> dict[str, Any]:
    doc = json.loads(listing.read_text())
    jsonschema.validate(doc, SCHEMA)
    (entry,) = doc["os_list"]
    assert {t for d in doc["imager"]["devices"] for t in d["tags"]} >= set(entry["devices"])
    compressed = listing.parent / entry["url"].rsplit("/", 1)[1]
    assert compressed.stat().st_size == entry["image_download_size"]
    assert sha256_file(compressed) == entry["image_download_sha256"]
    extracted, size = hashlib.sha256(), 0
    with gzip.open(compressed) as f:  # streamed: a real image extracts to gigabytes
        while chunk := f.read(4 << 20):
            extracted.update(chunk)
            size += len(chunk)
    assert size == entry["extract_size"] == disk.stat().st_size
    assert extracted.hexdigest() == entry["extract_sha256"] == sha256_file(disk)
    return doc


def gz(disk: Path) -> Path:
    """``disk.img.gz`` beside ``disk`` (what the release writes)."""
    out = disk.with_name(disk.name + ".gz")
    with open(disk, "rb") as src, gzip.open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def _disk(tmp_path: Path) -> Path:
    disk = tmp_path / "rpi4" / "disk.img"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(os.urandom(300_000) + bytes(3 << 20) + b"end")
    return disk


def test_the_imager_file_describes_the_compressed_image_and_what_it_extracts_to(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    packed = gz(disk)
    listing = write_imager_file(disk.parent / IMAGER_FILE, disk=disk, compressed=packed,
                                devices=load_board("rpi4").imager_devices, name="vv 1.0.0 (rpi4)",
                                description="d", release_date=1_796_000_000)
    doc = check_imager_file(listing, disk)
    entry = doc["os_list"][0]
    # no URL base: Imager does not resolve a relative URL, so the local file as an absolute file:// URL
    assert entry["url"] == packed.absolute().as_uri()
    assert entry["release_date"] == "2026-11-30" and entry["devices"] == ["pi4-64bit", "pi3-64bit"]
    assert [(d["name"], d["tags"], d["default"]) for d in doc["imager"]["devices"]] == [
        ("Raspberry Pi 4", ["pi4-64bit"], True), ("Raspberry Pi 3", ["pi3-64bit"], False)]


def test_an_image_url_base_is_where_the_entry_points(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    packed = gz(disk)
    listing = write_imager_file(tmp_path / "list.json", disk=disk, compressed=packed, devices=["pi4-64bit"], name="n",
                                description="d", release_date=0, url_base="https://dl.example/vv/1.0.0/rpi4/")
    assert json.loads(listing.read_text())["os_list"][0]["url"] == "https://dl.example/vv/1.0.0/rpi4/disk.img.gz"
    for bad in ("dl.example/vv", "ftp://dl.example/", "https:///x", "https://dl.example/x?sig=1", "../out"):
        with pytest.raises(UserError, match="absolute https://"):
            write_imager_file(tmp_path / "x.json", disk=disk, compressed=packed, devices=["pi4-64bit"], name="n",
                              description="d", release_date=0, url_base=bad)
    with pytest.raises(UserError, match="device tags"):
        write_imager_file(tmp_path / "x.json", disk=disk, compressed=packed, devices=["pi9-64bit"], name="n",
                          description="d", release_date=0)


def test_a_release_for_a_board_imager_knows_has_the_imager_file(
        small_release: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The small release's qemu-virt board, given Imager device tags (the rpi4 board's firmware would need a
    download): the Imager file next to disk.img (for disk.img.gz), both listed in the manifest; a board without
    tags gets neither; a bad URL base fails before anything is built."""
    real = image.release.load_board

    def tagged(name: str) -> Any:
        return real(name).model_copy(update={"imager_devices": ("pi4-64bit",)})

    with pytest.raises(UserError, match="image URL base"):
        build_release(config=small_release, signer=load_signer(keys["ec"][0]), out=tmp_path / "out",
                      cache_dir=tmp_path / "cache", epoch=1_700_000_000, image_url_base="out/")
    assert not (tmp_path / "out").exists()
    plain = build_release(config=small_release, signer=load_signer(keys["ec"][0]), out=tmp_path / "plain",
                          cache_dir=tmp_path / "cache", epoch=1_700_000_000)
    assert not any(n.endswith(IMAGER_FILE) for n in plain.outputs)
    monkeypatch.setattr(image.release, "load_board", tagged)
    result = build_release(config=small_release, signer=load_signer(keys["ec"][0]), out=tmp_path / "out",
                           cache_dir=tmp_path / "cache", epoch=1_700_000_000,
                           image_url_base="https://dl.example/small/1.0.0/qemu-virt")
    board_dir = result.out_dir / "qemu-virt"
    doc = check_imager_file(board_dir / IMAGER_FILE, board_dir / "disk.img")
    assert doc["os_list"][0]["url"] == "https://dl.example/small/1.0.0/qemu-virt/disk.img.gz"
    assert doc["os_list"][0]["release_date"] == "2023-11-14"  # the release's SOURCE_DATE_EPOCH
    manifest = ReleaseManifest.from_json((result.out_dir / "manifest.json").read_text())
    assert {"qemu-virt/disk.img.gz", f"qemu-virt/{IMAGER_FILE}"} <= set(manifest.outputs)
    assert manifest.outputs["qemu-virt/disk.img.gz"].sha256 == doc["os_list"][0]["image_download_sha256"]
    assert "qemu-virt: Raspberry Pi Imager file" in manifest.timings
