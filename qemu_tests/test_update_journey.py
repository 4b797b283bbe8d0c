"""One device's life (scenarios 6, 1, 2 and 3 of the end-to-end suite), in order, on one booted v1 device:

6. bad artifacts reach it (tampered header, signed by an unknown key, built for another device type): each is
   refused before anything is written; the active slot, the other slot and the boot state are untouched;
1. v1 → v2: download, install into slot B, reboot, health, commit; ``success``; the guest runs v2 from slot B
   and ``/data`` kept its content (and grew to the end of the card on first boot);
2. v2 → 2.1.0 whose application fails its health check: the trial fails, the device rolls back to v2 and
   reports ``failure`` with the health output;
3. v2 → 2.2.0 that cannot boot (the initramfs finds no init and panics): reset, the bootloader exhausts the
   attempt and boots v2 again; the agent reports ``failure``;
7. v2 → 2.3.0 by delta: the server holds the full artifact and ``delta-from-2.0.0`` under one name and offers
   the device the delta (it runs the delta's source); the agent rebuilds 2.3.0 from the running slot, the
   trial commits. (A delta for another source reaching the device is one of scenario 6's refusals.)
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifacts import KeyType, generate_keypair, load_signer, rootfs_image_spec, sign_artifact, write_artifact

from .conftest import NAME, Fleet, Rig, make_rig, timing

pytestmark = [pytest.mark.slow, pytest.mark.qemu]


@pytest.fixture(scope="module")
def rig(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    yield from make_rig(fleet, tmp_path_factory.mktemp("journey"))


def small_artifact(path: Path, name: str, device_type: str, key: Path) -> Path:
    """A signed rootfs-image artifact with 8 MiB of payload: what it must never do is reach the slot."""
    payload = path.with_suffix(".img")
    payload.write_bytes(os.urandom(8 << 20))
    spec = rootfs_image_spec(file=payload, name=name, device_types=[device_type], software_version="9.9.9")
    write_artifact(spec, path, signer=load_signer(key))
    return path


def test_bad_artifacts_are_refused_before_any_write(rig: Rig, tmp_path: Path) -> None:
    """What the server stores is swapped or damaged after its upload checks (a compromised store or a man in
    the middle): the device's own checks must stop it."""
    rogue, _ = generate_keypair(KeyType.ECDSA_P256, tmp_path / "rogue")
    # the active slot is the mounted root (its superblock and journal change as it runs): the boot state and
    # the inactive slot, the only things an install may write, are compared
    before = {"env": rig.boot_env(), "b": rig.slot_digest(3)}
    cases = {}
    # an unknown signing key: the stored artifact is replaced by the same one re-signed
    good = small_artifact(tmp_path / "e2e-rogue.mender", "e2e-rogue", "qemu-virt", rig.fleet.key)
    stored = Path(rig.upload(good))
    sign_artifact(good, stored, load_signer(rogue))
    cases["e2e-rogue"] = "signature"
    # another device type, signed with the right key
    good = small_artifact(tmp_path / "e2e-rpi.mender", "e2e-rpi", "qemu-virt", rig.fleet.key)
    stored = Path(rig.upload(good))
    small_artifact(tmp_path / "e2e-rpi-wrong.mender", "e2e-rpi", "raspberrypi4", rig.fleet.key)
    shutil.copyfile(tmp_path / "e2e-rpi-wrong.mender", stored)
    cases["e2e-rpi"] = "device type"
    # a tampered header: one byte of the stored artifact's header.tar.gz changed (it no longer matches the
    # signed manifest)
    good = small_artifact(tmp_path / "e2e-tampered.mender", "e2e-tampered", "qemu-virt", rig.fleet.key)
    stored = Path(rig.upload(good))
    data = bytearray(stored.read_bytes())
    data[data.index(b"header.tar.gz\x00") + 512 + 20] ^= 0xFF  # 20 bytes into the member's content
    stored.write_bytes(bytes(data))
    cases["e2e-tampered"] = "checksum"
    # a delta made from an image this device does not run (the server would not offer it: swapped in store)
    good = small_artifact(tmp_path / "e2e-delta.mender", "e2e-delta", "qemu-virt", rig.fleet.key)
    shutil.copyfile(rig.fleet.delta("2.3.0", "2.0.0"), rig.upload(good))
    cases["e2e-delta"] = "rootfs-image.checksum"
    for name, reason in cases.items():
        started = time.monotonic()
        mark = rig.vm.mark()
        dep = rig.deploy(name)
        assert rig.follow(dep, {"failure", "success"}, 300) == {"failure": 1}
        timing(f"scenario 6: {name} refused", time.monotonic() - started)
        log = rig.log(dep)
        assert reason in log.lower(), log
        assert "active slot and boot state untouched" in log, log
        assert "ota-boot:" not in rig.vm.console()[mark:], "the device rebooted"
    after = {"env": rig.boot_env(), "b": rig.slot_digest(3)}
    assert after == before, "a refused artifact changed the slots or the boot state"
    assert rig.attrs()["artifact_name"] == f"{NAME}-1.0.0"


def test_update_v1_to_v2_keeps_data(rig: Rig) -> None:
    marker = secrets.token_hex(16)
    rig.sh(f"echo {marker} > /data/e2e-marker && sync")
    data_size = int(rig.sh("df -B1 --output=size /data | tail -1"))
    assert data_size > 400 << 20, f"/data did not grow to the end of the card: {data_size} bytes"
    assert rig.sh("findmnt -no SOURCE /").strip() == "/dev/vda2"
    rig.upload(rig.fleet.artifact("2.0.0"))
    started = time.monotonic()
    times: dict[str, float] = {}
    dep = rig.deploy(f"{NAME}-2.0.0")
    stats = rig.follow(dep, {"success", "failure"}, 1500, lambda s, t: times.setdefault(s, t))
    assert stats == {"success": 1}, rig.log(dep)
    assert times["rebooting"] < times["success"], "success must wait for the health verdict after the reboot"
    timing("scenario 1: v1 → v2 deployment created to success", time.monotonic() - started)
    timing("scenario 1: update downtime (rebooting → success)", times["success"] - times["rebooting"])
    rig.wait_running("2.0.0", "B")
    assert rig.attrs()["rootfs-image.version"] == "2.0.0"
    rig.vm.wait_for_ssh(300)
    assert rig.sh("findmnt -no SOURCE /").strip() == "/dev/vda3", "not running from the other slot"
    assert rig.sh("cat /data/e2e-marker").strip() == marker, "/data lost its content"
    env = rig.boot_env()
    assert (env["mender_boot_part"], env["upgrade_available"]) == ("3", "0"), env
    assert "ota-boot: slot=B part=3 upgrade_available=1 bootcount=1" in rig.vm.console()
    assert "Kernel panic" not in rig.vm.console()


def test_unhealthy_release_rolls_back(rig: Rig) -> None:
    rig.upload(rig.fleet.artifact("2.1.0"))
    started = time.monotonic()
    mark = rig.vm.mark()
    dep = rig.deploy(f"{NAME}-2.1.0")
    assert rig.follow(dep, {"success", "failure"}, 1500) == {"failure": 1}
    timing("scenario 2: v2 → unhealthy 2.1.0 deployment to failure (rolled back)", time.monotonic() - started)
    console = rig.vm.console()[mark:]
    assert "ota-boot: slot=A part=2 upgrade_available=1 bootcount=1" in console  # the trial of slot A
    log = rig.log(dep)
    assert "health check failed on slot A" in log, log
    assert "application health" in log and "503" in log, "the health output is not in the log"
    rig.wait_running("2.0.0", "B")
    rig.vm.wait_for_ssh(300)
    env = rig.boot_env()
    assert (env["mender_boot_part"], env["upgrade_available"]) == ("3", "0"), env


def test_unbootable_release_rolls_back(rig: Rig) -> None:
    rig.upload(rig.fleet.artifact("2.2.0"))
    started = time.monotonic()
    mark = rig.vm.mark()
    dep = rig.deploy(f"{NAME}-2.2.0")
    assert rig.follow(dep, {"success", "failure"}, 1500) == {"failure": 1}
    timing("scenario 3: v2 → unbootable 2.2.0 deployment to failure (rolled back)", time.monotonic() - started)
    console = rig.vm.console()[mark:]
    for line in ("ota-boot: slot=A part=2 upgrade_available=1 bootcount=1",
                 "/sbin/init is missing on the root filesystem",
                 "ota-boot: slot 2 failed 1 attempt(s), rolling back",
                 "ota-boot: slot=B part=3 upgrade_available=0"):
        assert line in console, f"not on the console: {line!r}"
    log = rig.log(dep)
    assert "did not reach a health verdict" in log and "rolled back" in log, log
    rig.wait_running("2.0.0", "B")


def test_delta_update_through_a_server_outage_in_the_trial(rig: Rig) -> None:
    """Scenario 7, v2 → 2.3.0 by delta; the server goes away as the device reboots into the trial and comes
    back 2 minutes later. The local checks pass, the health verdict waits for this slot's agent to reach the
    server (server_grace), then commits: a server outage alone rolls nothing back."""
    full, delta = rig.fleet.artifact("2.3.0"), rig.fleet.delta("2.3.0", "2.0.0")
    assert delta.stat().st_size < full.stat().st_size * 0.05, "a delta for a version bump must be small"
    rig.upload(full)
    rig.upload(delta)
    started = time.monotonic()
    mark = rig.vm.mark()
    times: dict[str, float] = {}
    dep = rig.deploy(f"{NAME}-2.3.0")
    rig.follow(dep, {"rebooting", "success", "failure"}, 1500, lambda s, t: times.setdefault(s, t))
    rig.server.stop()
    down = time.monotonic()
    rig.vm.wait_for("ota-boot: slot=A part=2 upgrade_available=1", 300, since=mark)
    rig.vm.wait_for("waiting up to", 300, since=mark)  # local checks passed; the verdict waits for the server
    time.sleep(max(0.0, 120 - (time.monotonic() - down)))
    rig.server.start()
    timing("scenario 7: server outage during the trial boot", time.monotonic() - down)
    stats = rig.follow(dep, {"success", "failure"}, 900, lambda s, t: times.setdefault(s, t))
    assert stats == {"success": 1}, rig.log(dep)
    timing(f"scenario 7: v2 → 2.3.0 by delta ({delta.stat().st_size / 1e6:.1f} MB instead of "
           f"{full.stat().st_size / 1e6:.0f} MB), deployment to success", time.monotonic() - started)
    console = rig.vm.console()[mark:]
    assert f"downloading {delta.stat().st_size} bytes" in console, "the device did not get the delta"
    assert "delta applied" in console
    assert "rolling back" not in console and "slot A committed" in console
    rig.wait_running("2.3.0", "A")
