"""Attack stories: a compromised update server (or whoever sits on the network) against the real agent.

Each test is one attack. The server is :mod:`tests.hostile_server`, the device a file-backed one
(:mod:`tests.agent_device`) running the real ``ota-agent``. Whatever the attack, the same things must hold
afterwards (:func:`untouched`): nothing outside the agent's state directory changed, no state script ran, the
inactive slot and the boot state are as they were, and where the deployment id was valid the device told the
server why it refused.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .agent_device import FileDevice
from .hostile_server import Hostile, hostile_server
from .test_agent_local import make_artifact


@dataclass
class Scene:
    device: FileDevice
    server: Hostile
    victim: Path
    marks: Path
    tmp: Path
    keys: dict[str, tuple[Path, Path]]

    def artifact(self, name: str = "vv-2.0.0", version: str = "2.0.0", *, key: str = "ec", seed: int = 7,
                 security_version: int | None = None, marked: bool = True) -> bytes:
        """A signed, compatible artifact whose every state script leaves a mark (none may run in an attack)."""
        scripts = {f"Artifact{s}_{a}_01_mark": f"#!/bin/sh\ntouch {self.marks}/{s}_{a}\n"
                   for s in ("Install", "Reboot", "Failure") for a in ("Enter", "Leave", "Error")} if marked else {}
        out = self.tmp / f"art-{uuid.uuid4().hex[:8]}"
        out.mkdir()
        art, _ = make_artifact(out, self.keys[key][0], name=name, version=version, scripts=scripts, seed=seed,
                               security_version=security_version)
        return art.read_bytes()

    def poll(self) -> str:
        proc = self.device.agent("check-update")
        return proc.stdout.strip() + "\n" + proc.stderr


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def snapshot(s: Scene) -> dict[str, str]:
    """Everything an attack must not change: the slots, the boot state, the victim directory."""
    d = s.device
    return {"slot A": hashlib.sha256(d.slot_path(2).read_bytes()).hexdigest(),
            "slot B": hashlib.sha256(d.slot_path(3).read_bytes()).hexdigest(),
            "boot env": _digest(d.root / "boot"), "victim": _digest(s.victim),
            "outside /data": hashlib.sha256(b"".join(p.read_bytes() for p in sorted(d.root.iterdir())
                                                      if p.is_file() and p.name != "reboots")).hexdigest()}


def untouched(s: Scene, before: dict[str, str]) -> None:
    assert snapshot(s) == before
    assert list(s.marks.iterdir()) == [], f"state scripts ran: {[p.name for p in s.marks.iterdir()]}"
    assert s.device.reboots() == 0
    assert s.device.state().get("phase") is None


@pytest.fixture
def scene(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> Iterator[Scene]:
    with hostile_server() as server:
        device = FileDevice(tmp_path / "dev", server.url, [keys["ec"][1]], check_server=False)
        victim = tmp_path / "victim"
        (victim / "sub").mkdir(parents=True)
        (victim / "sub" / "precious").write_text("do not delete\n")
        marks = tmp_path / "marks"
        marks.mkdir()
        scene = Scene(device, server, victim, marks, tmp_path, keys)
        assert scene.poll().startswith("idle")  # a device that ran before: its start-up housekeeping is done
        yield scene


def new_id() -> str:
    return str(uuid.uuid4())


def reported_failure(s: Scene, dep_id: str) -> str:
    statuses = s.server.status_of(dep_id)
    assert statuses and statuses[-1]["status"] == "failure", statuses
    return str(statuses[-1].get("substate", ""))


# ------------------------------------------------------------------ the deployment JSON

@pytest.mark.parametrize("bad_id", ["../../../victim", "../../../../victim/sub", "/abs/path", "a" * 300, "",
                                    "6e3a1f0c-1d2b-4c5d-8e9f-0a1b2c3d4e5f/../x", 12345])
def test_deployment_id_used_as_a_path(scene: Scene, bad_id: object) -> None:
    """The id names the log file, the spool and the scripts directory: a path-like id must not reach any."""
    s = scene
    s.server.files["/dl/artifact.mender"] = s.artifact(name="vv-1.0.0", version="1.0.0")  # even the running one
    s.server.next = s.server.deployment(bad_id, "vv-1.0.0")  # type: ignore[arg-type]
    before = snapshot(s)
    out = s.poll()
    assert out.startswith("refused"), out
    assert "is not a UUID" in out or "must be a string" in out
    untouched(s, before)
    assert not any(r.startswith("GET /dl/") for r in s.server.requests), "nothing is downloaded"


def test_unsigned_scripts_never_run_on_a_failed_download(scene: Scene) -> None:
    """The server plants garbage as the artifact; scripts left in the deployment's directory (by anyone) are
    not artifact scripts of a verified header and must not run on the failure path."""
    s = scene
    dep = new_id()
    planted = s.device.data / "scripts" / dep
    planted.mkdir(parents=True)
    (planted / "ArtifactFailure_Enter_01_evil").write_text(f"#!/bin/sh\ntouch {s.marks}/planted\n")
    (planted / "ArtifactFailure_Enter_01_evil").chmod(0o755)
    s.server.files["/dl/artifact.mender"] = b"\x00garbage" * 4096
    s.server.next = s.server.deployment(dep, "vv-2.0.0")
    before = snapshot(s)
    assert s.poll().startswith("failure")
    untouched(s, before)
    assert "artifact" in reported_failure(s, dep)
    assert not planted.exists()


def test_allow_downgrade_as_a_string_is_an_error_not_true(scene: Scene) -> None:
    s = scene
    dep = new_id()
    s.server.files["/dl/artifact.mender"] = s.artifact(name="vv-0.9.0", version="0.9.0")
    s.server.next = s.server.deployment(dep, "vv-0.9.0", allow_downgrade="false")
    before = snapshot(s)
    assert s.poll().startswith("refused")
    untouched(s, before)
    assert "allow_downgrade must be true or false" in reported_failure(s, dep)


@pytest.mark.parametrize("uri", ["file:///etc/shadow", "file:///dev/zero", "ftp://127.0.0.1/a.mender",
                                 "gopher://127.0.0.1/x", "http://user:pw@127.0.0.1/a", "//127.0.0.1/a",
                                 "http://0.0.0.0/a", "http://127.0.0.1/a b"])
def test_download_link_with_another_scheme_or_shape(scene: Scene, uri: str) -> None:
    s = scene
    dep = new_id()
    doc = s.server.deployment(dep, "vv-2.0.0")
    doc["artifact"]["source"]["uri"] = uri
    s.server.next = doc
    before = snapshot(s)
    assert s.poll().startswith("refused")
    untouched(s, before)
    assert "download link" in reported_failure(s, dep)


@pytest.mark.parametrize("target", ["file:///etc/passwd", "http://10.1.2.3/a.mender", "http://192.168.1.1/a",
                                    "http://169.254.169.254/latest/meta-data"])
def test_redirect_to_another_scheme_or_host_class(scene: Scene, target: str) -> None:
    """A loopback server may not send the agent to a file, to the LAN or to a cloud metadata service."""
    s = scene
    dep = new_id()
    s.server.files["/dl/artifact.mender"] = ("redirect", target)
    s.server.next = s.server.deployment(dep, "vv-2.0.0")
    before = snapshot(s)
    assert s.poll().startswith("failure")
    untouched(s, before)
    assert "redirect" in reported_failure(s, dep)


def test_huge_deployment_answer(scene: Scene) -> None:
    s = scene
    s.server.next = b'{"id": "' + b"x" * (2 << 20) + b'"}'
    before = snapshot(s)
    out = s.poll()
    assert out.startswith("refused") and "larger than" in out
    untouched(s, before)


# ------------------------------------------------------------------ the artifact behind a valid deployment

def test_server_swaps_the_artifact_behind_a_valid_deployment(scene: Scene) -> None:
    """The deployment says vv-2.0.0; the server serves another signed, compatible artifact (vv-2.5.0). The
    signed name must be the deployment's: refused after the signature check, before any write or script."""
    s = scene
    dep = new_id()
    s.server.files["/dl/artifact.mender"] = s.artifact(name="vv-2.5.0", version="2.5.0")
    s.server.next = s.server.deployment(dep, "vv-2.0.0")
    before = snapshot(s)
    assert s.poll().startswith("failure")
    untouched(s, before)
    assert "artifact name mismatch" in reported_failure(s, dep)


def test_replay_of_a_finished_deployment(scene: Scene) -> None:
    s = scene
    dep = new_id()
    s.server.files["/dl/artifact.mender"] = s.artifact(name="vv-2.5.0", version="2.5.0")
    s.server.next = s.server.deployment(dep, "vv-2.0.0")
    assert s.poll().startswith("failure")  # finished (refused: name mismatch)
    s.server.files["/dl/artifact.mender"] = s.artifact(name="vv-2.0.0", version="2.0.0")
    before = snapshot(s)
    out = s.poll()
    assert out.startswith("replayed"), out
    untouched(s, before)
    assert not [r for r in s.server.requests[-3:] if r.startswith("GET /dl/")]


def test_security_version_below_the_floor(scene: Scene) -> None:
    """A validly signed old release with a known hole: the server allows the downgrade, the floor does not."""
    s = scene
    s.device.security_version = 3  # the running image's signed security version
    s.device.write_config()
    dep = new_id()
    s.server.files["/dl/artifact.mender"] = s.artifact(name="vv-0.9.0", version="0.9.0", security_version=2)
    s.server.next = s.server.deployment(dep, "vv-0.9.0", allow_downgrade=True)
    before = snapshot(s)
    assert s.poll().startswith("failure")
    untouched(s, before)
    assert "below this device's floor 3" in reported_failure(s, dep)


def test_older_version_at_the_same_security_version_is_an_operator_rollback(scene: Scene) -> None:
    """Going back to an older *version* stays possible for operators (fleet rollback) when its security
    version is not below the floor; without allow_downgrade it is refused."""
    s = scene
    s.device.security_version = 2
    s.device.write_config()
    s.server.files["/dl/artifact.mender"] = s.artifact(name="vv-0.9.0", version="0.9.0", security_version=2,
                                                     marked=False)
    dep = new_id()
    s.server.next = s.server.deployment(dep, "vv-0.9.0")
    assert s.poll().startswith("failure")
    assert "older than the running" in reported_failure(s, dep)
    s.server.next = s.server.deployment(new_id(), "vv-0.9.0", allow_downgrade=True)
    assert s.poll().startswith("rebooting")


def test_artifact_signed_by_a_revoked_key(scene: Scene) -> None:
    """The key is revoked by the image; an older slot without that revocation list cannot un-revoke it."""
    from artifacts import load_verifier

    s = scene
    fp = load_verifier(s.keys["ec"][1]).fingerprint
    s.device.trusted_keys = [s.keys["ec"][1], s.keys["ec2"][1]]
    s.device.__post_init__()
    (s.device.root / "etc/keys.revoked").write_text(f"{fp} old release key\n")
    s.server.next = None
    s.poll()  # the agent records the revocation on /data
    (s.device.root / "etc/keys.revoked").unlink()  # booted into an older image that does not list it
    dep = new_id()
    s.server.files["/dl/artifact.mender"] = s.artifact(key="ec")
    s.server.next = s.server.deployment(dep, "vv-2.0.0")
    before = snapshot(s)
    assert s.poll().startswith("failure")
    untouched(s, before)
    assert "signature" in reported_failure(s, dep)
    assert fp in json.loads((s.device.data / "revoked.json").read_text())["revoked"]


def test_private_key_among_the_trusted_keys_is_ignored(scene: Scene) -> None:
    s = scene
    for p in (s.device.root / "etc/keys").glob("*.pem"):
        p.unlink()
    (s.device.root / "etc/keys/release-0.pem").write_bytes(s.keys["ec"][0].read_bytes())  # a private key
    dep = new_id()
    s.server.files["/dl/artifact.mender"] = s.artifact(key="ec")
    s.server.next = s.server.deployment(dep, "vv-2.0.0")
    before = snapshot(s)
    out = s.poll()
    assert out.startswith("failure") and "private key" in out
    untouched(s, before)
    assert "no trusted release keys" in reported_failure(s, dep)


def test_header_claiming_two_gib(scene: Scene) -> None:
    """A tar entry for header.tar.gz that says it is 2 GiB: refused from its size, nothing read past it."""
    s = scene
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("version", b'{"format":"mender","version":3}'), ("manifest", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    head = bytearray(buf.getvalue()[:-1024])  # without the end-of-archive blocks
    info = tarfile.TarInfo("header.tar.gz")
    info.size = 2 << 30
    head += info.tobuf(format=tarfile.USTAR_FORMAT) + gzip.compress(b"x" * 1000)
    dep = new_id()
    s.server.files["/dl/artifact.mender"] = bytes(head)
    s.server.next = s.server.deployment(dep, "vv-2.0.0")
    before = snapshot(s)
    assert s.poll().startswith("failure")
    untouched(s, before)
    assert reported_failure(s, dep)


# ------------------------------------------------------------------ configuration

@pytest.mark.parametrize("variables, why", [
    ({"LD_PRELOAD": "/data/evil.so"}, "LD_PRELOAD: changes how programs load code"),
    ({"PYTHONWARNINGS": "all:0:antigravity.x:0:0", "BROWSER": "touch /tmp/pwned"}, "BROWSER: changes how"),
    ({"PATH": "/data/bin"}, "PATH: changes how"),
    ({"BASH_ENV": "/data/x"}, "BASH_ENV: changes how"),
    ({"SOMETHING_ELSE": "1"}, "SOMETHING_ELSE: not declared by this image"),
    ({"DVR_IP": "10.0.0.1\nLD_PRELOAD=/data/evil.so"}, "DVR_IP: its value has a newline"),
    ({"DVR_IP": "10.0.0.1\x00"}, "DVR_IP: its value has a newline"),
    ({"dvr_ip": "10.0.0.1"}, "dvr_ip: not a variable name"),
])
def test_configuration_variables_that_would_run_code(scene: Scene, variables: dict[str, str], why: str) -> None:
    """Only names the signed image declares reach device.env; a refusal keeps the last good file and shows in
    the inventory."""
    s = scene
    s.server.configuration = {"DEVICE_ID": "cam-017", "DVR_IP": "10.0.0.5"}
    s.poll()
    env = s.device.data / "device.env"
    good = env.read_text()
    assert good == "DEVICE_ID=cam-017\nDVR_IP=10.0.0.5\n"
    s.server.configuration = {"DEVICE_ID": "cam-018", **variables}
    s.poll()
    assert env.read_text() == good, "the last good configuration stays"
    refused = s.server.last_inventory().get("config_refused", "")
    assert why in refused, refused
    s.server.configuration = {"DEVICE_ID": "cam-019"}
    s.poll()
    assert env.read_text() == "DEVICE_ID=cam-019\n" and "config_refused" not in s.server.last_inventory()


# ------------------------------------------------------------------ found by a review: loops, memory, stuck states

def test_deployment_nested_too_deep_is_refused_not_a_crash_loop(scene: Scene) -> None:
    s = scene
    s.server.next = b"[" * 200_000 + b"]" * 200_000  # under 1 MiB, deeper than any JSON parser goes
    before = snapshot(s)
    for _ in range(2):
        out = s.poll()
        assert out.startswith("refused") and "Traceback" not in out, out
    untouched(s, before)


def test_garbage_content_length_fails_the_deployment_once(scene: Scene) -> None:
    """A download whose Content-Length is not a number: the deployment fails with a report; the next poll does
    not start it again (it used to crash the agent at the same point, forever)."""
    s = scene
    dep = new_id()
    art = s.artifact(marked=False)

    def serve() -> bytes:
        return art

    s.server.files["/dl/artifact.mender"] = serve
    s.server.headers["/dl/artifact.mender"] = {"Content-Length": "12abc"}
    s.server.next = s.server.deployment(dep, "vv-2.0.0")
    out = s.poll()
    assert out.startswith("failure") and "Traceback" not in out, out
    assert s.poll().startswith(("replayed", "idle")), "the failed deployment came back"
    assert s.device.state().get("phase") is None and reported_failure(s, dep)


def test_decompression_bomb_in_an_error_answer(scene: Scene, tmp_path: Path) -> None:
    """A 500 to `next` with a body that gzip would blow up to 1 GiB: read 4 KiB at most, never decompressed
    (the agent's own peak memory stays far below it).

    The peak is measured by GNU time, a small C program that forks and execs the agent: ``wait4`` from this
    process would report the test process's own peak too (Linux carries the forking process's high-water mark
    across ``vfork``/``exec`` into the child's ``ru_maxrss``)."""
    import os
    import subprocess
    import sys

    from .agent_device import REPO

    s = scene
    s.server.raw_next = (500, _gzip_of_zeros(1 << 30), {"Content-Encoding": "gzip"})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rss = tmp_path / "maxrss"
    out = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss), sys.executable, "-m", "device_hooks.cli",
                          "-c", str(s.device.config_path), "check-update"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=s.device.root,
                         check=False).stdout.decode()
    assert out.startswith("offline"), out
    peak_kib = int(rss.read_text().split()[-1])
    assert 0 < peak_kib < 200 * 1024, f"the agent grew to {peak_kib} KiB"


def _gzip_of_zeros(size: int) -> bytes:
    """A gzip stream of ``size`` zero bytes (about 1 MB for 1 GiB), made without holding them."""
    import zlib

    enc = zlib.compressobj(1, zlib.DEFLATED, 31)
    chunk = bytes(16 << 20)
    parts = [enc.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join(parts) + enc.flush()


def test_a_server_that_refuses_every_report_with_401_does_not_spin(scene: Scene) -> None:
    s = scene
    dep = new_id()
    s.server.files["/dl/artifact.mender"] = b"garbage"
    s.server.next = s.server.deployment(dep, "vv-2.0.0")
    s.server.status_code = 401
    auth_before = sum(r.endswith("/auth_requests") for r in s.server.requests)
    out = s.poll()
    assert out.startswith("failure"), out
    auths = sum(r.endswith("/auth_requests") for r in s.server.requests) - auth_before
    assert auths <= 4, f"{auths} authentications in one poll"
    assert s.device.state()["outbox"], "the report stays queued"


def test_a_trial_armed_by_hand_gets_the_proof_of_contact_from_an_idle_poll(scene: Scene) -> None:
    """No deployment of the agent's own (armed with fw_setenv, or its state lost): the ordinary poll still
    leaves poll.json, so the verdict commits instead of rolling back after server_grace."""
    s = scene
    s.device.bootenv.update({"mender_boot_part": "3", "upgrade_available": "1"})
    s.device.boot()
    s.device.check_server = True
    s.device.write_config()
    out = s.poll()
    assert out.startswith("idle"), out
    assert json.loads((s.device.data / "poll.json").read_text())["boot_id"] in (s.device.root / "boot_id").read_text()
    assert s.device.agent("health").returncode == 0
    assert s.device.bootenv.read()["upgrade_available"] == "0"


def test_state_file_keeps_the_previous_agents_layout(scene: Scene) -> None:
    """A trial that rolls back to a slot with the previous agent: that agent reads the same file (flat
    phase/deployment/target_part, one outbox list) and reports the rollback."""
    s = scene
    dep = new_id()
    s.server.files["/dl/artifact.mender"] = s.artifact(marked=False)
    s.server.next = s.server.deployment(dep, "vv-2.0.0")
    assert s.poll().startswith("rebooting")
    state = s.device.state()
    assert (state["phase"], state["target_part"], state["from_part"]) == ("armed", 3, 2)
    assert state["deployment"]["id"] == dep and isinstance(state["outbox"], list)
