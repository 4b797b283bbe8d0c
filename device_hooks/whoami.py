"""Who this device is: its ``DEVICE_ID`` for the identity script (``/usr/lib/vv-ota/identity``) and its
hostname (``ota-hostname.service``).

Standard library only and no configuration file: it runs early at boot, before the network, and from the
agent. The id is, in this order:

1. ``/data/ota/device_id`` (one line, written by ``build.py provision``), when it is a valid id
   (:mod:`ota_common.deviceid`; an invalid one is reported on stderr and ignored: the device falls back to a
   derived id rather than to none);
2. derived from the board serial (``/proc/device-tree/serial-number``) or else the MAC of the first wired
   interface (:func:`ota_common.deviceid.derived_device_id`).

The identity a provisioned device sends is exactly ``device_id=<ID>``: the provisioning tool preauthorizes
the identity ``{"device_id": ID}`` on the server, and any other attribute would make it another identity. A
generic device also sends ``mac`` and ``serial`` (when present), as before, so an operator can tell it apart.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ota_common.deviceid import derived_device_id, hostname_for, is_device_id

_SKIPPED_INTERFACES = ("lo", "wl", "docker", "veth", "br", "usb")
MAX_READ = 1024


@dataclass(frozen=True)
class Sources:
    """Where the facts are read; ``root`` prefixes them all (a fake tree in tests, ``/`` on the device)."""

    root: Path = Path("/")

    @property
    def device_id_file(self) -> Path:
        return self.root / "data/ota/device_id"

    @property
    def serial_file(self) -> Path:
        return self.root / "proc/device-tree/serial-number"

    @property
    def net_dir(self) -> Path:
        return self.root / "sys/class/net"


def _read(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_READ + 1).decode("utf-8", errors="replace")
    except OSError:
        return None


def provisioned_id(src: Sources) -> str | None:
    """The id in ``device_id`` when there is one and it is valid; an invalid one is reported and ignored."""
    text = _read(src.device_id_file)
    if text is None:
        return None
    value = text.removesuffix("\n")
    if is_device_id(value):
        return value
    print(f"identity: {src.device_id_file}: ignored, not a device id (1-63 characters A-Z a-z 0-9 . _ -, "
          f"starting with a letter or digit): {value[:64]!r}", file=sys.stderr)
    return None


def board_serial(src: Sources) -> str | None:
    text = _read(src.serial_file)
    if text is None:
        return None
    serial = text.replace("\0", "").strip()
    return serial if serial and serial.isprintable() and len(serial) <= 64 else None


def wired_mac(src: Sources) -> str | None:
    """The MAC of the first wired (ARPHRD_ETHER, not wireless, bridge, USB or virtual) interface by name."""
    try:
        devices = sorted(src.net_dir.iterdir())
    except OSError:
        return None
    for dev in devices:
        if dev.name.startswith(_SKIPPED_INTERFACES):
            continue
        if (_read(dev / "type") or "").strip() != "1":
            continue
        mac = (_read(dev / "address") or "").strip()
        if mac:
            return mac
    return None


def device_id(src: Sources) -> str | None:
    return provisioned_id(src) or derived_device_id(board_serial(src), wired_mac(src))


def identity_lines(src: Sources) -> list[str]:
    """The identity script's ``name=value`` lines (see the module docstring)."""
    provisioned = provisioned_id(src)
    if provisioned:
        return [f"device_id={provisioned}"]
    serial, mac = board_serial(src), wired_mac(src)
    derived = derived_device_id(serial, mac)
    lines = [f"device_id={derived}"] if derived else []
    if mac:
        lines.append(f"mac={mac}")
    if serial:
        lines.append(f"serial={serial}")
    return lines


def set_hostname(src: Sources, wait: float = 15.0) -> str | None:
    """Set the kernel hostname from the device id. Without a provisioned id or a serial the MAC decides, and
    early at boot the network driver may not have probed yet: wait up to ``wait`` seconds for it. Returns the
    name set, or None (the image's ``/etc/hostname`` stays)."""
    deadline = time.monotonic() + wait
    ident = device_id(src)
    while ident is None and time.monotonic() < deadline:
        time.sleep(0.5)
        ident = device_id(src)
    if ident is None:
        return None
    name = hostname_for(ident)
    socket.sethostname(name)
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="identity", description="print the device identity (name=value lines)")
    p.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)  # a fake tree, for tests
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--hostname", action="store_true", help="print the hostname made from the device id")
    mode.add_argument("--set-hostname", action="store_true", help="set the kernel hostname from the device id")
    args = p.parse_args(argv)
    src = Sources(args.root)
    if args.set_hostname:
        try:
            name = set_hostname(src)
        except OSError as e:
            print(f"identity: cannot set the hostname: {e.strerror}", file=sys.stderr)
            return 1
        print(f"hostname: {name}" if name else "hostname: no device id yet; /etc/hostname stays", file=sys.stderr)
        return 0
    if args.hostname:
        ident = device_id(src)
        if ident is None:
            print("identity: no device id (no provisioned id, serial number or wired interface)", file=sys.stderr)
            return 1
        print(hostname_for(ident))
        return 0
    for line in identity_lines(src):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
