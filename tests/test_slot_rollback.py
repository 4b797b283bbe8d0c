"""Instant rollback on the device (device_hooks/slot_rollback.py): the real agent against the scripted server of
tests/hostile_server.py, on a file-backed device. A rollback deployment's ``next`` carries ``vv_rollback.header_uri``;
when the inactive slot still holds the release, the agent verifies the header, checks the slot against it and
re-arms it without downloading anything; otherwise it downloads as usual. The attack stories (a header the device
must not accept) are told in the style of tests/test_attacks_device.py and end with the same checks
(:func:`untouched`)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifacts.reader import header_part_size
from device_hooks.slot_rollback import ext4_size

from .agent_device import FileDevice
from .hostile_server import hostile_server
from .test_agent_local import make_artifact
from .test_attacks_device import Scene, new_id, reported_failure, snapshot, untouched

HEADER = "/hdr"
DOWNLOAD = "/dl/artifact.mender"


@pytest.fixture(name="scene")
def scene_fixture(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> Iterator[Scene]:
    """tests/test_attacks_device.py's scene: a device that ran before, a scripted server, a victim directory."""
    with hostile_server() as server:
        device = FileDevice(tmp_path / "dev", server.url, [keys["ec"][1]], check_server=False)
        (tmp_path / "victim" / "sub").mkdir(parents=True)
        (tmp_path / "victim" / "sub" / "precious").write_text("do not delete\n")
        (tmp_path / "marks").mkdir()
        s = Scene(device, server, tmp_path / "victim", tmp_path / "marks", tmp_path, keys)
        assert s.poll().startswith("idle")
        yield s


def header_of(artifact: bytes) -> bytes:
    return artifact[:header_part_size(io.BytesIO(artifact))]


def running(s: Scene, name: str = "vv-2.0.0", version: str = "2.0.0", security_version: int = 0) -> None:
    """The device runs ``name`` in slot A (the release the fleet is rolled back from)."""
    s.device.artifact_name, s.device.version, s.device.security_version = name, version, security_version
    s.device.write_config()


def kept(s: Scene, name: str = "vv-1.5.0", version: str = "1.5.0", *, key: str = "ec",
         security_version: int | None = None, record_size: bool = True, payload: Path | None = None) -> bytes:
    """Slot B holds ``name`` and the agent's record says so (as after the agent installed it): returns the
    artifact. Its state scripts leave marks, so an attack story can check that none ran."""
    scripts = {f"Artifact{st}_{a}_01_mark": f"#!/bin/sh\ntouch {s.marks}/{st}_{a}\n"
               for st in ("Install", "Reboot", "Failure") for a in ("Enter", "Leave", "Error")}
    out = s.tmp / f"kept-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    art, image = make_artifact(out, s.keys[key][0], name=name, version=version, scripts=scripts,
                               security_version=security_version, payload=payload, seed=15)
    data = image.read_bytes()
    with open(s.device.slot_path(3), "r+b") as f:
        f.write(data)
    record = {"artifact_name": name, "provides": {"artifact_name": name, "rootfs-image.version": version,
                                                  "rootfs-image.checksum": hashlib.sha256(data).hexdigest()}}
    if record_size:
        record["size"] = len(data)
    (s.device.data / "slots.json").write_text(json.dumps({"3": record}))
    return art.read_bytes()


def offer(s: Scene, name: str = "vv-1.5.0", header: bytes | None = None, artifact: bytes | None = None) -> str:
    """The server's rollback deployment of ``name``: the full artifact behind the download link, the header
    behind the hint's link."""
    dep = new_id()
    if artifact is not None:
        s.server.files[DOWNLOAD] = artifact
    if header is not None:
        s.server.files[HEADER] = header
    s.server.next = s.server.deployment(dep, name, allow_downgrade=True,
                                        vv_rollback={"header_uri": s.server.url + HEADER})
    return dep


def downloads(s: Scene) -> list[str]:
    return [r for r in s.server.requests if r.startswith("GET /dl/")]


def marks(s: Scene) -> set[str]:
    return {p.name for p in s.marks.iterdir()}


def test_slot_that_still_holds_the_release_is_rearmed_without_a_download(scene: Scene) -> None:
    s = scene
    running(s)
    art = kept(s)
    dep = offer(s, header=header_of(art), artifact=art)
    slot_b = s.device.slot_path(3).read_bytes()
    out = s.poll()
    assert out.startswith("rebooting"), out
    assert downloads(s) == [], "the server saw no download request"
    assert f"GET {HEADER}" in s.server.requests
    assert [b["status"] for b in s.server.status_of(dep)] == ["installing", "rebooting"]
    assert s.device.slot_path(3).read_bytes() == slot_b, "nothing was written to the slot"
    env = s.device.bootenv.read()
    assert (env["mender_boot_part"], env["upgrade_available"], env["bootcount"]) == ("3", "1", "0")
    assert {"Install_Enter", "Install_Leave", "Reboot_Enter"} <= marks(s), "the header's scripts run as in an install"
    # the same trial boot as an install: boot it, the verdict commits, the agent reports success
    assert s.device.boot() == 3
    assert s.device.verdict().returncode == 0
    s.server.next = None
    assert s.poll().startswith("idle")
    assert [b["status"] for b in s.server.status_of(dep)] == ["installing", "rebooting", "success"]


def test_rollback_to_a_slot_this_agent_installed(scene: Scene) -> None:
    """The whole story: an update downloads vv-1.5.0 into slot B and is committed, the next one vv-2.0.0 into
    slot A; the rollback to vv-1.5.0 re-arms slot B (the agent recorded the image's size when it wrote it)."""
    s = scene
    running(s, "vv-1.0.0", "1.0.0")
    for name, version, slot in (("vv-1.5.0", "1.5.0", 3), ("vv-2.0.0", "2.0.0", 2)):
        (s.tmp / name).mkdir()
        art, _ = make_artifact(s.tmp / name, s.keys["ec"][0], name=name, version=version, seed=len(name) + slot)
        s.server.files[DOWNLOAD] = art.read_bytes()
        dep = new_id()
        s.server.next = s.server.deployment(dep, name)
        assert s.poll().startswith("rebooting")
        assert s.device.boot() == slot and s.device.verdict().returncode == 0
        s.server.next = None
        assert s.poll().startswith("idle") and s.server.status_of(dep)[-1]["status"] == "success"
    art = (s.tmp / "vv-1.5.0" / "vv-1.5.0.mender").read_bytes()
    before = len(downloads(s))
    rb = offer(s, header=header_of(art), artifact=art)
    assert s.poll().startswith("rebooting")
    assert len(downloads(s)) == before and s.device.bootenv.read()["mender_boot_part"] == "3"
    assert s.device.boot() == 3 and s.device.verdict().returncode == 0
    s.server.next = None
    assert s.poll().startswith("idle") and s.server.status_of(rb)[-1]["status"] == "success"


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 (e2fsprogs) is not installed")
def test_factory_slot_without_a_size_is_measured_by_its_file_system(scene: Scene) -> None:
    """The image build records the factory slot without a size: the ext4 superblock gives it."""
    s = scene
    tree = s.tmp / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("VERSION=1.5.0\n")
    image = s.tmp / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-b", "4096", str(image), "3M"], check=True,
                   capture_output=True)
    assert ext4_size(image) == image.stat().st_size == 3 * 1024 * 1024
    running(s)
    art = kept(s, payload=image, record_size=False)
    offer(s, header=header_of(art), artifact=art)
    assert s.poll().startswith("rebooting")
    assert downloads(s) == []


def test_overwritten_slot_falls_back_to_the_download(scene: Scene) -> None:
    """The record says slot B holds vv-1.5.0 but an interrupted install overwrote part of it: the checksum tells,
    and the release is downloaded and written as usual."""
    s = scene
    running(s)
    art = kept(s)
    with open(s.device.slot_path(3), "r+b") as f:
        f.seek(4096)
        f.write(b"half of another release")
    dep = offer(s, header=header_of(art), artifact=art)
    assert s.poll().startswith("rebooting")
    assert downloads(s), "the artifact was downloaded"
    assert s.server.status_of(dep)[-1]["status"] == "rebooting"
    assert s.device.bootenv.read()["mender_boot_part"] == "3"
    assert "no longer holds vv-1.5.0" in local_log(s, dep)


def test_record_naming_another_release_or_a_header_that_cannot_be_fetched_falls_back(scene: Scene) -> None:
    s = scene
    running(s)
    art = kept(s, name="vv-1.4.0", version="1.4.0")
    full, _ = make_artifact(s.tmp, s.keys["ec"][0], name="vv-1.5.0", version="1.5.0", seed=3)
    offer(s, header=header_of(full.read_bytes()), artifact=full.read_bytes())
    assert s.poll().startswith("rebooting")
    assert downloads(s) and f"GET {HEADER}" not in s.server.requests, "the header is not even fetched"

    s.device.bootenv.update({"mender_boot_part": "2", "upgrade_available": "0"})  # start again
    (s.device.data / "state.json").unlink()
    art = kept(s)
    s.server.files.pop(HEADER, None)  # 404
    s.server.requests.clear()
    offer(s, artifact=art)
    assert s.poll().startswith("rebooting")
    assert f"GET {HEADER}" in s.server.requests and downloads(s)


def use(s: Scene) -> int:
    """Boot the device and run the slot it boots as a real system does: its root file system is mounted
    read-write, so its superblock changes (mount time and count: bytes 44..55 of the superblock at 1024) and so
    does what the system writes. Returns the partition booted."""
    part = s.device.boot()
    with open(s.device.slot_path(part), "r+b") as f:
        f.seek(1024 + 44)
        f.write(uuid.uuid4().bytes[:12])
        f.seek(3 * 4096)
        f.write(b"journal and /var written by boot " + uuid.uuid4().hex.encode())
    return part


def factory_slot_a(s: Scene, name: str = "vv-1.0.0", version: str = "1.0.0") -> bytes:
    """Slot A as the image build leaves it: an ext4 image of ``name`` and the record image/release.py writes
    for it (no size: the superblock gives it); returns its full artifact."""
    tree = s.tmp / f"tree-{name}"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text(f"VERSION={version}\n")
    image = s.tmp / f"{name}.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-b", "4096", str(image), "3M"], check=True,
                   capture_output=True)
    (s.tmp / name).mkdir()
    art, _ = make_artifact(s.tmp / name, s.keys["ec"][0], name=name, version=version, payload=image)
    with open(s.device.slot_path(2), "r+b") as f:
        f.write(image.read_bytes())
    running(s, name, version)
    record = {"artifact_name": name, "provides": {"artifact_name": name, "rootfs-image.version": version,
                                                  "rootfs-image.checksum": hashlib.sha256(image.read_bytes()).hexdigest()}}
    (s.device.data / "slots.json").write_text(json.dumps({"2": record}))
    return art.read_bytes()


def update(s: Scene, name: str, version: str, slot: int, seed: int) -> None:
    """A normal update: downloaded into ``slot``, booted (and used), committed by the health verdict."""
    (s.tmp / name).mkdir()
    art, _ = make_artifact(s.tmp / name, s.keys["ec"][0], name=name, version=version, seed=seed)
    s.server.files[DOWNLOAD] = art.read_bytes()
    dep = new_id()
    s.server.next = s.server.deployment(dep, name)
    assert s.poll().startswith("rebooting")
    assert use(s) == slot and s.device.verdict().returncode == 0
    s.server.next = None
    assert s.poll().startswith("idle") and s.server.status_of(dep)[-1]["status"] == "success"


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 (e2fsprogs) is not installed")
def test_rollback_to_the_factory_slot_the_device_ran(scene: Scene) -> None:
    """The QEMU fleet's story (qemu_tests/test_fleet.py): a card flashed with v1 boots slot A (mounted
    read-write: the slot no longer hashes to v1's signed checksum), updates to v2 in slot B, commits; the
    rollback to v1 re-arms slot A without a download, because the agent recorded slot A's hash when it left it."""
    s = scene
    v1 = factory_slot_a(s)
    assert use(s) == 2
    update(s, "vv-2.0.0", "2.0.0", 3, seed=21)
    rec = json.loads((s.device.data / "slots.json").read_text())["2"]
    before = len(downloads(s))
    rb = offer(s, "vv-1.0.0", header=header_of(v1), artifact=v1)
    assert s.poll().startswith("rebooting")
    assert len(downloads(s)) == before, f"the rollback downloaded:\n{local_log(s, rb)}"
    assert "as this device left it" in local_log(s, rb)
    assert rec["left_sha256"] == hashlib.sha256(s.device.slot_path(2).read_bytes()[:rec["size"]]).hexdigest()
    assert rec["left_sha256"] != rec["provides"]["rootfs-image.checksum"], "the used slot no longer is the image"
    assert "left_sha256" not in json.loads((s.device.data / "slots.json").read_text())["2"], \
        "the re-armed slot is booted next: its recorded hash no longer holds"
    assert use(s) == 2 and s.device.verdict().returncode == 0
    s.server.next = None
    assert s.poll().startswith("idle") and s.server.status_of(rb)[-1]["status"] == "success"
    # and forward again: slot B (v2, used) was recorded when the device left it
    v2 = (s.tmp / "vv-2.0.0" / "vv-2.0.0.mender").read_bytes()
    fwd = offer(s, "vv-2.0.0", header=header_of(v2), artifact=v2)
    assert s.poll().startswith("rebooting") and len(downloads(s)) == before
    assert s.server.status_of(fwd)[-1]["status"] == "rebooting"


def test_a_used_slot_without_a_record_of_how_it_was_left_downloads_and_says_why(scene: Scene) -> None:
    """A slot the device ran whose state was never recorded (an older agent left it): its hash is not the signed
    image's; the rollback downloads, and the reason is in the deployment's log, on the server too (uploaded with
    the ``downloading`` report, whose substate says it)."""
    s = scene
    running(s, "vv-1.0.0", "1.0.0")
    update(s, "vv-1.5.0", "1.5.0", 3, seed=5)
    update(s, "vv-2.0.0", "2.0.0", 2, seed=6)
    slots = json.loads((s.device.data / "slots.json").read_text())
    del slots["3"]["left_sha256"]
    (s.device.data / "slots.json").write_text(json.dumps(slots))
    art = (s.tmp / "vv-1.5.0" / "vv-1.5.0.mender").read_bytes()
    before = len(downloads(s))
    rb = offer(s, "vv-1.5.0", header=header_of(art), artifact=art)
    assert s.poll().startswith("rebooting")
    assert len(downloads(s)) > before
    reasons = [b.get("substate", "") for b in s.server.status_of(rb) if b["status"] == "downloading"]
    assert reasons and "no record of its content from when the device left it" in reasons[0], reasons
    uploaded = json.dumps([body for dep, body in s.server.logs if dep == rb])
    assert "rollback to vv-1.5.0 downloads it" in uploaded and "booted since it was written" in uploaded
    assert "booted since it was written" in local_log(s, rb)


def test_a_used_slot_changed_after_the_device_left_it_downloads(scene: Scene) -> None:
    s = scene
    running(s, "vv-1.0.0", "1.0.0")
    update(s, "vv-1.5.0", "1.5.0", 3, seed=5)
    update(s, "vv-2.0.0", "2.0.0", 2, seed=6)
    with open(s.device.slot_path(3), "r+b") as f:
        f.seek(8192)
        f.write(b"changed while the device ran slot A")
    art = (s.tmp / "vv-1.5.0" / "vv-1.5.0.mender").read_bytes()
    before = len(downloads(s))
    rb = offer(s, "vv-1.5.0", header=header_of(art), artifact=art)
    assert s.poll().startswith("rebooting") and len(downloads(s)) > before
    assert "recorded when the device left it: it changed since" in local_log(s, rb)


def test_an_interrupted_install_leaves_no_record_that_vouches_for_the_slot(scene: Scene) -> None:
    """Slot B's record says it holds vv-1.5.0 as the device left it; an install into slot B starts writing and
    fails (its payload does not match its signed checksum): the record is gone with the old content, so the
    rollback to vv-1.5.0 downloads rather than re-arming half-written bytes."""
    s = scene
    running(s, "vv-1.0.0", "1.0.0")
    update(s, "vv-1.5.0", "1.5.0", 3, seed=5)
    update(s, "vv-2.0.0", "2.0.0", 2, seed=6)
    assert json.loads((s.device.data / "slots.json").read_text())["3"]["left_sha256"]
    (s.tmp / "bad").mkdir()
    bad, _ = make_artifact(s.tmp / "bad", s.keys["ec"][0], name="vv-3.0.0", version="3.0.0", seed=9)
    data = bytearray(bad.read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF  # in the compressed payload, past the signed header
    s.server.files[DOWNLOAD] = bytes(data)
    dep = new_id()
    s.server.next = s.server.deployment(dep, "vv-3.0.0")
    assert s.poll().startswith("failure")
    assert "3" not in json.loads((s.device.data / "slots.json").read_text())
    art = (s.tmp / "vv-1.5.0" / "vv-1.5.0.mender").read_bytes()
    rb = offer(s, "vv-1.5.0", header=header_of(art), artifact=art)
    s.server.requests.clear()
    assert s.poll().startswith("rebooting")
    assert downloads(s) and f"GET {HEADER}" not in s.server.requests
    assert "slot B holds nothing this agent recorded" in local_log(s, rb)


def local_log(s: Scene, dep: str) -> str:
    return (s.device.data / "logs" / f"{dep}.jsonl").read_text()


# ------------------------------------------------------------------ attack stories: a header the device must refuse

def test_rollback_header_signed_by_an_unknown_key(scene: Scene) -> None:
    """The server points the hint at a header it signed itself (a key the image does not trust), naming the
    release the slot holds: refused before anything changes, and nothing is downloaded."""
    s = scene
    running(s)
    kept(s)
    forged, _ = make_artifact(s.tmp, s.keys["ec2"][0], name="vv-1.5.0", version="1.5.0", seed=15)
    dep = offer(s, header=header_of(forged.read_bytes()))
    before = snapshot(s)
    assert s.poll().startswith("failure")
    untouched(s, before)
    assert "signature" in reported_failure(s, dep) and downloads(s) == []


def test_rollback_header_below_the_security_floor(scene: Scene) -> None:
    """The slot still holds an old release with a known hole; the operator (or a compromised server) rolls
    back to it: the signed security version in its header is below the device's floor, allow_downgrade or not."""
    s = scene
    running(s, security_version=3)
    art = kept(s, security_version=2)
    dep = offer(s, header=header_of(art), artifact=art)
    before = snapshot(s)
    assert s.poll().startswith("failure")
    untouched(s, before)
    assert "below this device's floor 3" in reported_failure(s, dep) and downloads(s) == []


def test_rollback_header_for_another_device_type(scene: Scene) -> None:
    s = scene
    running(s)
    kept(s)
    other, _ = make_artifact(s.tmp, s.keys["ec"][0], name="vv-1.5.0", version="1.5.0", seed=15,
                             device_types=("other-board",))
    dep = offer(s, header=header_of(other.read_bytes()))
    before = snapshot(s)
    assert s.poll().startswith("failure")
    untouched(s, before)
    assert "other-board" in reported_failure(s, dep) and downloads(s) == []


def test_rollback_header_of_another_release(scene: Scene) -> None:
    """The deployment names the release the slot holds; the header behind the hint is another signed release
    (whose image the server hopes is there too): the signed name must be the deployment's."""
    s = scene
    running(s)
    kept(s)
    other, _ = make_artifact(s.tmp, s.keys["ec"][0], name="vv-1.6.0", version="1.6.0", seed=15)
    dep = offer(s, header=header_of(other.read_bytes()))
    before = snapshot(s)
    assert s.poll().startswith("failure")
    untouched(s, before)
    assert "artifact name mismatch" in reported_failure(s, dep)


def test_rollback_header_larger_than_the_cap(scene: Scene) -> None:
    """The header link answers 2 MiB: not read past the 1 MiB cap, refused."""
    s = scene
    running(s)
    art = kept(s)
    dep = offer(s, header=header_of(art) + bytes(2 << 20))
    before = snapshot(s)
    assert s.poll().startswith("failure")
    untouched(s, before)
    assert "larger than" in reported_failure(s, dep) and downloads(s) == []


def test_rollback_hint_that_is_not_a_link(scene: Scene) -> None:
    s = scene
    running(s)
    kept(s)
    dep = new_id()
    s.server.next = s.server.deployment(dep, "vv-1.5.0", vv_rollback={"header_uri": "file:///etc/shadow"})
    before = snapshot(s)
    assert s.poll().startswith("refused")
    untouched(s, before)
    assert "rollback header link" in reported_failure(s, dep)


# ------------------------------------------------------------------ the slot left behind is indexed (issue 19)

def test_the_slot_left_behind_is_indexed_so_the_next_install_does_not_read_it(scene: Scene) -> None:
    """The read that records a left slot's hash also writes its block index (bound to the record by a new
    generation): the next install into that slot uses it instead of reading the slot first. Before, the slot's
    old index described the content as installed, which the first boot changed, so every such install read the
    whole slot and compared."""
    from artifacts.blockwrite import BLOCK_SIZE, block_digest
    from device_hooks.blockindex import parse_index

    s = scene
    factory_slot_a(s)
    assert use(s) == 2
    update(s, "vv-1.5.0", "1.5.0", 3, seed=5)  # into B; A (2), booted and used, is left behind
    rec = json.loads((s.device.data / "slots.json").read_text())["2"]
    ix = parse_index((s.device.data / "blockindex-A.bin").read_bytes())
    assert ix.generation == rec["blockindex"] and ix.checksum == rec["provides"]["rootfs-image.checksum"]
    content = s.device.slot_path(2).read_bytes()[:rec["size"]]
    assert ix.digests == b"".join(block_digest(content[o:o + BLOCK_SIZE]) for o in range(0, len(content), BLOCK_SIZE))
    update(s, "vv-2.0.0", "2.0.0", 2, seed=6)  # into A, with its index
    logs = sorted((s.device.data / "logs").glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    assert "block index of slot A used" in logs[-1].read_text()
    # and B, left behind in turn, is indexed for the install after that; A's old index is gone with its write
    rec_b = json.loads((s.device.data / "slots.json").read_text())["3"]
    assert parse_index((s.device.data / "blockindex-B.bin").read_bytes()).generation == rec_b["blockindex"]


def test_a_left_slot_index_is_dropped_when_the_slot_is_re_armed(scene: Scene) -> None:
    """A re-armed slot is booted next (its blocks change): the rollback removes its index and the generation
    from its record, so no install trusts an index of a slot that ran since."""
    s = scene
    v1 = factory_slot_a(s)
    assert use(s) == 2
    update(s, "vv-2.0.0", "2.0.0", 3, seed=21)
    assert (s.device.data / "blockindex-A.bin").exists()
    rb = offer(s, "vv-1.0.0", header=header_of(v1), artifact=v1)
    assert s.poll().startswith("rebooting"), local_log(s, rb)
    assert not (s.device.data / "blockindex-A.bin").exists()
    assert "blockindex" not in json.loads((s.device.data / "slots.json").read_text())["2"]
