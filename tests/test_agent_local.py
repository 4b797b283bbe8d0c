"""The update agent on a file-backed device, without a server (``ota-agent install``): verification before any
write, the streaming install, arming, health verdict, rollbacks, state scripts and power cuts at each step."""

from __future__ import annotations

import gzip
import hashlib
import random
from pathlib import Path

import pytest

from artifacts import Compression, load_signer
from artifacts.writer import rootfs_image_spec, write_artifact
from device_hooks.faults import EXIT_CODE

from .agent_device import FileDevice
from .tampering import inner_tar, members, pack, replace

UNREACHABLE = "http://127.0.0.1:9"  # nothing listens on the discard port


def flip_payload_byte(art: Path, payload: Path) -> None:
    """A valid container whose rootfs image differs from the signed manifest in one byte (in the middle)."""
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x01
    items = members(art)
    packed = gzip.compress(inner_tar((payload.name, bytes(data))))
    pack(art, replace(items, "data/0000.tar.gz", packed))


def make_rootfs(path: Path, size: int = 3 * 1024 * 1024, seed: int = 7) -> Path:
    rng = random.Random(seed)
    blocks = [rng.randbytes(4096) if rng.random() < 0.5 else bytes(4096) for _ in range(size // 4096)]
    path.write_bytes(b"".join(blocks))
    return path


def make_artifact(tmp: Path, key: Path | None, *, name: str = "vv-2.0.0", version: str = "2.0.0",
                  device_types: tuple[str, ...] = ("test-board",), scripts: dict[str, str] | None = None,
                  payload: Path | None = None, seed: int = 7,
                  security_version: int | None = None) -> tuple[Path, Path]:
    payload = payload or make_rootfs(tmp / f"{name}.ext4", seed=seed)
    script_paths = []
    for sname, body in (scripts or {}).items():
        p = tmp / "scripts" / name / sname
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(body)
        p.chmod(0o755)
        script_paths.append(p)
    out = tmp / f"{name}.mender"
    write_artifact(rootfs_image_spec(file=payload, name=name, device_types=list(device_types),
                                     software_version=version, scripts=script_paths,
                                     security_version=security_version),
                   out, compression=Compression.GZIP, signer=load_signer(key) if key else None)
    return out, payload


@pytest.fixture
def device(tmp_path: Path, keys) -> FileDevice:  # type: ignore[no-untyped-def]
    return FileDevice(tmp_path / "dev", UNREACHABLE, [keys["ec"][1]], check_server=False)


def snapshot(dev: FileDevice) -> tuple[str, bytes, bytes, bytes]:
    env = dev.root / "boot"
    return (hashlib.sha256(dev.slot_path(3).read_bytes()).hexdigest(), (env / "uboot.env.a").read_bytes(),
            (env / "uboot.env.b").read_bytes(), dev.slot_path(2).read_bytes()[:4096])


def test_install_arm_trial_commit(device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    art, payload = make_artifact(tmp_path, keys["ec"][0])
    slot_a = device.slot_path(2).read_bytes()
    proc = device.agent("install", str(art))
    assert proc.returncode == 0, proc.stderr
    assert "armed" in proc.stdout
    env = device.bootenv.read()
    assert (env["mender_boot_part"], env["upgrade_available"], env["bootcount"]) == ("3", "1", "0")
    data = payload.read_bytes()
    assert device.slot_path(3).read_bytes()[: len(data)] == data
    assert device.slot_path(2).read_bytes() == slot_a, "the running slot was touched"
    assert device.boot() == 3
    assert device.bootenv.read()["bootcount"] == "1"
    proc = device.agent("health")
    assert proc.returncode == 0, proc.stderr
    env = device.bootenv.read()
    assert (env["mender_boot_part"], env["upgrade_available"]) == ("3", "0")
    assert device.boot() == 3 and device.boot() == 3, "a committed slot must stay"
    show = device.agent("show")
    assert '"artifact_name": "vv-2.0.0"' in show.stdout and '"running_slot": "B"' in show.stdout


BAD = ["tampered", "truncated", "wrong-key", "unsigned", "foreign-device", "older", "too-large", "bad-signature"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_artifact_changes_nothing(device: FileDevice, tmp_path: Path, keys, kind: str) -> None:  # type: ignore[no-untyped-def]
    key = keys["ec"][0]
    if kind == "wrong-key":
        key = keys["ec2"][0]
    elif kind == "unsigned":
        key = None
    kw: dict = {}
    if kind == "foreign-device":
        kw["device_types"] = ("raspberrypi4",)
    elif kind == "older":
        kw.update(name="vv-0.9.0", version="0.9.0")
    elif kind == "too-large":
        kw["payload"] = make_rootfs(tmp_path / "big.ext4", size=device.slot_size + 4096)
    art, payload = make_artifact(tmp_path, key, **kw)
    if kind == "tampered":
        flip_payload_byte(art, payload)
    elif kind == "truncated":
        art.write_bytes(art.read_bytes()[: art.stat().st_size * 2 // 3])
    elif kind == "bad-signature":
        blob = bytearray(art.read_bytes())
        i = blob.index(b"manifest.sig") + 512 + 10  # inside the base64 signature
        blob[i] = ord("A") if blob[i] != ord("A") else ord("B")
        art.write_bytes(bytes(blob))
    before = snapshot(device)
    proc = device.agent("install", str(art))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout.strip() == "failure"
    expected = {"tampered": "checksum", "truncated": "truncated", "wrong-key": "signature", "unsigned": "not signed",
                "foreign-device": "raspberrypi4", "older": "older", "too-large": "holds only",
                "bad-signature": "signature"}[kind]
    assert expected in proc.stderr.lower(), proc.stderr
    assert "untouched" in proc.stderr
    after = snapshot(device)
    assert after[1:] == before[1:], "boot state or running slot changed"
    if kind not in ("tampered", "truncated", "too-large"):  # refused before the first byte was written
        assert after[0] == before[0], "inactive slot written before the artifact was accepted"
    assert device.boot() == 2 and device.state().get("phase") is None


def test_older_artifact_with_explicit_downgrade(device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    art, _ = make_artifact(tmp_path, keys["ec"][0], name="vv-0.9.0", version="0.9.0")
    proc = device.agent("install", "--allow-downgrade", str(art))
    assert proc.returncode == 0, proc.stderr
    assert device.bootenv.read()["mender_boot_part"] == "3"


def test_failed_health_check_rolls_back(device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    device.add_hook("10-camera", "#!/bin/sh\necho camera stream missing >&2\nexit 3\n")
    art, _ = make_artifact(tmp_path, keys["ec"][0])
    assert device.agent("install", str(art)).returncode == 0
    assert device.boot() == 3
    proc = device.agent("health")
    assert proc.returncode == 2
    assert "camera stream missing" in proc.stderr
    env = device.bootenv.read()
    assert (env["mender_boot_part"], env["upgrade_available"]) == ("2", "0")
    assert device.reboots() == 1
    assert device.boot() == 2
    verdict = (device.data / "health.json").read_text()
    assert '"verdict": "fail"' in verdict and "camera stream missing" in verdict


def test_bootloader_rolls_back_a_slot_that_never_reports(device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    art, _ = make_artifact(tmp_path, keys["ec"][0])
    assert device.agent("install", str(art)).returncode == 0
    assert device.boot() == 3  # attempt 1: hangs, the watchdog resets
    assert device.boot() == 2  # attempt 2 > bootlimit 1: back to A
    env = device.bootenv.read()
    assert (env["mender_boot_part"], env["upgrade_available"]) == ("2", "0")
    # health on the old slot outside a trial: checks only, nothing changes
    assert device.agent("health").returncode == 0
    assert device.bootenv.read()["mender_boot_part"] == "2"


def test_deadline_reboots_a_trial_without_verdict(device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    art, _ = make_artifact(tmp_path, keys["ec"][0])
    assert device.agent("install", str(art)).returncode == 0
    assert device.agent("deadline").returncode == 0 and device.reboots() == 0, "not in a trial yet"
    device.boot()
    proc = device.agent("deadline")
    assert proc.returncode == 1 and device.reboots() == 1
    assert "deadline" in proc.stderr


def test_state_scripts(device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    marks = tmp_path / "marks"
    marks.mkdir()
    scripts = {
        "ArtifactInstall_Enter_01_mark": f"#!/bin/sh\necho install-enter >> {marks}/log\n",
        # exit 21 = retry later: succeeds on the second run
        "ArtifactInstall_Leave_10_retry": f"#!/bin/sh\nif [ -e {marks}/tried ]; then echo leave >> {marks}/log; exit 0; fi\n"
                                          f"touch {marks}/tried; exit 21\n",
        "ArtifactReboot_Enter_01": f"#!/bin/sh\necho reboot-enter >> {marks}/log\n",
        "ArtifactCommit_Enter_01": f"#!/bin/sh\necho commit-enter >> {marks}/log\n",
        "ArtifactCommit_Leave_01": f"#!/bin/sh\necho commit-leave >> {marks}/log\n",
    }
    art, _ = make_artifact(tmp_path, keys["ec"][0], scripts=scripts)
    assert device.agent("install", str(art)).returncode == 0
    device.boot()
    assert device.agent("health").returncode == 0
    assert (marks / "log").read_text().split() == ["install-enter", "leave", "reboot-enter", "commit-enter",
                                                   "commit-leave"]


def test_failing_install_script_refuses_before_writing(device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    scripts = {"ArtifactInstall_Enter_01_check": "#!/bin/sh\necho 'not enough disk for the models' >&2\nexit 1\n",
               "ArtifactFailure_Enter_01": f"#!/bin/sh\ntouch {tmp_path}/failure-ran\n"}
    art, _ = make_artifact(tmp_path, keys["ec"][0], scripts=scripts)
    before = snapshot(device)
    proc = device.agent("install", str(art))
    assert proc.returncode == 1 and "not enough disk for the models" in proc.stderr
    assert snapshot(device) == before
    assert (tmp_path / "failure-ran").exists()


@pytest.mark.parametrize("point", ["install-write", "before-arm", "after-arm"])
def test_power_cut_at_each_step(device: FileDevice, tmp_path: Path, keys, point: str) -> None:  # type: ignore[no-untyped-def]
    art, payload = make_artifact(tmp_path, keys["ec"][0])
    proc = device.agent("install", str(art), fault=point)
    assert proc.returncode == EXIT_CODE, proc.stderr
    # power comes back: U-Boot runs, the agent starts
    booted = device.boot()
    env = device.bootenv.read()
    if point == "after-arm":
        # the boot state was armed: the trial slot boots (and is complete: it was verified before arming)
        assert booted == 3 and env["upgrade_available"] == "1"
        assert device.agent("health").returncode == 0
        assert device.bootenv.read()["upgrade_available"] == "0"
        return
    assert booted == 2 and env["upgrade_available"] == "0", "an unarmed install must not change the boot"
    proc = device.agent("check-update")  # recovers: the interrupted local install is forgotten or re-armed
    if point == "before-arm":
        # armed on /data, the boot state never written, and the power went: the verified slot is armed again
        assert proc.stdout.strip() == "rebooting", proc.stderr
        assert device.boot() == 3
        assert device.agent("health").returncode == 0
        device.agent("check-update")  # the agent in the new slot sees the commit and closes the deployment
        assert device.state().get("phase") is None, device.state()
        return
    assert device.state().get("phase") is None
    proc = device.agent("install", str(art))
    assert proc.returncode == 0, proc.stderr
    assert device.boot() == 3
    assert device.agent("health").returncode == 0
    data = payload.read_bytes()
    assert device.slot_path(3).read_bytes()[: len(data)] == data


def test_restart_after_arming_in_the_same_boot_rearms_and_reboots(device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    art, _ = make_artifact(tmp_path, keys["ec"][0])
    assert device.agent("install", str(art), fault="before-arm").returncode == EXIT_CODE
    assert device.bootenv.read()["upgrade_available"] == "0"
    proc = device.agent("check-update")  # same boot: the agent restarted (crash), not the device
    assert proc.stdout.strip() == "rebooting", proc.stderr
    env = device.bootenv.read()
    assert (env["mender_boot_part"], env["upgrade_available"]) == ("3", "1")
    assert device.reboots() == 1


# (case, a line of the device's ota.conf, what replaces it, what the one error line must say)
CONFIG_ERRORS = [
    ("unknown key", "[health]\n", "[health]\nbogus = 1\n",
     "{conf}: [health] unknown key 'bogus' (known: app_env, check_data_mount, check_server, config_placeholders, config_wait, "
     "deadline, "),
    ("unknown section", "[health]\n", "[bogus]\nx = 1\n[health]\n",
     "{conf}: unknown section [bogus] (known: server, device, paths, health, commands, install)"),
    ("a key twice", "[health]\n", "[health]\ndeadline = 5\n",
     "{conf}: While reading from '{conf}' [line 46]: option 'deadline' in section 'health' already exists"),
    ("a line that is no key", "units =\n", "units\n", "{conf}: Source contains parsing errors"),
    ("not a duration", "deadline = 2\n", "deadline = soon\n",
     "[health] deadline: not a duration: 'soon' (use e.g. 30, 30s, 5m, 2h)"),
    ("not a boolean", "check_data_mount = no\n", "check_data_mount = maybe\n",
     "[health] check_data_mount: not a boolean: 'maybe'"),
    ("not a non-negative integer", "security_version = 0\n", "security_version = -1\n",
     "[device] security_version: not a non-negative integer: '-1'"),
    ("a server URL that is not http(s)", "url = http://127.0.0.1:9\n", "url = ftp://x\n",
     "{conf}: [server] url must be an http(s) URL, got 'ftp://x'"),
]


@pytest.mark.parametrize(("line", "replacement", "message"), [c[1:] for c in CONFIG_ERRORS],
                         ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_are_clear(device: FileDevice, line: str, replacement: str, message: str) -> None:
    """A mistake in ota.conf stops the agent with exit code 2 and one line that names the section and the key
    (and the file, for mistakes found while reading it), never a traceback and never a silent default."""
    text = device.config_path.read_text()
    assert text.count(line) == 1, line
    device.config_path.write_text(text.replace(line, replacement))
    proc = device.agent("show")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert message.format(conf=device.config_path) in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_data_partition_sets_only_where_the_server_is(device: FileDevice, caplog: pytest.LogCaptureFixture) -> None:
    """/data survives signed updates: its ota.conf may say where the server is and how to trust it, nothing the
    signed image decides (keys, commands, paths, health rules, intervals)."""
    from device_hooks.config import load_config

    base = load_config(device.config_path)
    (device.data / "ota.conf").write_text(
        "[server]\nurl = https://10.0.2.2:8123\ntenant_token = t-42\nca_file = /data/ota/ca.pem\npoll_interval = 5m\n"
        "[paths]\ntrusted_keys = /data/evil-keys\n[commands]\nreboot = /data/evil.sh\n")
    cfg = load_config(device.config_path)
    assert (cfg.server.url, cfg.server.tenant_token, cfg.server.ca_file) == ("https://10.0.2.2:8123", "t-42",
                                                                             "/data/ota/ca.pem")
    assert cfg.server.poll_interval == base.server.poll_interval
    assert cfg.paths == base.paths and cfg.commands == base.commands and cfg.health == base.health
    assert "ignored [server] poll_interval, [paths] trusted_keys, [commands] reboot" in caplog.text


def test_agent_env_on_data_sets_only_proxies(device: FileDevice, tmp_path: Path) -> None:
    """agent.env is read by the agent itself (no EnvironmentFile): PYTHONPATH, LD_PRELOAD and friends are
    ignored, and fault injection needs an image built with a test layer."""
    import os

    from device_hooks.config import agent_environment, load_config

    (device.data / "agent.env").write_text("HTTPS_PROXY=http://proxy:3128\nPYTHONPATH=/data/evil\n"
                                           "LD_PRELOAD=/data/evil.so\nOTA_AGENT_FAULT=after-arm\n")
    cfg = load_config(device.config_path)
    environ: dict[str, str] = {}
    ignored = agent_environment(cfg, environ)
    assert environ == {"HTTPS_PROXY": "http://proxy:3128", "OTA_AGENT_FAULT": "after-arm"}  # a test image
    assert ignored == ["PYTHONPATH", "LD_PRELOAD"]
    (device.root / "fault-injection").unlink()  # a production image
    environ = {"OTA_AGENT_FAULT": "after-arm"}  # even from the unit's own environment
    ignored = agent_environment(cfg, environ)
    assert environ == {"HTTPS_PROXY": "http://proxy:3128"}
    assert "OTA_AGENT_FAULT (no fault injection in this image)" in ignored
    art = tmp_path / "none.mender"
    assert os.environ.get("PYTHONPATH", "") != "/data/evil" and not art.exists()


def _delta_pair(tmp: Path, key: Path) -> tuple[Path, Path, Path, Path]:
    """Full artifacts 2.0.0 and 3.0.0 (3.0.0: some blocks moved, changed and added) and the delta between."""
    from artifacts.delta import write_delta_artifact

    old_art, old_img = make_artifact(tmp, key)
    data = bytearray(old_img.read_bytes())
    rng = random.Random(11)
    for _ in range(40):  # changed blocks
        at = rng.randrange(len(data) // 4096) * 4096
        data[at : at + 4096] = rng.randbytes(4096)
    data[4096 * 10 : 4096 * 20], data[4096 * 100 : 4096 * 110] = data[4096 * 100 : 4096 * 110], data[4096 * 10 : 4096 * 20]
    new_img = tmp / "vv-3.0.0.ext4"
    new_img.write_bytes(bytes(data))
    new_art, _ = make_artifact(tmp, key, name="vv-3.0.0", version="3.0.0", payload=new_img)
    delta = tmp / "delta-from-2.0.0.mender"
    write_delta_artifact(old_art, new_art, signer=load_signer(key), out=delta)
    return old_art, new_art, delta, new_img


def test_delta_installs_from_the_running_slot(device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    old_art, _, delta, new_img = _delta_pair(tmp_path, keys["ec"][0])
    assert device.agent("install", str(old_art)).returncode == 0
    assert device.boot() == 3 and device.agent("health").returncode == 0  # 2.0.0 runs from slot B
    device.agent("check-update")  # the agent closes the deployment after the commit
    running = device.slot_path(3).read_bytes()
    proc = device.agent("install", str(delta))
    assert proc.returncode == 0, proc.stderr
    assert "delta applied" in proc.stderr
    assert device.slot_path(3).read_bytes() == running, "the source slot must only be read"
    assert device.boot() == 2 and device.agent("health").returncode == 0
    data = new_img.read_bytes()
    assert device.slot_path(2).read_bytes()[: len(data)] == data
    shown = device.agent("show").stdout
    assert hashlib.sha256(data).hexdigest() in shown  # the slot record provides the new checksum


def test_delta_for_another_source_is_refused_before_any_write(device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    _, _, delta, _ = _delta_pair(tmp_path, keys["ec"][0])
    before = snapshot(device)  # the device runs its factory image, not 2.0.0
    proc = device.agent("install", str(delta))
    assert proc.returncode == 1 and "rootfs-image.checksum" in proc.stderr, proc.stderr
    assert snapshot(device) == before


def test_delta_on_a_modified_source_fails_and_changes_nothing_active(device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    old_art, _, delta, _ = _delta_pair(tmp_path, keys["ec"][0])
    assert device.agent("install", str(old_art)).returncode == 0
    assert device.boot() == 3 and device.agent("health").returncode == 0
    device.agent("check-update")
    with open(device.slot_path(3), "r+b") as f:  # the running root was changed behind the record's back
        f.seek(4096 * 3)
        f.write(b"mounted read-write once" * 100)
    running, env = device.slot_path(3).read_bytes(), device.bootenv.read()
    proc = device.agent("install", str(delta))
    assert proc.returncode == 1 and "source" in proc.stderr, proc.stderr
    assert device.slot_path(3).read_bytes() == running and device.bootenv.read() == env


def test_an_install_into_a_slot_writes_only_the_blocks_that_differ(device: FileDevice, tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    """Issue 19: 2.0.0 into slot B (no index: slot B is read and compared), 3.0.0 into A, then 4.0.0 (2.0.0 with
    two 4 KiB pieces changed) into B again: B's block index from the first install says what it holds, so two
    64 KiB blocks are written; the counters are in the log and the index generation in the slot record."""
    import json

    key = keys["ec"][0]
    art2, img2 = make_artifact(tmp_path, key)
    art3, _ = make_artifact(tmp_path, key, name="vv-3.0.0", version="3.0.0", seed=8)
    data = bytearray(img2.read_bytes())
    data[5 * 65536 : 5 * 65536 + 4096] = random.Random(1).randbytes(4096)
    data[20 * 65536 + 8192 : 20 * 65536 + 12288] = random.Random(2).randbytes(4096)
    img4 = tmp_path / "vv-4.0.0.ext4"
    img4.write_bytes(bytes(data))
    art4, _ = make_artifact(tmp_path, key, name="vv-4.0.0", version="4.0.0", payload=img4)
    for art, slot in ((art2, 3), (art3, 2)):
        proc = device.agent("install", str(art))
        assert proc.returncode == 0, proc.stderr
        assert "block index of slot " in proc.stderr and "not used (missing)" in proc.stderr
        assert device.boot() == slot and device.agent("health").returncode == 0
        device.agent("check-update")
    record = json.loads((device.data / "slots.json").read_text())["3"]
    assert (device.data / "blockindex-B.bin").exists() and len(record["blockindex"]) == 32
    proc = device.agent("install", str(art4))
    assert proc.returncode == 0, proc.stderr
    assert "block index of slot B used" in proc.stderr
    assert f"{2 * 65536} bytes written, 0 zeroed by range" in proc.stderr
    assert device.slot_path(3).read_bytes()[: len(data)] == bytes(data)
    assert device.boot() == 3 and device.agent("health").returncode == 0
