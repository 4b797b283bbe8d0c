"""The real thing: `build.py release` with mmdebstrap under qemu-user, then boots under qemu-system-aarch64.

The base rootfs is cached in the build cache (XDG), so only the first run on a machine pays the bootstrap
(about 7 minutes here); each build below then takes well under a minute or two.
"""

from __future__ import annotations

import filecmp
import gzip
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from artifacts import load_verifier, read_artifact
from devkit.qemu import Vm
from image.disk import partitions_of
from image.imager import IMAGER_FILE
from image.release import sha256_file

from .conftest import REPO, build_release
from .test_imager import check_imager_file

_release = build_release

pytestmark = pytest.mark.slow
EPOCH = "1700000000"


def test_release_outputs_and_manifest(release_dir: Path, keys, mender_artifact: str) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads((release_dir / "manifest.json").read_text())
    assert manifest["version"] == "1.0.0" and set(manifest["boards"]) == {"qemu-virt", "rpi4"}
    for board in ("qemu-virt", "rpi4"):
        for name in ("disk.img", "disk.img.bmap", "disk.img.gz"):
            entry = manifest["outputs"][f"{board}/{name}"]
            path = release_dir / board / name
            assert entry["size"] == path.stat().st_size
        art = release_dir / f"vv-video-ai-1.0.0-{board}.mender"
        assert manifest["outputs"][art.name]["sha256"] == sha256_file(art)
        info = read_artifact(art, [load_verifier(keys["ec"][1])])
        assert info.header.info.device_types == (manifest["boards"][board]["device_type"],)
        assert info.files[0].sha256 == manifest["outputs"]["rootfs.ext4"]["sha256"]
        v = subprocess.run([mender_artifact, "validate", "-k", str(keys["ec"][1]), str(art)], capture_output=True, text=True)
        assert v.returncode == 0, v.stderr
    names = {p["name"]: p["version"] for p in manifest["packages"]}
    assert "linux-image-arm64" in names and "systemd" in names and names["python3"]
    assert set(manifest["layers"]) == {"base", "boot", "ota", "app"}
    parts = partitions_of(release_dir / "qemu-virt" / "disk.img")
    assert [p["type"] for p in parts] == ["c", "83", "83", "83"]
    with gzip.open(release_dir / "rpi4" / "disk.img.gz") as g, open(release_dir / "rpi4" / "disk.img", "rb") as d:
        assert g.read(1 << 20) == d.read(1 << 20)
    # the Raspberry Pi Imager file: for rpi4 only, checked against the files it describes (tests/test_imager.py)
    check_imager_file(release_dir / "rpi4" / IMAGER_FILE, release_dir / "rpi4" / "disk.img")
    assert f"rpi4/{IMAGER_FILE}" in manifest["outputs"] and not (release_dir / "qemu-virt" / IMAGER_FILE).exists()
    # the base it was made from, and the archive's state its packages were current with
    assert manifest["base"]["decision"] and manifest["base"]["built_at"] > 1_600_000_000
    assert {"bookworm", "bookworm-security"} <= {a["codename"] for a in manifest["base"]["archive"]}


def _manifest_of(art: Path) -> bytes:
    with tarfile.open(art) as tf:
        return tf.extractfile("manifest").read()  # type: ignore[union-attr]


def test_rebuild_is_bit_identical(release_dir: Path, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    """The same release built again, later in the session, gives the same bytes: the SBOM (its sha256 is in the
    signed header) has no random bom-ref, and what the tests did to the repository's packages in between (imports
    write __pycache__ into them) reaches neither the image nor the SBOM (tests/test_rebuild_identical.py pins both
    in seconds). The base is the one the first build used (--offline: the archive may have published an update
    since, which is another input, not a rebuild)."""
    again = _release(tmp_path / "again", keys["ec"][0], "--board", "qemu-virt", "--offline")
    assert filecmp.cmp(again / "rootfs.ext4", release_dir / "rootfs.ext4", shallow=False)
    # the signed manifest covers payload and header: equal manifests, equal artifacts but for the signature
    art = "vv-video-ai-1.0.0-qemu-virt.mender"
    assert _manifest_of(again / art) == _manifest_of(release_dir / art)
    assert filecmp.cmp(again / "qemu-virt" / "disk.img", release_dir / "qemu-virt" / "disk.img", shallow=False)


@pytest.mark.qemu
def test_qemu_virt_image_boots_to_the_app(release_dir: Path, tmp_path: Path) -> None:
    with Vm.device(release_dir / "qemu-virt" / "disk.img", tmp_path, name="serial", network=False) as vm:
        text = vm.wait_for_all(["ota-boot: slot=A part=2 upgrade_available=0 bootcount=0",
                                "vv-video-ai: serving /health"], timeout=420)
    assert "Kernel panic" not in text


@pytest.mark.qemu
def test_rpi_image_runs_debian_u_boot_and_boot_script_on_emulated_pi3(release_dir: Path, tmp_path: Path) -> None:
    """QEMU cannot run the VideoCore firmware: start the Pi U-Boot directly (-kernel), from the u-boot-rpi
    package the build downloaded, and check that it runs boot.scr from the SD card and starts the kernel."""
    unpacked = tmp_path / "uboot"
    deb = sorted((Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vv-ota" / "firmware").glob("u-boot-rpi_*.deb"))[-1]
    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    root = tmp_path / "root"
    subprocess.run(["debugfs", "-R", f"rdump /boot/dtbs/broadcom {tmp_path}", str(release_dir / "rootfs.ext4")],
                   check=True, capture_output=True)
    dtb = tmp_path / "broadcom" / "bcm2837-rpi-3-b.dtb"
    sd = tmp_path / "sd.img"
    subprocess.run(["cp", "--sparse=always", str(release_dir / "rpi4" / "disk.img"), str(sd)], check=True)
    size = sd.stat().st_size
    os.truncate(sd, 1 << (size - 1).bit_length())  # QEMU's SD card wants a power-of-two size
    assert not root.exists()
    argv = ["qemu-system-aarch64", "-M", "raspi3b", "-m", "1024", "-nographic", "-serial", "null", "-serial",
            "mon:stdio", "-kernel", str(unpacked / "usr/lib/u-boot/rpi_3/u-boot.bin"), "-dtb", str(dtb),
            "-drive", f"if=sd,format=raw,file={sd}"]
    with Vm(argv, tmp_path / "serial.log") as vm:
        vm.wait_for_all(["ota-boot: slot=A part=2", "Starting kernel"], timeout=420)


def test_stage_commands_stop_where_asked(tmp_path: Path) -> None:
    env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH, PYTHONPATH=str(REPO))
    previous = tmp_path / "prev"
    previous.mkdir()
    (previous / "manifest.json").write_text(json.dumps(
        {"version": "0.9.0", "artifact_name": "vv-video-ai-0.9.0", "outputs": {"rootfs.ext4": {"sha256": "ab" * 32}}}))
    proc = subprocess.run([sys.executable, str(REPO / "build.py"), "image", "--board", "qemu-virt", "--out", str(tmp_path),
                           "--previous", str(previous), "--unsigned"], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "1.0.0"
    assert (out / "qemu-virt" / "disk.img").exists() and (out / "rootfs.ext4").exists()
    assert not list(out.glob("*.mender")) and not (out / "rpi4").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["outputs"]) == {"rootfs.ext4", "qemu-virt/disk.img", "qemu-virt/disk.img.bmap", "qemu-virt/disk.img.gz"}
    assert manifest["previous"] == {"version": "0.9.0", "artifact_name": "vv-video-ai-0.9.0", "rootfs_sha256": "ab" * 32,
                                    "deltas": {}}
    # an unsigned image: says so at build time, in ota.conf and at every boot, and trusts no key
    assert "unsigned image: it trusts no release key" in proc.stderr
    assert manifest["signed"] is False and manifest["trust"]["release_key"] is None
    from device_hooks.config import parse_config

    assert parse_config(_debugfs_cat(out / "rootfs.ext4", "/etc/ota/ota.conf")).device.unsigned is True
    keys_dir = subprocess.run(["debugfs", "-R", "ls -l /etc/ota/keys", str(out / "rootfs.ext4")], capture_output=True,
                              text=True, check=True).stdout
    assert ".pem" not in keys_dir
    with open(out / "qemu-virt" / "disk.img", "rb") as d:
        boot = d.read(300 << 20)
    assert b'echo "ota-boot: WARNING: unsigned image: this device trusts no release key and refuses every update"' in boot


def test_bad_release_configuration_fails_before_building(tmp_path: Path) -> None:
    cfg = tmp_path / "release.yaml"
    cfg.write_text("layers: [base, nosuchlayer]\nslot_size_mib: 64\n")
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "base.yaml").write_text("packages: [systemd]\nfiles: [{src: missing.conf, dest: /etc/x}]\n")
    proc = subprocess.run([sys.executable, str(REPO / "build.py"), "release", "--config", str(cfg), "--out", str(tmp_path / "o"),
                           "--unsigned"],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    assert "base.yaml: files[0].src: file not found" in proc.stderr
    assert "layer file not found" in proc.stderr and "nosuchlayer.yaml" in proc.stderr
    assert not (tmp_path / "o").exists()


def _debugfs_cat(image: Path, path: str) -> str:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True,
                          check=True).stdout


def test_release_trust_lands_in_the_image(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    """One qemu-virt release with every trust setting: what the rootfs, the data partition, the artifact and
    the manifest then hold."""
    from artifacts.keys import load_verifier as verifier
    from device_hooks.config import parse_config
    from image.disk import partitions_of

    from .test_release_trust import make_cert

    cfg = tmp_path / "cfg"
    (cfg / "keys").mkdir(parents=True)
    (cfg / "layers").symlink_to(REPO / "layers")
    (cfg / "keys" / "next.pem").write_bytes(b"next release key\n" + keys["rsa"][1].read_bytes())
    (cfg / "keys" / "old.pem").write_bytes(keys["ec2"][1].read_bytes())
    (cfg / "release.yaml").write_text((REPO / "release.yaml").read_text() + "\n".join([
        "", "trusted_keys: [keys/next.pem]", "revoked_keys: [keys/old.pem]", "security_version: 2", ""]))
    ca = make_cert(tmp_path, "ca")
    out = _release(tmp_path / "o", keys["ec"][0], "--config", str(cfg / "release.yaml"), "--board", "qemu-virt",
                   "--security-version", "4", "--server-url", "https://ota.example.com", "--server-ca", str(ca))
    rootfs = out / "rootfs.ext4"
    conf = parse_config(_debugfs_cat(rootfs, "/etc/ota/ota.conf"))
    assert (conf.device.security_version, conf.device.unsigned, conf.device.config_variables) == \
        (4, False, ("DEVICE_ID", "DVR_IP"))
    assert (conf.server.url, conf.server.ca_file, conf.server.insecure_http) == \
        ("https://ota.example.com", "/etc/ota/server-ca.pem", False)
    assert _debugfs_cat(rootfs, "/etc/ota/server-ca.pem") == ca.read_text()
    assert _debugfs_cat(rootfs, "/etc/ota/keys/release.pem") == keys["ec"][1].read_text()
    assert _debugfs_cat(rootfs, "/etc/ota/keys/trusted-0.pem") == keys["rsa"][1].read_text()  # the key, not the file
    old_fp = verifier(keys["ec2"][1]).fingerprint
    revoked = [line for line in _debugfs_cat(rootfs, "/etc/ota/keys.revoked").splitlines() if not line.startswith("#")]
    assert revoked == [f"{old_fp} old.pem"]

    art = out / "vv-video-ai-1.0.0-qemu-virt.mender"
    info = read_artifact(art, [verifier(keys["ec"][1])])
    assert info.header.type_infos[0].provides["rootfs-image.security_version"] == "4"

    disk = out / "qemu-virt" / "disk.img"
    part = partitions_of(disk)[3]
    data = tmp_path / "data.ext4"
    with open(disk, "rb") as d, open(data, "wb") as f:
        d.seek(int(part["start"]) * 512)  # type: ignore[call-overload]
        f.write(d.read(int(part["size"]) * 512))  # type: ignore[call-overload]
    slots = json.loads(_debugfs_cat(data, "/ota/slots.json"))
    assert slots["2"]["provides"]["rootfs-image.security_version"] == "4"
    with open(disk, "rb") as d:  # the boot partition (before slot A): a signed image's boot script has no warning
        boot = d.read(int(partitions_of(disk)[1]["start"]) * 512)  # type: ignore[call-overload]
    assert b"ota-boot: slot=" in boot and b"WARNING: unsigned image" not in boot

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["security_version"] == 4 and manifest["signed"] is True
    assert manifest["trust"]["release_key"] == verifier(keys["ec"][1]).fingerprint
    assert manifest["trust"]["trusted_keys"] == [verifier(keys["rsa"][1]).fingerprint]
    assert manifest["trust"]["revoked_keys"] == [old_fp]
    assert manifest["trust"]["config_variables"] == ["DEVICE_ID", "DVR_IP"]
