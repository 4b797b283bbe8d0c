"""Interoperability with the real mender-artifact 3.9 binary, both ways. Nothing here is mocked."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from artifacts import ArtifactReader, Compression, load_signer, load_verifier, read_artifact, sign_artifact
from artifacts.writer import module_image_spec, rootfs_image_spec, write_artifact
from ota_common.errors import BadSignature

from .conftest import make_payload


def mender(bin_: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([bin_, *map(str, args)], capture_output=True, text=True)


def _script(tmp_path: Path, name: str = "ArtifactInstall_Enter_01_hello") -> Path:
    s = tmp_path / name
    s.write_text("#!/bin/sh\necho hello\n")
    return s


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.LZMA, Compression.NONE])
@pytest.mark.parametrize("key", ["ec", "rsa"])
def test_mender_artifact_validates_and_reads_ours(tmp_path: Path, payload: Path, keys, mender_artifact: str, compression: Compression, key: str) -> None:  # type: ignore[no-untyped-def]
    private, public = keys[key]
    out = tmp_path / "ours.mender"
    spec = rootfs_image_spec(
        file=payload, name="release-1.2", device_types=["raspberrypi4", "qemu-virt"], provides=["app.version:7"],
        depends=["bootloader:2023"], depends_artifacts=["release-1.1"], scripts=[_script(tmp_path)],
    )
    write_artifact(spec, out, compression=compression, signer=load_signer(private))

    v = mender(mender_artifact, "validate", "-k", public, out)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "validated successfully" in v.stdout + v.stderr

    r = mender(mender_artifact, "read", out)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    assert "Name: release-1.2" in text
    assert "Compatible devices: '[raspberrypi4 qemu-virt]'" in text
    assert "Depends on one of artifact(s): [release-1.1]" in text
    assert "ArtifactInstall_Enter_01_hello" in text
    assert "Type:   rootfs-image" in text
    assert f"rootfs-image.checksum: {digest}" in text
    assert "app.version: 7" in text and "bootloader: 2023" in text
    assert f"name:     {payload.name}" in text and f"size:     {payload.stat().st_size}" in text
    assert f"checksum: {digest}" in text

    wrong = mender(mender_artifact, "validate", "-k", keys["ec2"][1], out)
    assert wrong.returncode != 0


def test_mender_artifact_reads_our_module_image(tmp_path: Path, keys, mender_artifact: str) -> None:  # type: ignore[no-untyped-def]
    files = [make_payload(tmp_path / "app.tar", 50_000, seed=2), make_payload(tmp_path / "app.env", 300, seed=3)]
    out = tmp_path / "module.mender"
    spec = module_image_spec(module_type="vv-app", files=files, name="app-2.0", device_types=["qemu-virt"],
                             meta_data={"restart": ["vv-video-ai.service"]})
    write_artifact(spec, out, signer=load_signer(keys["rsa"][0]))
    v = mender(mender_artifact, "validate", "-k", keys["rsa"][1], out)
    assert v.returncode == 0, v.stdout + v.stderr
    text = mender(mender_artifact, "read", out).stdout
    assert "Type:   vv-app" in text
    assert "rootfs-image.vv-app.version: app-2.0" in text
    assert "app.tar" in text and "app.env" in text
    assert "restart" in text


def _write_with_mender(bin_: str, tmp_path: Path, *args: str | Path) -> Path:
    out = tmp_path / "theirs.mender"
    p = mender(bin_, "write", *args, "-o", out)
    assert p.returncode == 0, p.stdout + p.stderr
    return out


def _payload_bytes(path: Path, verifiers) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    got: dict[str, bytes] = {}
    with ArtifactReader.open(path, verifiers=verifiers) as r:
        for f in r.files():
            got[f.name] = b"".join(f.chunks())
    return got


@pytest.mark.parametrize("compression", ["gzip", "lzma", "none"])
@pytest.mark.parametrize("key", ["ec", "rsa"])
def test_we_verify_rootfs_images_written_by_mender_artifact(tmp_path: Path, payload: Path, keys, mender_artifact: str, compression: str, key: str) -> None:  # type: ignore[no-untyped-def]
    private, public = keys[key]
    script = _script(tmp_path, "ArtifactCommit_Leave_50_report")
    art = _write_with_mender(
        mender_artifact, tmp_path, "rootfs-image", "-f", payload, "-n", "mender-1", "-t", "raspberrypi4",
        "-t", "qemu-virt", "-k", private, "--compression", compression, "-s", script, "-N", "mender-0",
    )
    info = read_artifact(art, [load_verifier(public)])
    assert info.signature.value == "verified"
    assert info.header.info.artifact_name == "mender-1"
    assert info.header.info.device_types == ("raspberrypi4", "qemu-virt")
    assert info.header.info.depends_artifact_names == ("mender-0",)
    assert info.header.compression.value == compression
    assert list(info.header.scripts) == ["ArtifactCommit_Leave_50_report"]
    assert info.header.scripts["ArtifactCommit_Leave_50_report"] == script.read_bytes()
    assert info.header.type_infos[0].type == "rootfs-image"  # mender-artifact 3.9 writes "" there
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    assert info.header.type_infos[0].provides["rootfs-image.checksum"] == digest
    assert [(f.name, f.size, f.sha256) for f in info.files] == [(payload.name, payload.stat().st_size, digest)]
    assert _payload_bytes(art, [load_verifier(public)]) == {payload.name: payload.read_bytes()}

    with pytest.raises(BadSignature):
        read_artifact(art, [load_verifier(keys["ec2"][1])])


def test_we_verify_module_image_written_by_mender_artifact(tmp_path: Path, keys, mender_artifact: str) -> None:  # type: ignore[no-untyped-def]
    f1 = make_payload(tmp_path / "one.bin", 20_000, seed=5)
    f2 = make_payload(tmp_path / "two.txt", 10, seed=6)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"service": "vv"}))
    art = _write_with_mender(
        mender_artifact, tmp_path, "module-image", "-T", "vv-app", "-f", f1, "-f", f2, "-n", "mod-1", "-t", "qemu-virt",
        "-k", keys["ec"][0], "-m", meta, "-g", "canary", "-G", "stable", "--software-version", "2.0",
    )
    info = read_artifact(art, [load_verifier(keys["ec"][1])])
    assert info.header.info.payload_types == ("vv-app",)
    assert info.header.info.artifact_group == "canary"
    assert info.header.info.depends_groups == ("stable",)
    assert info.header.meta_data[0] == {"service": "vv"}
    assert info.header.type_infos[0].provides == {"rootfs-image.vv-app.version": "2.0"}
    assert _payload_bytes(art, [load_verifier(keys["ec"][1])]) == {"one.bin": f1.read_bytes(), "two.txt": f2.read_bytes()}


@pytest.mark.parametrize("key", ["ec", "rsa"])
def test_artifacts_signed_later_by_mender_artifact_sign(tmp_path: Path, payload: Path, keys, mender_artifact: str, key: str) -> None:  # type: ignore[no-untyped-def]
    art = _write_with_mender(mender_artifact, tmp_path, "rootfs-image", "-f", payload, "-n", "late", "-t", "qemu-virt")
    assert read_artifact(art).signature.value == "unsigned"
    signed = tmp_path / "signed.mender"
    p = mender(mender_artifact, "sign", "-k", keys[key][0], "-o", signed, art)
    assert p.returncode == 0, p.stderr
    assert read_artifact(signed, [load_verifier(keys[key][1])]).signature.value == "verified"


def test_our_sign_of_their_unsigned_artifact_validates_with_mender_artifact(tmp_path: Path, payload: Path, keys, mender_artifact: str) -> None:  # type: ignore[no-untyped-def]
    art = _write_with_mender(mender_artifact, tmp_path, "rootfs-image", "-f", payload, "-n", "late", "-t", "qemu-virt")
    signed = tmp_path / "signed-by-us.mender"
    sign_artifact(art, signed, load_signer(keys["rsa"][0]))
    v = mender(mender_artifact, "validate", "-k", keys["rsa"][1], signed)
    assert v.returncode == 0, v.stdout + v.stderr
    # re-signing with another key replaces the signature
    resigned = tmp_path / "resigned.mender"
    sign_artifact(signed, resigned, load_signer(keys["ec"][0]))
    assert mender(mender_artifact, "validate", "-k", keys["ec"][1], resigned).returncode == 0
    assert mender(mender_artifact, "validate", "-k", keys["rsa"][1], resigned).returncode != 0


def test_mender_artifact_refuses_zstd_but_we_read_it(tmp_path: Path, payload: Path, keys, mender_artifact: str) -> None:  # type: ignore[no-untyped-def]
    """zstd is our extension beyond 3.9 (3.10+ reads it): 3.9 must refuse it clearly, we must read it."""
    out = tmp_path / "z.mender"
    write_artifact(rootfs_image_spec(file=payload, name="z", device_types=["q"]), out, compression=Compression.ZSTD,
                   signer=load_signer(keys["ec"][0]))
    assert mender(mender_artifact, "validate", "-k", keys["ec"][1], out).returncode != 0
    assert read_artifact(out, [load_verifier(keys["ec"][1])]).files[0].size == payload.stat().st_size
