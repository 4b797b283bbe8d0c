"""Server configuration (from ``build.py server``) and the secrets persisted in the storage directory.

Worker processes are started by uvicorn in fresh interpreters, so the settings travel as JSON in the
``OTA_SERVER_SETTINGS`` environment variable; the secrets live in ``<storage>/server-secrets.json`` (mode 0600),
created once — or, for several servers on several machines, in a file given with ``--secrets-file`` or in
``$OTA_SERVER_SECRETS`` (the same JSON) — so that every worker, every server and every restart agree on them: the key of device tokens, the key of
download links, and — only when no secrets key is configured apart (see :mod:`.secretkeys`) — the Fernet key
of secret configuration values.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from ota_common.errors import UserError

from .timeutil import parse_duration

SETTINGS_ENV = "OTA_SERVER_SETTINGS"
SECRETS_FILE = "server-secrets.json"
#: the server secrets kept apart from storage: a file (option) or the JSON itself (environment variable)
SECRETS_FILE_OPTION = "--secrets-file"
SERVER_SECRETS_ENV = "OTA_SERVER_SECRETS"
#: environment variables of the fleet-observation settings (`build.py server --stale-after/--last-seen-flush` read them too)
LAST_SEEN_FLUSH_ENV = "OTA_LAST_SEEN_FLUSH"
STALE_AFTER_ENV = "OTA_STALE_AFTER"


def _env_duration(name: str, default: str, low: float, high: float) -> float:
    """A duration setting from the environment variable ``name`` (else ``default``), checked when the settings
    are made: ``build.py server`` refuses a bad value with one ``error:`` line before any worker starts."""
    return parse_duration(os.environ.get(name, "").strip() or default, name, low, high)


@dataclass(frozen=True)
class Settings:
    db_url: str
    storage: Path
    #: SHA-256 (hex) of the bootstrap admin token: the token itself never reaches the workers' environment
    admin_token_sha256: str
    release_keys: tuple[Path, ...] = ()
    allow_unsigned: bool = False
    public_url: str | None = None
    #: lifetime of a device token (seconds); the Mender client re-authenticates on 401
    device_token_ttl: int = 7 * 24 * 3600
    #: lifetime of a signed download link (seconds); a device asks `next` again for a fresh one
    link_ttl: int = 24 * 3600
    #: largest JSON/YAML request body accepted (artifact uploads are streamed and not limited by this)
    max_body: int = 16 * 1024 * 1024
    #: largest artifact accepted
    max_artifact: int = 8 * 1024 * 1024 * 1024
    #: Fernet keys of secret configuration values, the first encrypts (resolved by ``build.py server``)
    secrets_keys: tuple[str, ...] = ()
    #: ``/metrics`` without a token (default: scope ``read`` needed)
    public_metrics: bool = False
    #: ``/docs``, ``/redoc`` and ``/openapi.json`` without a token (default: scope ``read`` needed)
    public_docs: bool = False
    # --- limits against hostile or broken clients (docs/server.md, "Limits"); 0 switches a count limit off
    #: largest body of a request without valid credentials (auth requests always), refused before it is read
    max_unauthenticated_body: int = 64 * 1024
    #: devices waiting for an administrator (status pending); a new unknown identity past it gets 429
    max_pending_devices: int = 10_000
    #: pending auth sets (keys) of one device; a new key for it past this gets 429
    max_pending_auth_sets: int = 10
    #: auth requests per client address and per identity: ``N/PERIOD`` (a bucket of N refilled over PERIOD)
    auth_rate_per_address: str = "300/60s"
    auth_rate_per_identity: str = "30/60s"
    #: one device's deployment log: stored bytes (of message JSON) and uploads (PUT .../log)
    log_max_bytes: int = 1024 * 1024
    log_max_uploads: int = 100
    #: seconds to receive a request's line and headers; their largest total size
    header_timeout: float = 10.0
    max_header_size: int = 64 * 1024
    #: seconds to receive a request body, plus one second per ``body_min_rate`` bytes received
    body_timeout: float = 20.0
    body_min_rate: int = 500
    #: seconds an idle keep-alive connection stays open
    keep_alive_timeout: int = 5
    # --- seeing the fleet (docs/server.md, "Last seen and stale devices")
    #: seconds between two writes of the "last seen" times a worker collected from device requests: each
    #: request only notes the device in memory, the flush writes the whole batch in one UPDATE (a poll must not
    #: cost a write). "Last seen" lags by up to this much; a worker that stops writes what it holds.
    last_seen_flush_seconds: float = field(
        default_factory=lambda: _env_duration(LAST_SEEN_FLUSH_ENV, "10s", 0.05, 3600))
    #: an accepted device not heard from for this long (seconds) is stale. 3 h by default: our agent and the
    #: Mender client poll every 30 min (``poll_interval``, UpdatePollIntervalSeconds 1800), so 3 h is six missed
    #: polls — a device that is off or cut off, not one that was slow, rebooted or retried with backoff once —
    #: and still noticed within a working shift. Fleets polling less often must raise it (a few poll intervals).
    stale_after: float = field(default_factory=lambda: _env_duration(STALE_AFTER_ENV, "3h", 1, 365 * 86400))
    #: PEM file of the fleet enrolment CA(s): a device whose auth request carries a certificate issued by one is
    #: accepted at once (zero-touch enrolment, docs/server.md); None: the ``device_cert`` field is ignored
    fleet_ca_file: Path | None = None
    # --- past one machine (docs/server.md, "Several servers")
    #: where artifacts live: "" for ``storage/artifacts`` (local disk), or ``s3://bucket/prefix``
    artifact_store: str = ""
    #: the S3-compatible service's URL (None: AWS) and region (None: boto3's default)
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    #: the server secrets' file kept apart from storage (``--secrets-file``); None: ``$OTA_SERVER_SECRETS``, else
    #: ``storage/server-secrets.json``
    secrets_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_env(self) -> str:
        d = asdict(self)
        d["storage"] = str(self.storage)
        d["release_keys"] = [str(p) for p in self.release_keys]
        d["fleet_ca_file"] = None if self.fleet_ca_file is None else str(self.fleet_ca_file)
        d["secrets_file"] = None if self.secrets_file is None else str(self.secrets_file)
        return json.dumps(d)

    @classmethod
    def from_env(cls, value: str | None = None) -> Settings:
        raw = value if value is not None else os.environ.get(SETTINGS_ENV)
        if not raw:
            raise UserError(f"{SETTINGS_ENV} is not set (start the server with `build.py server`)")
        d = json.loads(raw)
        d["storage"] = Path(d["storage"])
        d["release_keys"] = tuple(Path(p) for p in d["release_keys"])
        d["secrets_keys"] = tuple(d.get("secrets_keys", ()))
        d["fleet_ca_file"] = None if d.get("fleet_ca_file") is None else Path(d["fleet_ca_file"])
        d["secrets_file"] = None if d.get("secrets_file") is None else Path(d["secrets_file"])
        return cls(**d)


@dataclass(frozen=True)
class ServerSecrets:
    jwt_key: bytes
    link_key: bytes
    #: the default key of secret configuration values, when the server runs without one kept apart
    fernet_key: bytes | None

    @property
    def session_key(self) -> bytes:
        """HMAC key of dashboard sessions and login links (derived: one secret less to keep)."""
        return hmac.new(self.jwt_key, b"vv-ota dashboard session key v2", hashlib.sha256).digest()


def write_private(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``path`` (mode 0600) atomically: never a half-written file. With ``replace`` it replaces what is
    there; without, it creates the file, and if another process won the race its file is kept."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_private(path: Path, data: bytes) -> None:
    write_private(path, data, replace=True)


def _b64_key(doc: dict[str, Any], name: str) -> bytes:
    value = doc.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} is missing")
    key = base64.b64decode(value, validate=True)
    if len(key) < 32:
        raise ValueError(f"{name} holds {len(key)} bytes, fewer than 32")
    return key


def parse_secrets(doc: Any) -> ServerSecrets:
    """The secrets of a ``server-secrets.json`` document, checked: an object with ``jwt_key`` and ``link_key``
    (base64, at least 32 bytes each) and an optional ``fernet_key`` (a Fernet key). Raises ValueError."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    fernet = doc.get("fernet_key")
    if fernet is not None:
        try:
            Fernet(fernet.encode() if isinstance(fernet, str) else b"")
        except ValueError:
            raise ValueError("fernet_key is not a Fernet key (32 bytes, urlsafe base64)") from None
    return ServerSecrets(jwt_key=_b64_key(doc, "jwt_key"), link_key=_b64_key(doc, "link_key"),
                         fernet_key=fernet.encode() if fernet else None)


def new_secrets_doc(with_fernet_key: bool) -> dict[str, str]:
    doc = {
        "jwt_key": base64.b64encode(secrets.token_bytes(32)).decode(),
        "link_key": base64.b64encode(secrets.token_bytes(32)).decode(),
    }
    if with_fernet_key:
        doc["fernet_key"] = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    return doc


def check_private(path: Path, what: str) -> None:
    """Refuse a credential file other users can read or write (what ssh does with a private key).
    Raises UserError, also when the file cannot be read."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    if mode & 0o077:
        raise UserError(f"{what} {path} is accessible by other users (mode {mode:04o}): chmod 600 {path}")


@dataclass(frozen=True)
class SharedSecrets:
    """Server secrets given from outside the storage directory, the same for every server process."""

    doc: dict[str, Any]
    secrets: ServerSecrets
    #: ``--secrets-file PATH`` or ``OTA_SERVER_SECRETS``, for messages
    where: str


def shared_secrets(secrets_file: Path | None) -> SharedSecrets | None:
    """The server secrets of ``--secrets-file`` (mode 0600 or stricter), else of ``$OTA_SERVER_SECRETS`` (the
    JSON itself), else None (they live in ``storage/server-secrets.json``). Raises UserError (one line) for a
    file others can read, unreadable or malformed secrets."""
    if secrets_file is not None:
        where = f"{SECRETS_FILE_OPTION} {secrets_file}"
        check_private(secrets_file, SECRETS_FILE_OPTION)
        try:
            text = secrets_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {where}: {e}") from None
    elif os.environ.get(SERVER_SECRETS_ENV, "").strip():
        where, text = SERVER_SECRETS_ENV, os.environ[SERVER_SECRETS_ENV]
    else:
        return None
    try:
        doc = json.loads(text)
        return SharedSecrets(doc, parse_secrets(doc), where)
    except ValueError as e:
        raise UserError(f"{where} does not hold server secrets (the JSON of server-secrets.json): {e}") from None


def load_server_secrets(storage: Path, secrets_file: Path | None) -> ServerSecrets:
    """What a server process uses: the shared secrets (:func:`shared_secrets`) or those of
    ``storage/server-secrets.json`` (created when missing). Raises UserError."""
    shared = shared_secrets(secrets_file)
    return shared.secrets if shared is not None else load_or_create_secrets(storage)


def load_or_create_secrets(storage: Path, with_fernet_key: bool = False) -> ServerSecrets:
    """The secrets of ``STORAGE/server-secrets.json``, the file created when missing; ``with_fernet_key``: a
    default Fernet key is generated into it too (when no secrets key is configured apart). Raises UserError
    when the file cannot be read."""
    path = storage / SECRETS_FILE
    if not path.exists():
        write_private(path, json.dumps(new_secrets_doc(with_fernet_key)).encode(), replace=False)
    try:
        doc = json.loads(path.read_text())
        if with_fernet_key and not doc.get("fernet_key"):
            doc["fernet_key"] = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
            replace_private(path, json.dumps(doc).encode())
        return ServerSecrets(
            jwt_key=base64.b64decode(doc["jwt_key"]),
            link_key=base64.b64decode(doc["link_key"]),
            fernet_key=doc["fernet_key"].encode() if doc.get("fernet_key") else None,
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the server secrets in {path}: {e}") from None


def load_or_create_admin_token(storage: Path) -> tuple[str, Path, bool]:
    """The token in ``<storage>/admin-token``, generated (mode 0600) when missing. Returns (token, path, created)."""
    path = storage / "admin-token"
    created = False
    if not path.exists():
        write_private(path, (secrets.token_urlsafe(32) + "\n").encode(), replace=False)
        created = True
    token = path.read_text().strip()
    if not token:
        raise UserError(f"{path} is empty")
    return token, path, created
