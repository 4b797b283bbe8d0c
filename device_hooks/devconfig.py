"""The device's own configuration on ``/data``: the application's environment file, the operators' SSH keys
and the device certificate, from what ``build.py provision`` wrote and what the server sends.

``[paths] device_env`` (the application unit's ``EnvironmentFile``) is, later sources overriding earlier ones:

1. ``DEVICE_ID`` = the identity's ``device_id`` (the identity script: provisioned or derived);
2. ``[paths] provisioned_env`` (``KEY=value`` lines from the provisioning tool), each line checked with the
   rules the server's values meet (:func:`.inventory.refusals`: declared by the image, no name of
   :mod:`.envvars`' deny list, one printable line); a bad line is logged and skipped, never passed on;
3. the server's configuration (the last one accepted, kept in ``server-config.json`` with its hash so that the
   file can be written at start, before the server is reached: a first boot has its provisioned values at
   once). How a new one is applied, checked and reverted: :mod:`.cfgrelease`.

``SSH_AUTHORIZED_KEYS`` is not an environment variable: checked with :mod:`ota_common.sshkeys`, it replaces
``[paths] authorized_keys`` atomically; an invalid value changes nothing and is reported (``config_refused``).
When the server does not set it, the file stays as provisioned.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ota_common import sshkeys

from . import inventory
from .config import Config
from .state import atomic_write, read_json, write_json

log = logging.getLogger("ota-agent")

MAX_FILE = 64 * 1024  # provisioned.env, an env file, authorized_keys: a few kB
MAX_CERT = 16 * 1024  # a device certificate is under 2 kB
CERT_HEADER = "-----BEGIN CERTIFICATE-----"
SERVER_VALUES = "server-config.json"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def read_small(path: Path, limit: int = MAX_FILE) -> bytes | None:
    """At most ``limit`` + 1 bytes of a regular file (not a FIFO or a device that would block or never end);
    None when there is none. Raises OSError for a file that exists but cannot be read or is not regular."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_env(text: str) -> tuple[dict[str, str], list[str]]:
    """``KEY=value`` lines as systemd's ``EnvironmentFile`` reads them (``#``/``;`` comments, a value in double
    quotes with backslash escapes or in single quotes), one line per variable; returns the values and the
    lines that are not one (by number: a bad line is never shown, it may hold a secret)."""
    values: dict[str, str] = {}
    problems = []
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(" \t")
        if not line or line[0] in "#;":
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(" \t"), value.strip(" \t")
        if not sep or not _ENV_NAME.fullmatch(name):
            problems.append(f"line {n}: not NAME=value")
            continue
        if value[:1] in ("'", '"'):
            q = value[0]
            if len(value) < 2 or value[-1] != q or (q == '"' and re.search(r'(?<!\\)(\\\\)*"', value[1:-1])):
                problems.append(f"line {n}: {name}: unbalanced quotes")
                continue
            value = value[1:-1]
            if q == '"':
                value = re.sub(r"\\(.)", r"\1", value)
        values[name] = value
    return values, problems


def provisioned_values(cfg: Config) -> dict[str, str]:
    """The variables of ``[paths] provisioned_env`` that pass the server's rules; bad lines logged, skipped."""
    path = Path(cfg.paths.provisioned_env) if cfg.paths.provisioned_env else None
    if path is None:
        return {}
    try:
        data = read_small(path)
    except OSError as e:
        log.error("%s: ignored (%s)", path, e.strerror)
        return {}
    if data is None:
        return {}
    if len(data) > MAX_FILE:
        log.error("%s: ignored, larger than %d bytes", path, MAX_FILE)
        return {}
    values, problems = parse_env(data.decode("utf-8", errors="replace"))
    out = {}
    for name, value in values.items():
        if name == sshkeys.VARIABLE:
            problems.append(f"{name}: the SSH keys are provisioned as {cfg.paths.authorized_keys}, not here")
            continue
        why = inventory.refusals(cfg, {name: value})
        if why:
            problems.append(why)
        else:
            out[name] = value
    for p in problems:
        log.error("%s: skipped %s", path, p)
    return out


def load_server_values(cfg: Config) -> dict[str, str]:
    """The server's last accepted configuration (checked again: /data is writable). The first time (an agent
    that kept none: a device updated from it), ``device_env`` is taken as that: the previous agent wrote only
    the server's values there, and a start that dropped them would fail the trial of this very release."""
    path = cfg.state_dir / SERVER_VALUES
    if not path.exists():
        try:
            data = read_small(Path(cfg.paths.device_env)) or b""
        except OSError:
            data = b""
        old = parse_env(data[:MAX_FILE].decode("utf-8", errors="replace"))[0]
        values = {k: v for k, v in old.items() if k != sshkeys.VARIABLE and not inventory.refusals(cfg, {k: v})}
        write_json(path, {"values": values})
        return values
    doc = read_json(path).get("values", {})
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        return {}
    return {} if inventory.refusals(cfg, doc) else doc


def env_values(cfg: Config, device_id: str | None, server: Mapping[str, str]) -> dict[str, str]:
    """``[paths] device_env``'s variables from the three sources (module docstring)."""
    values = {"DEVICE_ID": device_id} if device_id else {}
    values.update(provisioned_values(cfg))
    values.update(server)
    return values


def write_env(cfg: Config, device_id: str | None, server: Mapping[str, str]) -> bool:
    """Write ``[paths] device_env`` from the three sources (module docstring); True when it changed (then the
    units of ``[commands] restart_on_config`` were restarted). A change of the server's values goes through
    :mod:`.cfgrelease` instead (checked, reverted when the application fails)."""
    return inventory.write_device_env(cfg, env_values(cfg, device_id, server))


def install_ssh_keys(cfg: Config, value: str) -> str:
    """Replace ``[paths] authorized_keys`` with the keys of ``value``; returns why it was refused ("" if not)."""
    if not cfg.paths.authorized_keys:
        return f"{sshkeys.VARIABLE}: this image takes no SSH keys from the server"
    try:
        keys = sshkeys.parse_keys(value)
    except sshkeys.SSHKeyError as e:
        log.error("%s refused, %s stays: %s", sshkeys.VARIABLE, cfg.paths.authorized_keys, e)
        return f"{sshkeys.VARIABLE}: {e}"
    path = Path(cfg.paths.authorized_keys)
    text = sshkeys.authorized_keys_text(keys)
    try:
        old = read_small(path)
    except OSError:
        old = None
    if old != text.encode():
        atomic_write(path, text.encode(), 0o600)
        log.info("SSH keys installed: %s", ", ".join(k.fingerprint for k in keys) or "(none)")
    return ""


def installed_ssh_keys(cfg: Config) -> list[str] | str:
    """The fingerprints in ``[paths] authorized_keys`` (for the inventory), or why they cannot be read."""
    if not cfg.paths.authorized_keys:
        return []
    try:
        data = read_small(Path(cfg.paths.authorized_keys))
        if data is None:
            return []
        return [k.fingerprint for k in sshkeys.parse_keys(data.decode("utf-8", errors="replace"))]
    except OSError as e:
        return f"unreadable: {e.strerror}"
    except sshkeys.SSHKeyError as e:
        return f"invalid: {e}"


def inventory_attributes(cfg: Config, device_id: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"ssh_authorized_keys": installed_ssh_keys(cfg)}
    if device_id:
        out["device_id"] = device_id
    return out


def device_cert(cfg: Config) -> str | None:
    """The device certificate to send with the auth request, or None: none provisioned, or one that is not a
    PEM certificate under :data:`MAX_CERT` bytes (logged; the server then treats the device as unprovisioned)."""
    if not cfg.paths.device_cert:
        return None
    path = Path(cfg.paths.device_cert)
    try:
        data = read_small(path, MAX_CERT)
    except OSError as e:
        log.error("device certificate %s not sent: %s", path, e.strerror)
        return None
    if data is None:
        return None
    if len(data) > MAX_CERT:
        log.error("device certificate %s not sent: larger than %d bytes", path, MAX_CERT)
        return None
    text = data.decode("ascii", errors="replace")
    if not text.startswith(CERT_HEADER):
        log.error("device certificate %s not sent: it does not start with %s", path, CERT_HEADER)
        return None
    return text


def effective_environment(cfg: Config) -> dict[str, str]:
    """What the application sees, as systemd builds it: ``[health] app_env`` overlaid by ``[paths] device_env``
    (an unreadable file counts as empty)."""
    env: dict[str, str] = {}
    for p in (cfg.health.app_env, cfg.paths.device_env):
        try:
            data = read_small(Path(p)) if p else None
        except OSError:
            data = None
        if data:
            env.update(parse_env(data[:MAX_FILE].decode("utf-8", errors="replace"))[0])
    return env


__all__ = ["device_cert", "effective_environment", "env_values", "install_ssh_keys", "inventory_attributes",
           "load_server_values", "parse_env", "provisioned_values", "write_env"]
