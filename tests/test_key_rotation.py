"""Release-key rotation and revocation, told end to end against the real agent (README "Keys and artifacts").

The file-backed device keeps one ``/etc/ota`` for both slots, so what each image would bring (its trusted
keys, its ``keys.revoked``) is put in place when the test "boots" into it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from artifacts import load_verifier

from .agent_device import FileDevice
from .hostile_server import Hostile, hostile_server
from .test_agent_local import make_artifact


def release(tmp: Path, key: Path, version: str) -> Path:
    out = tmp / version
    out.mkdir()
    return make_artifact(out, key, name=f"vv-{version}", version=version)[0]


def install(device: FileDevice, server: Hostile, art: Path, name: str) -> str:
    dep = str(uuid.uuid4())
    server.files["/dl/artifact.mender"] = art.read_bytes()
    server.next = server.deployment(dep, name)
    proc = device.agent("check-update")
    server.next = None
    return proc.stdout.strip() + "\n" + proc.stderr


def boot_and_commit(device: FileDevice, keys: list[Path], revoked: str = "") -> None:
    """The device reboots into the new image: its keys and revocation list are the image's."""
    for p in (device.root / "etc/keys").glob("*.pem"):
        p.unlink()
    for i, key in enumerate(keys):
        (device.root / "etc/keys" / f"release-{i}.pem").write_bytes(key.read_bytes())
    (device.root / "etc/keys.revoked").write_text(revoked)
    device.boot()
    assert device.verdict().returncode == 0
    assert device.agent("check-update").returncode == 0


def test_rotate_then_revoke_the_old_release_key(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    old, new = keys["ec"], keys["ec2"]
    with hostile_server() as server:
        device = FileDevice(tmp_path / "dev", server.url, [old[1]], check_server=False)
        # 1. a release signed by the new key is refused: the fleet does not trust it yet
        art = release(tmp_path, new[0], "2.0.0")
        assert install(device, server, art, "vv-2.0.0").startswith("failure")
        # 2. the transition release: signed by the old key, its image trusts old + new
        art = release(tmp_path, old[0], "2.1.0")
        assert install(device, server, art, "vv-2.1.0").startswith("rebooting")
        boot_and_commit(device, [old[1], new[1]])
        # 3. from now on releases are signed by the new key
        art = release(tmp_path, new[0], "2.2.0")
        assert install(device, server, art, "vv-2.2.0").startswith("rebooting")
        # ... and this one revokes the old key (revoked_keys in release.yaml)
        fp = load_verifier(old[1]).fingerprint
        boot_and_commit(device, [old[1], new[1]], revoked=f"{fp} old-release.pem\n")
        # 4. a release signed by the old key (stolen) is refused
        art = release(tmp_path, old[0], "2.3.0")
        out = install(device, server, art, "vv-2.3.0")
        assert out.startswith("failure") and "is revoked" in out
        # 5. even on an older slot whose image does not list the revocation: it is on /data for good
        (device.root / "etc/keys.revoked").unlink()
        art = release(tmp_path, old[0], "2.4.0")
        assert install(device, server, art, "vv-2.4.0").startswith("failure")
        art = release(tmp_path, new[0], "2.5.0")
        assert install(device, server, art, "vv-2.5.0").startswith("rebooting")
