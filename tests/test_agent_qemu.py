"""The agent for real: a built image boots in qemu-system-aarch64, onboards with the real server over QEMU's
user-mode network, installs the next release into slot B with the streaming install, reboots into it as a
trial, passes its health verdict, commits, and reports ``success`` only then. The data partition grows to the
end of the (enlarged) disk on first boot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from device_hooks.bootenv import BootEnv
from image.disk import partitions_of

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


class Console:
    """qemu-system-aarch64 with the serial console in a file; stopped by PID in the fixture."""

    def __init__(self, disk: Path, log: Path) -> None:
        self.log = log
        self.out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72", "-smp", "2", "-m", "1024", "-nographic",
             "-bios", "/usr/lib/u-boot/qemu_arm64/u-boot.bin", "-drive", f"if=virtio,format=raw,file={disk}",
             "-device", "i6300esb", "-watchdog-action", "reset",
             "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"],
            stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_bytes().decode(errors="replace")

    def wait_for(self, what: str | Callable[[], bool], timeout: float, start: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if callable(what) and what():
                return
            if isinstance(what, str) and what in self.text()[start:]:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(2)
        raise AssertionError(f"not seen within {timeout:.0f}s: {what}\nconsole tail:\n{self.text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.out.close()


@pytest.fixture
def setup(tmp_path: Path, keys) -> Iterator[tuple[OtaServer, Path, Path]]:  # type: ignore[no-untyped-def]
    port = free_port()
    server = OtaServer(tmp_path / "server", keys["ec"][1], port=port)
    server.start()
    # a release configuration like the default, pointed at this server (QEMU's host address 10.0.2.2) with
    # short polling; the layers are the repository's own
    cfg_dir = tmp_path / "config"
    cfg_dir.mkdir()
    (cfg_dir / "layers").symlink_to(REPO / "layers")
    cfg = yaml.safe_load((REPO / "release.yaml").read_text())
    cfg.update(server_url=f"http://10.0.2.2:{port}", boards=["qemu-virt"])
    cfg["variables"] = {**cfg.get("variables", {}), "OTA_POLL_INTERVAL": "5s", "OTA_INVENTORY_INTERVAL": "20s",
                        "OTA_HEALTH_DEADLINE": "4m"}
    config = cfg_dir / "release.yaml"
    config.write_text(yaml.safe_dump(cfg))
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
    console = Console(disk, tmp / "serial.log")
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

        mark = len(console.text())
        # install (download, decompress into slot B, read back) and reboot into the trial
        console.wait_for("ota-boot: slot=B part=3 upgrade_available=1 bootcount=1", 1200, start=mark)
        assert stats().get("success") is None, "success reported before the health verdict"
        console.wait_for(lambda: stats() == {"success": 1}, 600)
        inv = attrs()
        console.wait_for(lambda: attrs().get("artifact_name") == "vv-video-ai-2.0.0", 120)
        inv = attrs()
        assert inv["ota_slot"] == "B" and inv["rootfs-image.version"] == "2.0.0"
        assert "Kernel panic" not in console.text()
    finally:
        console.stop()
    # the boot state on the FAT partition, read with the stock tools' format: slot B committed
    boot = partitions_of(disk)[0]
    env = {}
    for copy in ("a", "b"):
        out = tmp / f"uboot.env.{copy}"
        subprocess.run(["mcopy", "-n", "-i", f"{disk}@@{boot['start'] * 512}", f"::ota/uboot.env.{copy}", str(out)],
                       check=True)
    env = BootEnv([tmp / "uboot.env.a", tmp / "uboot.env.b"]).read()
    assert (env["mender_boot_part"], env["upgrade_available"]) == ("3", "0"), env
