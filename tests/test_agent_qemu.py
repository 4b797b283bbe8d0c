"""The agent for real: a built image boots in qemu-system-aarch64, onboards with the real server over QEMU's
user-mode network, installs the next release into slot B with the streaming install, reboots into it as a
trial, passes its health verdict, commits, and reports ``success`` only then. The data partition grows to the
end of the (enlarged) disk on first boot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.demo import demo_config
from device_hooks.bootenv import BootEnv
from image.disk import partitions_of
from image.vm import Vm

from .conftest import REPO
from .server_process import MGMT, OtaServer, free_port

pytestmark = [pytest.mark.slow, pytest.mark.qemu]
EPOCH = "1700000000"
GROW = 512 * 1024 * 1024


def build(config: Path, out: Path, key: Path, version: str) -> Path:
    env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "build.py"), "release", "--config", str(config), "--version",
                           version, "--board", "qemu-virt", "--key", str(key), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out / version


@pytest.fixture
def setup(tmp_path: Path, keys) -> Iterator[tuple[OtaServer, Path, Path]]:  # type: ignore[no-untyped-def]
    port = free_port()
    server = OtaServer(tmp_path / "server", keys["ec"][1], port=port)
    server.start()
    # a release configuration like the default, pointed at this server (QEMU's host address 10.0.2.2) with
    # short polling (the demo's); the layers are the repository's own
    config = demo_config(tmp_path / "config", REPO / "release.yaml", f"http://10.0.2.2:{port}", {})
    try:
        yield server, config, tmp_path
    finally:
        server.stop()


def test_agent_installs_reboots_commits_in_qemu(setup: tuple[OtaServer, Path, Path], keys) -> None:  # type: ignore[no-untyped-def]
    server, config, tmp = setup
    v1 = build(config, tmp / "out", keys["ec"][0], "1.0.0")
    v2 = build(config, tmp / "out", keys["ec"][0], "2.0.0")
    disk = tmp / "disk.img"
    shutil.copyfile(v1 / "qemu-virt" / "disk.img", disk)
    os.truncate(disk, disk.stat().st_size + GROW)  # a bigger card than the image: /data grows on first boot
    console = Vm(disk, tmp, writable=True).start()
    try:
        console.wait_for("ota-boot: slot=A part=2 upgrade_available=0 bootcount=0", 180)

        def pending() -> bool:
            return any(d["status"] == "pending" for d in server.get(f"{MGMT}/v2/devauth/devices").json())

        console.wait_for(pending, 420)
        dev = server.get(f"{MGMT}/v2/devauth/devices").json()[0]
        resp = server.send_json("PUT", f"{MGMT}/v2/devauth/devices/{dev['id']}/auth/{dev['auth_sets'][0]['id']}/status",
                                {"status": "accepted"})
        assert resp.status in (200, 204), resp

        def attrs() -> dict[str, object]:
            doc = server.get(f"{MGMT}/v1/inventory/devices/{dev['id']}")
            if doc.status != 200:
                return {}
            return {a["name"]: a["value"] for a in doc.json().get("attributes", [])}

        console.wait_for(lambda: attrs().get("artifact_name") == "vv-video-ai-1.0.0", 120)
        inv = attrs()
        assert inv["ota_slot"] == "A" and inv["device_type"] == "qemu-virt"
        assert int(str(inv["data_free_mb"])) > GROW // (1024 * 1024) - 64, f"/data did not grow: {inv}"

        art = v2 / "vv-video-ai-2.0.0-qemu-virt.mender"
        assert server.upload_artifact(art).status == 201
        resp = server.send_json("POST", f"{MGMT}/v1/deployments/deployments",
                                {"name": "to 2.0.0", "artifact_name": "vv-video-ai-2.0.0", "devices": [dev["id"]]})
        assert resp.status == 201, resp
        dep = resp.headers["location"].rsplit("/", 1)[-1]

        def stats() -> dict[str, int]:
            return {k: v for k, v in server.get(f"{MGMT}/v1/deployments/deployments/{dep}/statistics").json().items() if v}

        mark = console.mark()
        # install (download, decompress into slot B, read back) and reboot into the trial
        console.wait_for("ota-boot: slot=B part=3 upgrade_available=1 bootcount=1", 1200, since=mark)
        assert stats().get("success") is None, "success reported before the health verdict"
        console.wait_for(lambda: stats() == {"success": 1}, 600)
        inv = attrs()
        console.wait_for(lambda: attrs().get("artifact_name") == "vv-video-ai-2.0.0", 120)
        inv = attrs()
        assert inv["ota_slot"] == "B" and inv["rootfs-image.version"] == "2.0.0"
        assert "Kernel panic" not in console.console()
    finally:
        console.kill()
    # the boot state on the FAT partition, read with the stock tools' format: slot B committed
    boot = partitions_of(disk)[0]
    env = {}
    for copy in ("a", "b"):
        out = tmp / f"uboot.env.{copy}"
        subprocess.run(["mcopy", "-n", "-i", f"{disk}@@{boot['start'] * 512}", f"::ota/uboot.env.{copy}", str(out)],
                       check=True)
    env = BootEnv([tmp / "uboot.env.a", tmp / "uboot.env.b"]).read()
    assert (env["mender_boot_part"], env["upgrade_available"]) == ("3", "0"), env
