"""The grammar of a device's identity: its ``DEVICE_ID`` and the hostname made from it.

Standard library only: the device runs it (identity script, hostname unit, agent) as well as the host tools
(``build.py provision``) and the update server. Match with ``fullmatch`` (``$`` also matches before a trailing
newline).

- ``DEVICE_ID``: 1-63 characters ``A-Z a-z 0-9 . _ -``, starting with a letter or digit (an Ansible host name,
  a serial number, ``mac-525400123456``).
- hostname: the id lower-cased, ``.`` and ``_`` turned into ``-``, leading/trailing ``-`` dropped: one RFC 1123
  label, so it is also a valid DNS name.
"""

from __future__ import annotations

import re

DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
#: the identity attribute (in the auth request's ``id_data``) that carries the device id
IDENTITY_KEY = "device_id"


def is_device_id(value: object) -> bool:
    return isinstance(value, str) and DEVICE_ID_RE.fullmatch(value) is not None


def hostname_for(device_id: str) -> str:
    """The hostname of the device ``device_id``. Raises ValueError for an id outside the grammar."""
    if not is_device_id(device_id):
        raise ValueError(f"not a device id: {device_id!r} (1-63 characters A-Z a-z 0-9 . _ -, starting with a "
                         "letter or digit)")
    name = re.sub(r"[._]", "-", device_id.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    assert HOSTNAME_RE.fullmatch(name), name
    return name


def derived_device_id(serial: str | None, mac: str | None) -> str | None:
    """The id of a device that was not provisioned: ``pi-<serial>`` from the board's serial number (Raspberry
    Pi: ``/proc/device-tree/serial-number``), else ``mac-<12 hex digits>`` from the first wired interface; None
    when neither is usable."""
    if serial:
        s = serial.strip().strip("\0").lower()
        s = re.sub(r"^0+(?=[0-9a-f])", "", s) if re.fullmatch(r"[0-9a-f]{8,32}", s) else s
        if re.fullmatch(r"[0-9a-z]{1,32}", s) and s.strip("0"):
            return f"pi-{s}"
    if mac:
        m = mac.strip().lower()
        if re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", m) and m != "00:00:00:00:00:00":
            return "mac-" + m.replace(":", "")
    return None
