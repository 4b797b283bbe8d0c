"""A device made of files, for host tests of the real agent: two slot files, the two boot-environment files
(libubootenv layout), a kernel command line, a boot id, the agent's configuration and ``/data``.

:meth:`FileDevice.boot` stands in for U-Boot's ``boot.scr`` (the real script is tested under QEMU in
test_boot_script.py): with ``upgrade_available=1`` it counts the attempt, rolls back past ``bootlimit``, and
then "boots" the chosen slot by rewriting the command line and the boot id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_hooks.bootenv import INITIAL_STATE, BootEnv

REPO = Path(__file__).resolve().parent.parent
DISK_ID = "0a1b2c3d"


@dataclass
class FileDevice:
    root: Path
    server_url: str
    trusted_keys: list[Path]
    device_type: str = "test-board"
    artifact_name: str = "vv-1.0.0"
    version: str = "1.0.0"
    slot_size: int = 8 * 1024 * 1024
    hooks: dict[str, str] = field(default_factory=dict)
    extra_config: str = ""
    check_server: bool = True
    config_variables: tuple[str, ...] = ("DEVICE_ID", "DVR_IP")
    security_version: int = 0
    ca_file: str = ""
    fault_injection: bool = True  # a test image: OTA_AGENT_FAULT is honoured
    device_id: str = ""  # a provisioned device: its identity is {"device_id": ...}
    required_config: tuple[str, ...] = ()  # [health] required_config, with the image's placeholders:
    config_placeholders: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        r = self.root
        for d in ("boot", "data/ota", "etc/keys", "health.d", "inventory.d"):
            (r / d).mkdir(parents=True, exist_ok=True)
        for part in (2, 3):
            slot = self.slot_path(part)
            if not slot.exists():
                with open(slot, "wb") as f:
                    f.write(f"slot {part} original content\n".encode() * 1000)
                    f.truncate(self.slot_size)
        (r / "fw_env.config").write_text(f"{r}/boot/uboot.env.a 0x0 0x4000\n{r}/boot/uboot.env.b 0x0 0x4000\n")
        if not (r / "boot/uboot.env.a").exists():
            self.bootenv.create(INITIAL_STATE)
        if not (r / "cmdline").exists():
            self._set_running(2, trial=False)
        (r / "data/ota/device_type").write_text(f"device_type={self.device_type}\n")
        ident = r / "identity"
        if self.device_id:  # what a provisioned device's identity script prints: the id only
            ident.write_text(f"#!/bin/sh\necho device_id={self.device_id}\n")
        else:
            ident.write_text(f"#!/bin/sh\necho mac=02:00:00:{uuid.uuid4().hex[:2]}:00:01\necho serial=test-{r.name}\n")
        ident.chmod(0o755)
        for i, key in enumerate(self.trusted_keys):
            (r / "etc/keys" / f"release-{i}.pem").write_bytes(key.read_bytes())
        (r / "reboot").write_text(f"#!/bin/sh\necho reboot >> {r}/reboots\n")
        (r / "reboot").chmod(0o755)
        for name, body in self.hooks.items():
            self.add_hook(name, body)
        if self.fault_injection:
            (r / "fault-injection").touch()
        self.write_config()

    # -- layout
    def slot_path(self, part: int) -> Path:
        return self.root / f"slot{'AB'[part - 2]}.img"

    @property
    def config_path(self) -> Path:
        return self.root / "ota.conf"

    @property
    def bootenv(self) -> BootEnv:
        return BootEnv([self.root / "boot/uboot.env.a", self.root / "boot/uboot.env.b"])

    @property
    def data(self) -> Path:
        return self.root / "data/ota"

    def add_hook(self, name: str, body: str) -> None:
        hook = self.root / "health.d" / name
        hook.write_text(body)
        hook.chmod(0o755)

    def write_config(self) -> None:
        r = self.root
        self.config_path.write_text(f"""
[server]
url = {self.server_url}
insecure_http = {'yes' if self.server_url.startswith('http://') else 'no'}
ca_file = {self.ca_file}
poll_interval = 1
retry_interval = 0.2
inventory_interval = 0
request_timeout = 10
download_retry_timeout = 60

[device]
artifact_name = {self.artifact_name}
version = {self.version}
security_version = {self.security_version}
config_variables = {' '.join(self.config_variables)}
device_type_file = {r}/data/ota/device_type
identity_command = {r}/identity
inventory_dir = {r}/inventory.d

[paths]
trusted_keys = {r}/etc/keys
state_dir = {r}/data/ota
fw_env_config = {r}/fw_env.config
cmdline = {r}/cmdline
boot_id = {r}/boot_id
slot_a = {self.slot_path(2)}
slot_b = {self.slot_path(3)}
journal_dir = {r}/journal
data_mount = {r}/data
device_env = {r}/data/ota/device.env
local_config = {r}/data/ota/ota.conf
agent_env = {r}/data/ota/agent.env
fault_injection = {r}/fault-injection
revoked_keys = {r}/etc/keys.revoked
provisioned_env = {r}/data/ota/provisioned.env
device_cert = {r}/data/ota/device-cert.pem
authorized_keys = {r}/data/ota/authorized_keys

[health]
units =
url =
hooks_dir = {r}/health.d
hook_timeout = 10
deadline = 2
server_grace = 2
retry_interval = 0.5
check_data_mount = no
check_server = {'yes' if self.check_server else 'no'}
app_env = {r}/app.env
required_config = {' '.join(self.required_config)}
config_placeholders = {' '.join(f"{k}={v}" for k, v in self.config_placeholders.items())}

[commands]
reboot = {r}/reboot
restart_on_config =
script_retry_interval = 0.2
script_retry_timeout = 5
{self.extra_config}
""")

    # -- U-Boot and power
    def _set_running(self, part: int, *, trial: bool) -> None:
        slot = "AB"[part - 2]
        (self.root / "cmdline").write_text(
            f"root=PARTUUID={DISK_ID}-0{part} rootfstype=ext4 rootwait rw panic=10 ota.slot={slot} ota.trial={int(trial)}\n")
        (self.root / "boot_id").write_text(str(uuid.uuid4()) + "\n")

    def boot(self) -> int:
        """What boot.scr does at power-on; returns the partition booted."""
        env = self.bootenv.read()
        part = 3 if env.get("mender_boot_part") == "3" else 2
        upgrade = env.get("upgrade_available") == "1"
        if upgrade:
            count = int(env.get("bootcount", "0") or 0) + 1
            changes = {"bootcount": str(count)}
            if count > int(env.get("bootlimit", "1") or 1):
                part = 5 - part
                changes.update(mender_boot_part=str(part), upgrade_available="0")
                upgrade = False
            self.bootenv.update(changes)
        self._set_running(part, trial=upgrade)
        return part

    @property
    def running(self) -> int:
        text = (self.root / "cmdline").read_text()
        return 3 if f"{DISK_ID}-03" in text else 2

    def reboots(self) -> int:
        try:
            return len((self.root / "reboots").read_text().splitlines())
        except FileNotFoundError:
            return 0

    # -- the agent, as a process
    def agent(self, *args: str, fault: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("OTA_AGENT_FAULT", None)
        if fault:
            env["OTA_AGENT_FAULT"] = fault
        return subprocess.run([sys.executable, "-m", "device_hooks.cli", "-c", str(self.config_path), *args],
                              capture_output=True, text=True, env=env, timeout=timeout, cwd=self.root)

    def verdict(self) -> subprocess.CompletedProcess[str]:
        """What the trial boot's units do: the agent polls the server (the verdict needs that proof of
        contact, ``poll.json``), then the health verdict runs."""
        poll = self.agent("check-update")
        assert poll.stdout.strip() in ("trial", "trial-ended"), poll.stdout + poll.stderr
        return self.agent("health")

    def state(self) -> dict[str, Any]:
        try:
            value: dict[str, Any] = json.loads((self.data / "state.json").read_text())
            return value
        except FileNotFoundError:
            return {}

    def public_key_pem(self) -> str:
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key((self.data / "device-key.pem").read_bytes(), None)
        return key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo).decode()
