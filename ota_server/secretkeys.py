"""The keys that encrypt secret configuration values (Fernet), kept apart from the database.

Where the keys come from, first match wins:

1. ``--secrets-key-file FILE`` (or ``OTA_SECRETS_KEY_FILE=FILE``): one key per line, ``#`` comments;
2. ``OTA_SECRETS_KEYS``: the keys themselves, separated by commas or white space (e.g. from a systemd
   ``EnvironmentFile=``);
3. neither (development default, the behaviour before keys could live elsewhere): the ``fernet_key`` that
   ``STORAGE/server-secrets.json`` holds, generated at the first start. That file usually sits beside the
   SQLite database, which is what the first two avoid.

The first key encrypts, every key decrypts (``MultiFernet``): to rotate, put a new key first, restart every
server, run ``build.py server secrets rotate`` (every secret re-encrypted with the first key), then drop the old
keys. With 1. or 2., a ``fernet_key`` still in ``server-secrets.json`` (a server that ran with the default
before) is used to decrypt too, until ``secrets rotate`` has re-encrypted everything and removed it.

At start the server decrypts every stored secret (:func:`check_database`): if one does not decrypt (a database
restored without its key, the wrong key file) it refuses to start, naming the option, instead of handing
devices configurations without their secrets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ota_common.errors import UserError

from . import confighash
from .db import open_database
from .models import config_values as cv
from .settings import SECRETS_FILE, replace_private, shared_secrets

KEY_FILE_ENV = "OTA_SECRETS_KEY_FILE"
KEYS_ENV = "OTA_SECRETS_KEYS"
OPTION = "--secrets-key-file"
HOW = f"{OPTION} FILE (or {KEYS_ENV})"


@dataclass(frozen=True)
class SecretKeys:
    #: Fernet keys, the first encrypts
    keys: tuple[str, ...]
    #: where they came from, for messages
    where: str
    #: "file", "env" or "default" (the key in server-secrets.json)
    source: str
    #: the key file, when they came from one
    file: Path | None = None
    #: the keys include the old default key from ``server-secrets.json`` (last, decrypt only)
    legacy: str | None = None


def parse_keys(text: str, where: str) -> tuple[str, ...]:
    """Fernet keys from text: one per line or separated by commas/white space; ``#`` starts a comment.
    Raises UserError for an empty list or a string that is not a Fernet key (32 bytes, urlsafe base64)."""
    keys: list[str] = []
    for line in text.splitlines():
        for item in line.split("#", 1)[0].replace(",", " ").split():
            try:
                Fernet(item.encode())
            except ValueError:
                raise UserError(f"{where}: {item[:8]}... is not a Fernet key (32 bytes, urlsafe base64; make one "
                                "with `build.py server secrets new-key`)") from None
            if item not in keys:
                keys.append(item)
    if not keys:
        raise UserError(f"{where} holds no key (make one with `build.py server secrets new-key`)")
    return tuple(keys)


def read_key_file(path: Path) -> tuple[str, ...]:
    """Raises UserError when the file cannot be read or holds no valid key."""
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read {OPTION} {path}: {e.strerror}") from None
    return parse_keys(text, f"{OPTION} {path}")


def _legacy_key(storage: Path, secrets_file: Path | None = None) -> tuple[str | None, str]:
    """The default key in the server secrets (shared ones from ``--secrets-file``/``$OTA_SERVER_SECRETS``,
    else ``STORAGE/server-secrets.json``) and where they are, for messages."""
    shared = shared_secrets(secrets_file)
    if shared is not None:
        key = shared.doc.get("fernet_key")
        return (key if isinstance(key, str) and key else None), shared.where
    path = storage / SECRETS_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None, str(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the server secrets in {path}: {e}") from None
    key = doc.get("fernet_key") if isinstance(doc, dict) else None
    return (key if isinstance(key, str) and key else None), str(path)


def resolve(key_file: Path | None, storage: Path, secrets_file: Path | None = None) -> SecretKeys | None:
    """The keys from ``key_file``, else ``$OTA_SECRETS_KEYS``, else the default key in the server secrets
    (``secrets_file``, ``$OTA_SERVER_SECRETS``, else ``STORAGE``; None when there is none yet). Raises UserError
    for an unreadable file or a malformed key."""
    legacy, secrets_where = _legacy_key(storage, secrets_file)
    if key_file is not None:
        keys, where, source = read_key_file(key_file), f"{OPTION} {key_file}", "file"
    elif os.environ.get(KEYS_ENV, "").strip():
        keys, where, source = parse_keys(os.environ[KEYS_ENV], KEYS_ENV), KEYS_ENV, "env"
    elif legacy is not None:
        return SecretKeys((legacy,), f"{secrets_where} (beside the database; see {OPTION})", "default",
                          legacy=legacy)
    else:
        return None
    if legacy is not None and legacy not in keys:
        return SecretKeys((*keys, legacy), f"{where} (and the old key in {secrets_where})", source,
                          key_file, legacy)
    return SecretKeys(keys, where, source, key_file, legacy if legacy in keys else None)


def generate_key() -> str:
    return Fernet.generate_key().decode()


def write_key_file(path: Path, keys: Sequence[str]) -> None:
    """Write a key file (mode 0600), replacing it atomically. Raises UserError when it cannot be written."""
    text = ("# vv-ota secrets keys: the first encrypts, every one decrypts (build.py server secrets ...)\n"
            + "".join(f"{k}\n" for k in keys))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_private(path, text.encode())
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def add_new_key(path: Path) -> tuple[str, int]:
    """Put a fresh key first in the key file ``path`` (created when missing); the keys already there stay for
    decryption. Returns (the new key, how many keys the file now holds). Raises UserError."""
    old = read_key_file(path) if path.exists() else ()
    key = generate_key()
    write_key_file(path, (key, *old))
    return key, len(old) + 1


def _secret_rows(conn: sa.Connection, lock: bool = False) -> list[sa.Row[tuple[str, str, str, str]]]:
    q = sa.select(cv.c.scope, cv.c.owner, cv.c.name, cv.c.value).where(cv.c.secret.is_(True))
    return list(conn.execute(q.with_for_update() if lock else q))


def _undecryptable(fernet: MultiFernet, rows: Sequence[sa.Row[tuple[str, str, str, str]]]) -> list[str]:
    bad = []
    for r in rows:
        try:
            fernet.decrypt(r.value.encode())
        except InvalidToken:
            bad.append(f"{r.scope} {r.owner}: {r.name}")
    return bad


def _refusal(bad: list[str], total: int, keys: SecretKeys | None) -> UserError:
    where = keys.where if keys is not None else "nowhere (no key is configured)"
    some = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
    return UserError(
        f"{len(bad)} of {total} secret configuration values in the database cannot be decrypted with the secrets "
        f"keys from {where} ({some}). Give the key they were encrypted with: {HOW} — e.g. the secrets.key of the "
        "backup this database comes from. Refusing to go on: devices would get configurations without their "
        "secrets")


def check_database(db_url: str, keys: SecretKeys | None) -> int:
    """Decrypt every secret in the database with ``keys``. Returns how many there are. Raises UserError naming
    the option when one of them does not decrypt (or there are secrets and no key at all)."""
    with open_database(db_url) as engine, engine.connect() as conn:
        rows = _secret_rows(conn)
    if not rows:
        return 0
    if keys is None:
        raise _refusal([f"{r.scope} {r.owner}: {r.name}" for r in rows], len(rows), None)
    bad = _undecryptable(MultiFernet([Fernet(k) for k in keys.keys]), rows)
    if bad:
        raise _refusal(bad, len(rows), keys)
    return len(rows)


def rotate(db_url: str, keys: SecretKeys, storage: Path) -> tuple[int, bool]:
    """Re-encrypt every secret with the first key, in one transaction (all or nothing). Then, if the old
    default key of ``STORAGE/server-secrets.json`` was among the keys and is not the first, remove it from that
    file. Returns (secrets re-encrypted, old default key removed). Raises UserError when a secret does not
    decrypt with any key (nothing is changed then)."""
    fernet = MultiFernet([Fernet(k) for k in keys.keys])
    with open_database(db_url) as base, base.execution_options(sqlite_begin="IMMEDIATE").begin() as conn:
        rows = _secret_rows(conn, lock=True)
        bad = _undecryptable(fernet, rows)
        if bad:
            raise _refusal(bad, len(rows), keys)
        for r in rows:
            conn.execute(cv.update().where(cv.c.scope == r.scope, cv.c.owner == r.owner, cv.c.name == r.name)
                         .values(value=fernet.rotate(r.value.encode()).decode()))
        confighash.refresh_all(conn)  # new tokens, new hashes: the devices fetch once and find the same values
    removed = False
    path = storage / SECRETS_FILE
    # shared secrets (--secrets-file, $OTA_SERVER_SECRETS) are not rewritten here: the operator edits them
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if keys.legacy is not None and keys.legacy != keys.keys[0] and doc.get("fernet_key") == keys.legacy:
        doc.pop("fernet_key", None)
        try:
            replace_private(path, json.dumps(doc).encode())
        except OSError as e:
            raise UserError(f"re-encrypted, but cannot remove the old key from {path}: {e.strerror}") from None
        removed = True
    return len(rows), removed
