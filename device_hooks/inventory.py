"""What the device tells the server about itself (inventory), and what it takes from it (configuration
variables, checked against what the signed image declares: :mod:`.envvars`)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import envvars
from .config import Config
from .state import atomic_write

log = logging.getLogger("ota-agent")


def collect(cfg: Config, provides: Mapping[str, str], base: Mapping[str, Any]) -> dict[str, Any]:
    """The inventory: ``base`` (what the agent knows: slot, versions, floor, ...), the running image's
    checksum, free space on ``/data``, IPv4 addresses, and the ``name=value`` lines of every executable in
    ``[device] inventory_dir``."""
    inv: dict[str, Any] = {"kernel": os.uname().release, "hostname": socket.gethostname(), **base}
    if "rootfs-image.checksum" in provides:
        inv["rootfs-image.checksum"] = provides["rootfs-image.checksum"]
    if os.path.isdir(cfg.paths.data_mount):
        st = os.statvfs(cfg.paths.data_mount)
        inv["data_free_mb"] = st.f_bavail * st.f_frsize // (1024 * 1024)
    addrs = _ipv4_addresses()
    if addrs:
        inv["ipv4"] = addrs if len(addrs) > 1 else addrs[0]
    inv.update(_inventory_scripts(Path(cfg.device.inventory_dir)))
    return inv


def refusals(cfg: Config, values: Mapping[str, str]) -> str:
    """Why the server's configuration variables cannot be applied ("" when they can): only names the signed
    image declares (``[device] config_variables``), none of :mod:`.envvars`' denied names, one-line printable
    values."""
    allowed = set(cfg.device.config_variables)
    problems = []
    for name, value in sorted(values.items()):
        why = envvars.name_problem(name)
        if why is None and name not in allowed:
            why = "not declared by this image (config_variables)"
        if why is None and not envvars.VALUE.match(value):
            why = "its value has a newline, NUL or another control character, or is too long"
        if why:
            problems.append(f"{name[:64]}: {why}")
    return "; ".join(problems)[:1000]


def write_device_env(cfg: Config, values: Mapping[str, str]) -> bool:
    """Replace ``[paths] device_env`` with ``values`` (already checked with :func:`refusals`) and restart the
    units of ``[commands] restart_on_config`` when it changed. Returns whether it changed."""
    path = Path(cfg.paths.device_env)
    text = env_text(values)
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = ""  # no file and no values: nothing changed
    if old == text:
        return False
    atomic_write(path, text.encode(), 0o640)
    log.info("configuration updated: %s", ", ".join(sorted(values)) or "(none)")
    restart_app(cfg)
    return True


def env_text(values: Mapping[str, str]) -> str:
    """``values`` as the lines of an ``EnvironmentFile``."""
    return "".join(f"{k}={_env_quote(v)}\n" for k, v in sorted(values.items()))


def restart_app(cfg: Config) -> None:
    """Restart the units of ``[commands] restart_on_config`` (those that are running)."""
    for unit in cfg.commands.restart_on_config:
        subprocess.run(["systemctl", "try-restart", unit], check=False, timeout=120)


def _env_quote(value: str) -> str:
    if value and all(c.isalnum() or c in "._-/:@+," for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    return f'"{escaped}"'


def _ipv4_addresses() -> list[str]:
    try:
        proc = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for line in proc.stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            out.append(fields[fields.index("inet") + 1].split("/")[0])
    return out


def _inventory_scripts(directory: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not directory.is_dir():
        return out
    for script in sorted(directory.iterdir()):
        if not (script.is_file() and os.access(script, os.X_OK)):
            continue
        try:
            proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        for line in proc.stdout.splitlines():
            name, sep, value = line.partition("=")
            if sep and name.strip():
                out[name.strip()] = value.strip()
    return out


__all__ = ["collect", "env_text", "refusals", "restart_app", "write_device_env"]
