"""Power-cut simulation for tests. Unset in production; checking costs a dictionary lookup.

``OTA_AGENT_FAULT`` is a comma-separated list of fault specs, each ``[stall:]<point>[@<bytes>]``:

- ``<point>``: the process dies there, as abruptly as a power cut would stop it (``os._exit``: no cleanup,
  no flush beyond what was already fsynced);
- ``stall:<point>``: the process prints ``fault: stalled at <point>`` on stderr (the serial console on a
  device) and stops there forever, so that a test harness can pull the plug of the whole machine at exactly
  that moment (QEMU killed: the kernel's dirty pages are lost too);
- ``@<bytes>`` (``install-write`` only): fire once at least that many bytes of the slot are written.

When ``OTA_AGENT_FAULT_ONCE`` names a file, each spec fires once: it is recorded there (fsynced) before it
fires, so the agent that starts after the cut carries on (the harness chains several cuts in one run).

Points: ``download-started``, ``install-write``, ``before-arm``, ``arm-write`` (the arming copy of the boot
environment torn: its new CRC and flags written, its variables not), ``after-arm``, ``commit-write`` (the
committing copy torn), ``after-commit`` (the commit is in the boot environment, the verdict not yet on
/data), ``rollback-write``, ``bootenv-write`` (any other boot-environment write).
"""

from __future__ import annotations

import os
import time

EXIT_CODE = 99


def _specs() -> list[str]:
    value = os.environ.get("OTA_AGENT_FAULT", "")
    return [s.strip() for s in value.split(",") if s.strip()]


def _fired(spec: str) -> bool:
    path = os.environ.get("OTA_AGENT_FAULT_ONCE")
    if not path:
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return spec in f.read().split("\n")
    except FileNotFoundError:
        return False


def _record(spec: str) -> None:
    path = os.environ.get("OTA_AGENT_FAULT_ONCE")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{spec}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def fault(point: str, progress: int | None = None) -> None:
    if "OTA_AGENT_FAULT" not in os.environ:
        return
    for spec in _specs():
        mode, _, rest = spec.rpartition(":")
        name, _, at = rest.partition("@")
        if name != point or (at and (progress is None or progress < int(at))) or _fired(spec):
            continue
        _record(spec)
        if mode == "stall":
            os.write(2, f"fault: stalled at {point}\n".encode())
            while True:
                time.sleep(3600)
        os.write(2, f"fault injected at {point}\n".encode())
        os._exit(EXIT_CODE)
