"""The security version is a signed provide: of full artifacts, and of the deltas made from them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from artifacts import ArtifactReader, load_signer, load_verifier, rootfs_image_spec, write_artifact
from artifacts.delta import write_delta_artifact
from artifacts.writer import SECURITY_VERSION_KEY
from ota_common.errors import UserError

from .conftest import make_payload


def _provides(art: Path, public: Path) -> dict[str, str]:
    with ArtifactReader.open(art, verifiers=[load_verifier(public)]) as r:
        return dict(r.read_header().type_infos[0].provides)


def _full(tmp_path: Path, key: Path, version: str, seed: int, security_version: int | None) -> Path:
    image = make_payload(tmp_path / f"rootfs-{version}.ext4", 1 << 20, seed=seed)
    spec = rootfs_image_spec(file=image, name=f"rel-{version}", device_types=["qemu-virt"], software_version=version,
                             security_version=security_version)
    return write_artifact(spec, tmp_path / f"rel-{version}.mender", signer=load_signer(key)).path


def test_full_artifact_provides_its_security_version(tmp_path: Path, keys: dict[str, tuple[Path, Path]],
                                                     mender_artifact: str) -> None:
    art = _full(tmp_path, keys["ec"][0], "2.0", 1, 7)
    provides = _provides(art, keys["ec"][1])
    assert provides[SECURITY_VERSION_KEY] == "7" and provides["rootfs-image.version"] == "2.0"
    assert SECURITY_VERSION_KEY == "rootfs-image.security_version"
    # the stock tool reads it as an ordinary provide of the signed header
    v = subprocess.run([mender_artifact, "validate", "-k", str(keys["ec"][1]), str(art)], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    shown = subprocess.run([mender_artifact, "read", str(art)], capture_output=True, text=True, check=True).stdout
    assert "rootfs-image.security_version: 7" in shown
    # 0 is provided too (a device compares numbers; an absent provide would be ambiguous)
    assert _provides(_full(tmp_path, keys["ec"][0], "2.1", 2, 0), keys["ec"][1])[SECURITY_VERSION_KEY] == "0"
    assert SECURITY_VERSION_KEY not in _provides(_full(tmp_path, keys["ec"][0], "2.2", 3, None), keys["ec"][1])
    with pytest.raises(UserError, match="non-negative"):
        rootfs_image_spec(file=art, name="x", device_types=["q"], security_version=-1)


def test_delta_carries_the_targets_security_version(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    old = _full(tmp_path, keys["ec"][0], "1.0", 1, 2)
    new = _full(tmp_path, keys["ec"][0], "2.0", 2, 5)
    signer = load_signer(keys["ec"][0])
    verifiers = [load_verifier(keys["ec"][1])]
    delta = tmp_path / "delta.mender"
    res = write_delta_artifact(old, new, signer=signer, out=delta, verifiers=verifiers)
    assert (res.source.security_version, res.target.security_version) == ("2", "5")
    provides = _provides(delta, keys["ec"][1])
    assert provides[SECURITY_VERSION_KEY] == "5" and provides["rootfs-image.version"] == "2.0"
    # the path a release takes: one payload reused for every board
    payload = tmp_path / "payload.delta"
    with ArtifactReader.open(delta) as r:
        payload.write_bytes(b"".join(next(r.files()).chunks()))
    again = tmp_path / "again.mender"
    write_delta_artifact(old, new, signer=signer, out=again, verifiers=verifiers, payload=payload)
    assert _provides(again, keys["ec"][1])[SECURITY_VERSION_KEY] == "5"
    # a target without one gives a delta without one
    plain = _full(tmp_path, keys["ec"][0], "3.0", 3, None)
    write_delta_artifact(old, plain, signer=signer, out=tmp_path / "plain.mender", verifiers=verifiers)
    assert SECURITY_VERSION_KEY not in _provides(tmp_path / "plain.mender", keys["ec"][1])
