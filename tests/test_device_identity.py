"""The device's identity and hostname (device_hooks/whoami.py, run as /usr/lib/vv-ota/identity) against a fake
/data, /proc and /sys tree: a provisioned id wins and is the whole identity, a bad one is ignored, a generic
device derives its id from the board serial or the first wired MAC."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_hooks.identity import identity_data
from device_hooks.whoami import Sources, identity_lines

from .agent_device import REPO


def tree(root: Path, *, device_id: str | bytes | None = None, serial: bytes | None = None,
         nics: dict[str, tuple[str, str]] | None = None) -> Sources:
    """``nics``: name -> (type, address) under sys/class/net."""
    if device_id is not None:
        (root / "data/ota").mkdir(parents=True, exist_ok=True)
        data = device_id if isinstance(device_id, bytes) else device_id.encode()
        (root / "data/ota/device_id").write_bytes(data)
    if serial is not None:
        (root / "proc/device-tree").mkdir(parents=True, exist_ok=True)
        (root / "proc/device-tree/serial-number").write_bytes(serial)
    for name, (kind, addr) in (nics or {}).items():
        d = root / "sys/class/net" / name
        d.mkdir(parents=True)
        (d / "type").write_text(kind + "\n")
        (d / "address").write_text(addr + "\n")
    return Sources(root)


def run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "device_hooks.whoami", "--root", str(root), *args],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


NICS = {"lo": ("772", "00:00:00:00:00:00"), "wlan0": ("1", "b8:27:eb:00:00:01"), "docker0": ("1", "02:42:00:00:00:01"),
        "eth0": ("1", "DC:A6:32:12:34:56"), "eth1": ("1", "dc:a6:32:ff:ff:ff")}


def test_provisioned_device_sends_only_its_device_id(tmp_path: Path) -> None:
    tree(tmp_path, device_id="cam-017\n", serial=b"10000000abcdef12\0", nics=NICS)
    proc = run(tmp_path)
    assert proc.returncode == 0 and proc.stdout == "device_id=cam-017\n", proc
    assert run(tmp_path, "--hostname").stdout == "cam-017\n"
    tree(tmp_path / "dotted", device_id="Site_A.Cam.17")
    assert run(tmp_path / "dotted", "--hostname").stdout == "site-a-cam-17\n"


def test_generic_device_derives_its_id_from_the_serial_then_the_mac(tmp_path: Path) -> None:
    pi = tree(tmp_path / "pi", serial=b"10000000abcdef12\0", nics=NICS)
    assert identity_lines(pi) == ["device_id=pi-10000000abcdef12", "mac=DC:A6:32:12:34:56",
                                  "serial=10000000abcdef12"]
    qemu = tree(tmp_path / "qemu", nics=NICS)
    assert identity_lines(qemu) == ["device_id=mac-dca632123456", "mac=DC:A6:32:12:34:56"]
    assert run(tmp_path / "qemu", "--hostname").stdout == "mac-dca632123456\n"
    nothing = tree(tmp_path / "nothing", nics={"wlan0": ("1", "b8:27:eb:00:00:01")})
    assert identity_lines(nothing) == []
    assert run(tmp_path / "nothing", "--hostname").returncode == 1


@pytest.mark.parametrize("content", [b"../../etc/shadow", b"a" * 300, b"cam 17", b"cam-17\nDVR_IP=1.2.3.4\n", b"",
                                     b"-cam", b"cam-\xff", b"cam\x00"],
                         ids=["dotdot", "300-chars", "space", "two-lines", "empty", "leading-dash", "not-utf8", "nul"])
def test_invalid_provisioned_id_is_reported_and_ignored(tmp_path: Path, content: bytes) -> None:
    """A device_id file that is not an id (a path, 300 characters, a second line) is not sent anywhere: the
    device falls back to its derived id, and the reason is on stderr."""
    tree(tmp_path, device_id=content, nics=NICS)
    proc = run(tmp_path)
    assert proc.returncode == 0
    assert proc.stdout == "device_id=mac-dca632123456\nmac=DC:A6:32:12:34:56\n"
    assert "device_id: ignored, not a device id" in proc.stderr


def test_the_agent_reads_the_script_through_its_identity_contract(tmp_path: Path) -> None:
    """The real shell wrapper of the image runs the module; the agent parses what it prints."""
    tree(tmp_path, device_id="cam-017")
    script = tmp_path / "identity"
    wrapper = (REPO / "layers/ota/files/identity").read_text()
    assert "-m device_hooks.whoami" in wrapper
    script.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -P -m device_hooks.whoami "
                      f"--root {tmp_path}\n")
    script.chmod(0o755)
    assert identity_data(str(script)) == {"device_id": "cam-017"}
