"""The update agent against the real update server (``build.py server``) over loopback HTTP: onboarding,
deployments end to end with honest status, failure reports with logs, Range resume through a connection that
keeps dropping, power cuts during the download, aborts, configuration delivery."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_hooks.faults import EXIT_CODE
from devkit.client import MGMT
from devkit.server import OtaServer

from .agent_device import FileDevice
from .test_agent_local import make_artifact


@pytest.fixture
def server(tmp_path: Path, keys) -> Iterator[OtaServer]:  # type: ignore[no-untyped-def]
    # the server accepts releases signed by either key; devices trust only "ec" (a compromised or wrong
    # release key on the server must still be refused by the device)
    srv = OtaServer(tmp_path / "server", keys["ec"][1])
    srv.start()
    yield srv
    srv.stop()


def onboard(server: OtaServer, device: FileDevice) -> str:
    """First contact makes the device pending; accept it through the management API; returns its id."""
    proc = device.agent("check-update")
    assert proc.stdout.strip() == "unauthorized", proc.stderr
    devices = server.get(f"{MGMT}/v2/devauth/devices").json()
    pending = [d for d in devices if d["status"] == "pending"]
    assert len(pending) == 1, devices
    dev = pending[0]
    assert dev["identity_data"]["serial"] == f"test-{device.root.name}"
    aid = dev["auth_sets"][0]["id"]
    resp = server.send_json("PUT", f"{MGMT}/v2/devauth/devices/{dev['id']}/auth/{aid}/status", {"status": "accepted"})
    assert resp.status in (200, 204), resp
    proc = device.agent("check-update")
    assert proc.stdout.strip() == "idle", proc.stderr
    return str(dev["id"])


def deploy(server: OtaServer, art: Path, device_id: str, **extra: Any) -> str:
    resp = server.upload_artifact(art)
    assert resp.status == 201, resp
    name = art.stem
    resp = server.send_json("POST", f"{MGMT}/v1/deployments/deployments",
                            {"name": f"rollout {name}", "artifact_name": name, "devices": [device_id], **extra})
    assert resp.status == 201, resp
    return resp.headers["location"].rstrip("/").rsplit("/", 1)[-1]


def stats(server: OtaServer, dep: str) -> dict[str, int]:
    return {k: v for k, v in server.get(f"{MGMT}/v1/deployments/deployments/{dep}/statistics").json().items() if v}


def device_log(server: OtaServer, dep: str, device_id: str) -> str:
    resp = server.get(f"{MGMT}/v1/deployments/deployments/{dep}/devices/{device_id}/log")
    assert resp.status == 200, resp
    return resp.body.decode()


def inventory(server: OtaServer, device_id: str) -> dict[str, Any]:
    doc = server.get(f"{MGMT}/v1/inventory/devices/{device_id}").json()
    return {a["name"]: a["value"] for a in doc["attributes"]}


@pytest.fixture
def device(tmp_path: Path, server: OtaServer, keys) -> FileDevice:  # type: ignore[no-untyped-def]
    return FileDevice(tmp_path / "dev", server.url, [keys["ec"][1]])


def test_deployment_success_only_after_commit(server: OtaServer, device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    dev_id = onboard(server, device)
    inv = inventory(server, dev_id)
    assert inv["artifact_name"] == "vv-1.0.0" and inv["device_type"] == "test-board" and inv["ota_slot"] == "A"
    art, payload = make_artifact(tmp_path, keys["ec"][0])
    dep = deploy(server, art, dev_id)
    proc = device.agent("check-update")
    assert proc.stdout.strip() == "rebooting", proc.stderr
    assert stats(server, dep) == {"rebooting": 1}, "success must wait for the health verdict"
    assert device.reboots() == 1
    assert device.boot() == 3
    assert device.verdict().returncode == 0
    proc = device.agent("check-update")
    assert proc.returncode == 0, proc.stderr
    assert stats(server, dep) == {"success": 1}
    inv = inventory(server, dev_id)
    assert inv["artifact_name"] == "vv-2.0.0" and inv["ota_slot"] == "B" and inv["rootfs-image.version"] == "2.0.0"
    data = payload.read_bytes()
    assert device.slot_path(3).read_bytes()[: len(data)] == data
    # the same artifact again: already installed, nothing written
    dep2 = server.send_json("POST", f"{MGMT}/v1/deployments/deployments",
                            {"name": "again", "artifact_name": "vv-2.0.0", "devices": [dev_id]})
    assert dep2.status == 201
    device.agent("check-update")
    assert stats(server, dep2.headers["location"].rsplit("/", 1)[-1]) == {"already-installed": 1}


def test_health_failure_is_reported_with_its_output(server: OtaServer, device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    dev_id = onboard(server, device)
    device.add_hook("50-dvr", "#!/bin/sh\necho 'cannot reach DVR at 192.168.1.100' >&2\nexit 1\n")
    dep = deploy(server, make_artifact(tmp_path, keys["ec"][0])[0], dev_id)
    assert device.agent("check-update").stdout.strip() == "rebooting"
    device.boot()
    assert device.verdict().returncode == 2
    assert device.boot() == 2
    proc = device.agent("check-update")
    assert proc.returncode == 0, proc.stderr
    assert stats(server, dep) == {"failure": 1}
    log = device_log(server, dep, dev_id)
    assert "cannot reach DVR at 192.168.1.100" in log and "health check failed" in log
    assert inventory(server, dev_id)["artifact_name"] == "vv-1.0.0"


def test_bootloader_rollback_is_reported(server: OtaServer, device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    dev_id = onboard(server, device)
    dep = deploy(server, make_artifact(tmp_path, keys["ec"][0])[0], dev_id)
    assert device.agent("check-update").stdout.strip() == "rebooting"
    assert device.boot() == 3  # the new slot hangs; the watchdog resets
    assert device.boot() == 2  # boot.scr falls back
    device.agent("check-update")
    assert stats(server, dep) == {"failure": 1}
    assert "did not reach a health verdict" in device_log(server, dep, dev_id)


def test_artifact_signed_by_an_untrusted_key_is_refused_on_the_device(server: OtaServer, device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    dev_id = onboard(server, device)
    # the device trusts only the "ec2" key now: the server's release key is not one of them
    device.trusted_keys = [keys["ec2"][1]]
    for p in (device.root / "etc/keys").glob("*.pem"):
        p.unlink()
    (device.root / "etc/keys/other.pem").write_bytes(keys["ec2"][1].read_bytes())
    env_before = device.bootenv.read()
    slot_before = device.slot_path(3).read_bytes()
    dep = deploy(server, make_artifact(tmp_path, keys["ec"][0])[0], dev_id)
    proc = device.agent("check-update")
    assert proc.stdout.strip() == "failure"
    assert stats(server, dep) == {"failure": 1}
    assert "signature" in device_log(server, dep, dev_id).lower()
    assert device.bootenv.read() == env_before and device.slot_path(3).read_bytes() == slot_before


def test_downgrade_needs_the_deployment_to_allow_it(server: OtaServer, device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    dev_id = onboard(server, device)
    art = make_artifact(tmp_path, keys["ec"][0], name="vv-0.9.0", version="0.9.0")[0]
    dep = deploy(server, art, dev_id)
    assert device.agent("check-update").stdout.strip() == "failure"
    assert "older than the running 1.0.0" in device_log(server, dep, dev_id)
    resp = server.send_json("POST", f"{MGMT}/v1/deployments/deployments",
                            {"name": "rollback fleet", "artifact_name": "vv-0.9.0", "devices": [dev_id],
                             "allow_downgrade": True})
    assert resp.status == 201, resp
    assert device.agent("check-update").stdout.strip() == "rebooting"


class DroppingProxy:
    """A TCP proxy that cuts every server→client stream after ``limit`` bytes: a flaky mobile link."""

    def __init__(self, target_port: int, limit: int) -> None:
        self.target_port = target_port
        self.limit = limit
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.cuts = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.limit), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def test_download_resumes_with_range_over_a_dropping_link(server: OtaServer, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    proxy = DroppingProxy(server.port, limit=400_000)
    try:
        device = FileDevice(tmp_path / "dev", f"http://127.0.0.1:{proxy.port}", [keys["ec"][1]])
        dev_id = onboard(server, device)
        art, payload = make_artifact(tmp_path, keys["ec"][0])
        assert art.stat().st_size > 3 * 400_000, "the artifact must need several connections"
        dep = deploy(server, art, dev_id)
        proc = device.agent("check-update")
        assert proc.stdout.strip() == "rebooting", proc.stderr
        assert proxy.cuts >= 3
        log = (device.data / "logs" / f"{dep}.jsonl").read_text()
        assert "resumed" in log and "HTTP Range" in log
        data = payload.read_bytes()
        assert device.slot_path(3).read_bytes()[: len(data)] == data
    finally:
        proxy.close()


def _cut_mid_download(server: OtaServer, device: FileDevice, tmp_path: Path, key: Path) -> tuple[str, Path, Path]:
    dev_id = onboard(server, device)
    payload = tmp_path / "noisy.ext4"  # incompressible, so the download is well past a spool record when cut
    payload.write_bytes(random.Random(3).randbytes(device.slot_size))
    art, payload = make_artifact(tmp_path, key, payload=payload)
    dep = deploy(server, art, dev_id)
    proc = device.agent("check-update", fault="install-write@6000000")
    assert proc.returncode == EXIT_CODE, proc.stderr
    assert device.boot() == 2, "an unarmed install never changes the boot"
    return dep, device.data / "download" / f"{dep}.mender", art


def _finish(server: OtaServer, device: FileDevice, dep: str) -> str:
    proc = device.agent("check-update")
    assert proc.stdout.strip() == "rebooting", proc.stderr
    device.boot()
    device.verdict()
    device.agent("check-update")
    assert stats(server, dep) == {"success": 1}
    return (device.data / "logs" / f"{dep}.jsonl").read_text()


def test_power_cut_during_download_resumes_from_the_kept_bytes(server: OtaServer, device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    dep, spool, art = _cut_mid_download(server, device, tmp_path, keys["ec"][0])
    kept = int(spool.with_name(spool.name + ".length").read_text())
    assert 0 < kept <= spool.stat().st_size < art.stat().st_size
    with open(spool, "ab") as f:  # what a power cut can leave after the last fsync: a tail of junk
        f.write(b"\xde\xad" * 100_000)
    log = _finish(server, device, dep)
    assert f"{kept} kept from before" in log, "only the fsynced, recorded bytes are trusted"
    assert not spool.exists(), "the kept download is removed once installed"


def test_damaged_kept_download_is_fetched_again(server: OtaServer, device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    dep, spool, _ = _cut_mid_download(server, device, tmp_path, keys["ec"][0])
    with open(spool, "r+b") as f:  # a bad medium: bytes inside the trusted range changed
        f.seek(1_000_000)
        f.write(b"\0" * 4096)
    log = _finish(server, device, dep)
    assert "downloading the whole artifact again" in log


def test_abort_before_reboot_leaves_the_boot_state_alone(server: OtaServer, device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    dev_id = onboard(server, device)
    gate = tmp_path / "gate"
    # the install pauses in a state script until the test has aborted the deployment
    script = {"ArtifactInstall_Leave_01_wait": f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.1; done\n"}
    dep = deploy(server, make_artifact(tmp_path, keys["ec"][0], scripts=script)[0], dev_id)
    env_before = device.bootenv.read()
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(proc=device.agent("check-update")))
    t.start()
    deadline = time.monotonic() + 60
    while stats(server, dep).get("installing") != 1:
        assert time.monotonic() < deadline, stats(server, dep)
        time.sleep(0.2)
    resp = server.send_json("PUT", f"{MGMT}/v1/deployments/deployments/{dep}/status", {"status": "aborted"})
    assert resp.status == 204, resp
    gate.touch()
    t.join(60)
    assert result["proc"].stdout.strip() == "aborted", result["proc"].stderr
    assert device.bootenv.read() == env_before
    assert device.state().get("phase") is None
    assert stats(server, dep) == {"aborted": 1}


def test_configuration_reaches_the_device(server: OtaServer, device: FileDevice) -> None:
    dev_id = onboard(server, device)
    resp = server.send_json("PUT", f"{MGMT}/v1/deviceconfig/configurations/device/{dev_id}",
                            {"DEVICE_ID": "cam-017", "DVR_IP": "10.20.0.5"})
    assert resp.status == 204, resp
    device.agent("check-update")
    env = (device.data / "device.env").read_text()
    assert "DEVICE_ID=cam-017\n" in env and "DVR_IP=10.20.0.5\n" in env


def test_configuration_hash_round_trip_shows_in_sync(server: OtaServer, device: FileDevice) -> None:
    """The hash the server announces, the one its configuration GET carries and the one the agent reports are
    the same: the management API says the device is in sync, and out of sync after a change until it polls."""
    dev_id = onboard(server, device)
    url = f"{MGMT}/v1/deviceconfig/configurations/device/{dev_id}"
    assert server.send_json("PUT", url, {"DEVICE_ID": "cam-031", "DVR_IP": "10.3.0.1", "_secrets": ["DVR_IP"]}).status == 204
    assert server.get(url).json()["in_sync"] is False
    device.agent("check-update")
    doc = server.get(url).json()
    assert doc["in_sync"] is True and doc["applied_hash"] == doc["config_hash"] and doc["config_status"] == "applied"
    assert server.send_json("PUT", url, {"DEVICE_ID": "cam-032"}).status == 204
    assert server.get(url).json()["in_sync"] is False
    device.agent("check-update")
    assert server.get(url).json()["in_sync"] is True
    assert "DEVICE_ID=cam-032\n" in (device.data / "device.env").read_text()


def test_configuration_kept_when_a_secret_does_not_decrypt(server: OtaServer, device: FileDevice) -> None:
    """A secret the server cannot decrypt (stored with a key it does not have): the server answers 503 instead
    of a configuration without the secret, and the agent keeps its last device.env, other changes included."""
    import sqlite3

    from cryptography.fernet import Fernet

    dev_id = onboard(server, device)
    resp = server.send_json("PUT", f"{MGMT}/v1/deviceconfig/configurations/device/{dev_id}",
                            {"DEVICE_ID": "cam-017", "DVR_IP": "10.20.0.5", "_secrets": ["DVR_IP"]})
    assert resp.status == 204, resp
    device.agent("check-update")
    before = (device.data / "device.env").read_text()
    assert "DEVICE_ID=cam-017\n" in before and "DVR_IP=10.20.0.5\n" in before
    with sqlite3.connect(server.workdir / "ota.sqlite") as c:
        c.execute("UPDATE config_values SET value = ? WHERE owner = ? AND name = 'DVR_IP'",
                  (Fernet(Fernet.generate_key()).encrypt(b"10.20.0.5").decode(), dev_id))
        c.execute("UPDATE config_values SET value = 'cam-018' WHERE owner = ? AND name = 'DEVICE_ID'", (dev_id,))
    assert device.agent("check-update").stdout.strip() == "idle"
    assert (device.data / "device.env").read_text() == before


def test_reports_survive_a_server_outage(server: OtaServer, device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    dev_id = onboard(server, device)
    dep = deploy(server, make_artifact(tmp_path, keys["ec"][0])[0], dev_id)
    assert device.agent("check-update").stdout.strip() == "rebooting"
    device.boot()
    server.stop()
    device.check_server = False  # the health check must not need the server for this test
    device.write_config()
    assert device.agent("health").returncode == 0
    assert device.agent("check-update").stdout.strip() in ("offline", "trial", "idle")
    assert device.state()["outbox"] == [{"deployment": dep, "status": "success", "substate": "", "log": False}]
    server.start()
    device.agent("check-update")
    assert stats(server, dep) == {"success": 1}
    assert not device.state().get("outbox")


def test_server_offers_the_delta_to_a_device_on_its_source(server: OtaServer, device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    from .test_agent_local import _delta_pair

    old_art, new_art, delta, new_img = _delta_pair(tmp_path, keys["ec"][0])
    dev_id = onboard(server, device)
    _finish(server, device, deploy(server, old_art, dev_id))  # the device runs the delta's source
    assert "rootfs-delta" in inventory(server, dev_id)["update_modules"]
    assert server.upload_artifact(delta).status == 201  # the delta and the full artifact, same name
    dep = deploy(server, new_art, dev_id)
    assert device.agent("check-update").stdout.strip() == "rebooting"
    log = (device.data / "logs" / f"{dep}.jsonl").read_text()  # the device's own log of the deployment
    assert f"downloading {delta.stat().st_size} bytes" in log, log
    assert device.boot() == 2 and device.verdict().returncode == 0
    device.agent("check-update")
    assert stats(server, dep) == {"success": 1}
    data = new_img.read_bytes()
    assert device.slot_path(2).read_bytes()[: len(data)] == data


def test_after_a_failed_delta_the_retry_gets_the_full_artifact(server: OtaServer, device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    from .test_agent_local import _delta_pair

    old_art, new_art, delta, new_img = _delta_pair(tmp_path, keys["ec"][0])
    dev_id = onboard(server, device)
    _finish(server, device, deploy(server, old_art, dev_id))  # the device runs the delta's source
    with open(device.slot_path(3), "r+b") as f:  # the running image changed in place
        f.seek(4096 * 3)
        f.write(b"edited on the device" * 200)
    assert server.upload_artifact(delta).status == 201
    dep = deploy(server, new_art, dev_id)
    assert device.agent("check-update").stdout.strip() == "failure"
    assert "source" in device_log(server, dep, dev_id)
    device.agent("check-update")  # inventory goes out again at once
    assert "rootfs-delta" not in inventory(server, dev_id)["update_modules"]
    resp = server.send_json("POST", f"{MGMT}/v1/deployments/deployments",
                            {"name": "retry", "artifact_name": new_art.stem, "devices": [dev_id]})
    assert resp.status == 201, resp
    retry = resp.headers["location"].rstrip("/").rsplit("/", 1)[-1]
    assert device.agent("check-update").stdout.strip() == "rebooting"
    log = (device.data / "logs" / f"{retry}.jsonl").read_text()
    assert f"downloading {new_art.stat().st_size} bytes" in log, "the retry must get the full artifact"
