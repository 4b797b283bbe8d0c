"""The agent's configuration: ``/etc/ota/ota.conf`` (INI), rendered into each rootfs at build time.

Every path the agent touches is a setting, so that host tests run the same code against files (slot files,
env files, a fake ``/proc/cmdline``) and a device runs it against its block devices. Unknown sections or keys
are errors: a typo in a fleet's configuration must not silently fall back to a default.
"""

from __future__ import annotations

import configparser
import logging
import re
from collections.abc import MutableMapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from ota_common.errors import UserError
from ota_common.files import read_input

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/ota/ota.conf")


class ConfigError(UserError):
    """The agent's configuration file is missing or invalid."""


def _seconds(value: str) -> float:
    """``30``, ``30s``, ``5m``, ``2h``, ``1d``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30, 30s, 5m, 2h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _list(value: str) -> tuple[str, ...]:
    return tuple(v for v in re.split(r"[\s,]+", value.strip()) if v)


@dataclass(frozen=True)
class ServerSection:
    url: str = ""
    tenant_token: str = ""
    # CA bundle (PEM) the server's TLS certificate must chain to; empty: the system's trust store
    ca_file: str = ""
    # plain http:// to the server (lab use only; logged at every start)
    insecure_http: bool = False
    poll_interval: float = 1800.0
    inventory_interval: float = 8 * 3600.0
    retry_interval: float = 30.0
    request_timeout: float = 30.0
    download_retry_timeout: float = 24 * 3600.0


@dataclass(frozen=True)
class DeviceSection:
    artifact_name: str = ""
    version: str = ""
    # the signed security version of this image (``rootfs-image.security_version`` of its artifact)
    security_version: int = 0
    # names of the configuration variables the server may set (written to [paths] device_env)
    config_variables: tuple[str, ...] = ()
    # an image built without a release key (build.py release --unsigned): it refuses every update
    unsigned: bool = False
    device_type_file: str = "/data/ota/device_type"
    identity_command: str = "/usr/lib/vv-ota/identity"
    inventory_dir: str = "/usr/lib/vv-ota/inventory.d"


@dataclass(frozen=True)
class PathsSection:
    trusted_keys: str = "/etc/ota/keys"
    # revoked release keys shipped in the image: lines "sha256:<hex of the DER SubjectPublicKeyInfo> [comment]"
    revoked_keys: str = "/etc/ota/keys.revoked"
    state_dir: str = "/data/ota"
    fw_env_config: str = "/etc/fw_env.config"
    cmdline: str = "/proc/cmdline"
    boot_id: str = "/proc/sys/kernel/random/boot_id"
    # empty: derived from root=PARTUUID=<disk id>-0N on the kernel command line (/dev/disk/by-partuuid/...)
    slot_a: str = ""
    slot_b: str = ""
    journal_dir: str = "/var/log/journal"
    data_mount: str = "/data"
    device_env: str = "/data/ota/device.env"
    # per-device settings provisioned onto the data partition: same format, but only the keys of
    # LOCAL_KEYS ([server] url, ca_file, tenant_token); it survives updates because /data does
    local_config: str = "/data/ota/ota.conf"
    # the agent's per-device environment on /data: only the proxy variables of PROXY_VARIABLES are used
    agent_env: str = "/data/ota/agent.env"
    # present only in images built with a test layer: then OTA_AGENT_FAULT (power-cut simulation) is honoured
    fault_injection: str = "/etc/ota/fault-injection"
    # per-device configuration variables written by build.py provision (KEY=value lines, checked like the
    # server's): device_env is DEVICE_ID, overlaid by these, overlaid by the server's
    provisioned_env: str = "/data/ota/provisioned.env"
    # the device's certificate from the fleet CA (build.py provision): sent with each auth request
    device_cert: str = "/data/ota/device-cert.pem"
    # the operators' SSH keys (sshd's AuthorizedKeysFile for root), from SSH_AUTHORIZED_KEYS; empty: the image
    # takes no SSH keys from the server
    authorized_keys: str = "/data/ota/authorized_keys"


@dataclass(frozen=True)
class HealthSection:
    units: tuple[str, ...] = ("vv-video-ai.service",)
    url: str = "http://127.0.0.1:8081/health"
    hooks_dir: str = "/etc/ota/health.d"
    hook_timeout: float = 60.0
    deadline: float = 300.0
    check_server: bool = True
    # how long a trial whose local checks pass waits for the server before it rolls back
    server_grace: float = 3600.0
    check_data_mount: bool = True
    retry_interval: float = 5.0
    # configuration variables the application cannot run without: each must be set, and not to its
    # placeholder, in its effective environment (app_env overlaid by [paths] device_env, as systemd reads them)
    required_config: tuple[str, ...] = ()
    # NAME=value: the value the image holds when nobody configured NAME (the layers' own variables)
    config_placeholders: tuple[str, ...] = ()
    app_env: str = "/etc/vv-video-ai/.env"
    # after a configuration change (device_env written, restart_on_config restarted): how long the application
    # checks (units, url, required_config) may take to pass before the previous device_env is restored
    config_wait: float = 60.0


@dataclass(frozen=True)
class CommandsSection:
    reboot: str = "systemctl reboot"
    restart_on_config: tuple[str, ...] = ("vv-video-ai.service",)
    script_timeout: float = 3600.0
    script_retry_interval: float = 60.0
    script_retry_timeout: float = 1800.0


@dataclass(frozen=True)
class InstallSection:
    # write only the blocks of a slot that differ from what it holds, known from a block index on /data
    # (device_hooks.blockindex) or by reading the slot; "no": every block is written (as before issue 19)
    block_index: bool = True


@dataclass(frozen=True)
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    device: DeviceSection = field(default_factory=DeviceSection)
    paths: PathsSection = field(default_factory=PathsSection)
    health: HealthSection = field(default_factory=HealthSection)
    commands: CommandsSection = field(default_factory=CommandsSection)
    install: InstallSection = field(default_factory=InstallSection)

    @property
    def state_dir(self) -> Path:
        return Path(self.paths.state_dir)


_SECTIONS = {f.name: f.type for f in fields(Config)}
#: what the writable data partition may set in its ota.conf: where the server is and how to trust it, nothing
#: the signed image decides (keys, commands, paths, health rules)
LOCAL_KEYS = {"server": frozenset({"url", "ca_file", "tenant_token"})}
#: the only variables taken from [paths] agent_env
PROXY_VARIABLES = frozenset({"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
                             "http_proxy", "https_proxy", "no_proxy", "all_proxy"})


def _convert(section: str, key: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            return _bool(raw)
        if isinstance(default, float):
            return _seconds(raw)
        if isinstance(default, int):
            if not re.fullmatch(r"\s*\d{1,9}\s*", raw):
                raise ValueError(f"not a non-negative integer: {raw!r}")
            return int(raw)
        if isinstance(default, tuple):
            return _list(raw)
        return raw.strip()
    except ValueError as e:
        raise ConfigError(f"[{section}] {key}: {e}") from None


def parse_config(text: str, source: str = "ota.conf", overrides: tuple[tuple[str, str], ...] = ()) -> Config:
    """Parse ``text``; each ``(text, source)`` in ``overrides`` is read after it, its keys replacing earlier ones."""
    cp = configparser.ConfigParser(interpolation=None, comment_prefixes=("#", ";"), inline_comment_prefixes=None)
    for t, src in ((text, source), *overrides):
        try:
            cp.read_string(t, source=src)
        except configparser.Error as e:
            raise ConfigError(f"{src}: {e}") from None
    sections: dict[str, object] = {}
    defaults = Config()
    for name in cp.sections():
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}] (known: {', '.join(_SECTIONS)})")
        current = getattr(defaults, name)
        known = {f.name for f in fields(current)}
        values: dict[str, object] = {}
        for key, raw in cp.items(name):
            if key not in known:
                raise ConfigError(f"{source}: [{name}] unknown key {key!r} (known: {', '.join(sorted(known))})")
            values[key] = _convert(name, key, raw, getattr(current, key))
        sections[name] = type(current)(**values)
    cfg = Config(**sections)  # type: ignore[arg-type]
    if cfg.server.url and not re.match(r"^https?://[^/\s]+", cfg.server.url):
        raise ConfigError(f"{source}: [server] url must be an http(s) URL, got {cfg.server.url!r}")
    return cfg


def local_overrides(text: str, source: str) -> tuple[str, list[str]]:
    """The part of a data-partition ota.conf that may override the image (:data:`LOCAL_KEYS`), as INI text, and
    what was ignored. Raises :class:`ConfigError` when it does not parse."""
    cp = configparser.ConfigParser(interpolation=None, comment_prefixes=("#", ";"), inline_comment_prefixes=None)
    try:
        cp.read_string(text, source=source)
    except configparser.Error as e:
        raise ConfigError(f"{source}: {e}") from None
    kept, ignored = [], []
    for section in cp.sections():
        lines = []
        for key, value in cp.items(section):
            if key in LOCAL_KEYS.get(section, ()):
                lines.append(f"{key} = {value}\n")
            else:
                ignored.append(f"[{section}] {key}")
        if lines:
            kept.append(f"[{section}]\n" + "".join(lines))
    return "".join(kept), ignored


def load_config(path: Path = DEFAULT_CONFIG) -> Config:
    """The image's configuration, with the per-device keys of ``[paths] local_config`` (only
    :data:`LOCAL_KEYS`; anything else there is ignored and logged: ``/data`` cannot override what the signed
    image decides)."""
    text = read_input(path, "configuration", ConfigError).decode()
    cfg = parse_config(text, str(path))
    local = Path(cfg.paths.local_config) if cfg.paths.local_config else None
    if local is None or local == path or not local.is_file():
        return cfg
    try:
        extra = local.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {local}: {e.strerror}") from None
    allowed, ignored = local_overrides(extra, str(local))
    if ignored:
        log.error("%s: ignored %s (the data partition may set only %s)", local, ", ".join(ignored),
                  ", ".join(f"[{s}] {k}" for s, keys in LOCAL_KEYS.items() for k in sorted(keys)))
    return parse_config(text, str(path), ((allowed, str(local)),))


def agent_environment(cfg: Config, environ: MutableMapping[str, str]) -> list[str]:
    """Apply ``[paths] agent_env`` to ``environ``: only :data:`PROXY_VARIABLES` with one-line values. The
    fault-injection variables are dropped from ``environ`` unless the image was built with a test layer
    (``[paths] fault_injection`` exists). Returns what was ignored, for the log."""
    ignored = []
    if not Path(cfg.paths.fault_injection).exists():
        for name in ("OTA_AGENT_FAULT", "OTA_AGENT_FAULT_ONCE"):
            if environ.pop(name, None) is not None:
                ignored.append(f"{name} (no fault injection in this image)")
    try:
        text = Path(cfg.paths.agent_env).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return ignored
    except OSError as e:
        return [*ignored, f"{cfg.paths.agent_env}: {e.strerror}"]
    testing = Path(cfg.paths.fault_injection).exists()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip().strip('"').strip("'")
        if sep and re.fullmatch(r"[^\x00-\x1f\x7f]{0,2048}", value) and (
                name in PROXY_VARIABLES or (testing and name in ("OTA_AGENT_FAULT", "OTA_AGENT_FAULT_ONCE"))):
            environ[name] = value
        else:
            ignored.append(name[:64] or line[:64])
    return ignored
