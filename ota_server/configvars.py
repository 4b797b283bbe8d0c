"""Configuration variables (the per-device ``.env`` values such as ``DEVICE_ID`` and ``DVR_IP``).

Variables belong to a device or to a group. A device receives its group's variables overridden by its own.
A value whose name is listed in ``_secrets`` is a secret: stored encrypted (Fernet; the keys are kept apart
from the database, see :mod:`.secretkeys`: the first key encrypts, any of them decrypts), shown to
administrators only as ``SECRET_MASK``, decrypted only for the device itself. Writing ``SECRET_MASK`` back as a
secret's value keeps the stored secret (so a GET → edit → PUT round trip works). A secret that no key decrypts
is an error the device sees (503), never a configuration without it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy.engine import Connection

from ota_common import sshkeys
from ota_common.varnames import GROUP_RE, MAX_VALUE, MAX_VARS, NAME_RE, SECRETS_KEY, is_group_name, is_var_name

from . import confighash
from .db import advisory_xact_lock
from .errors import APIError, bad_request
from .models import config_values as cv
from .timeutil import now

__all__ = ["GROUP_RE", "MAX_VALUE", "MAX_VARS", "NAME_RE", "SECRETS_KEY", "SECRET_MASK", "ConfigStore", "Stored",
           "check_group_name", "parse_config_body", "scalar_to_str"]
SECRET_MASK = "********"
log = logging.getLogger("ota_server")


def check_group_name(name: Any) -> str:
    if not is_group_name(name):
        raise bad_request(f"invalid group name {name!r}: use 1-64 characters A-Z a-z 0-9 _ -")
    return str(name)


def scalar_to_str(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):  # 1e999, NaN
            raise bad_request(f"value of {name} must be a finite number")
        return str(value)
    if isinstance(value, str):
        if len(value) > MAX_VALUE:
            raise bad_request(f"value of {name} is longer than {MAX_VALUE} characters")
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in YAML)
            raise bad_request(f"value of {name} is not valid Unicode text") from None
        return value
    raise bad_request(f"value of {name} must be a string, number or boolean, not {type(value).__name__}")


def parse_config_body(body: Any) -> tuple[dict[str, str], set[str]]:
    """``{name: value, ..., "_secrets": [names]}`` → (values as strings, secret names)."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object of name: value pairs")
    secrets_raw = body.get(SECRETS_KEY, [])
    if not isinstance(secrets_raw, list) or not all(isinstance(s, str) for s in secrets_raw):
        raise bad_request(f"{SECRETS_KEY} must be a list of variable names")
    values: dict[str, str] = {}
    for name, value in body.items():
        if name == SECRETS_KEY:
            continue
        if not is_var_name(name):
            raise bad_request(f"invalid variable name {name!r}: letters, digits, _ . - (not starting with a digit)")
        values[name] = scalar_to_str(name, value)
    if len(values) > MAX_VARS:
        raise bad_request(f"at most {MAX_VARS} variables")
    unknown = sorted(set(secrets_raw) - set(values))
    if unknown:
        raise bad_request(f"{SECRETS_KEY} names variables that are not set: {', '.join(unknown)}")
    keys = values.get(sshkeys.VARIABLE)
    # the keys give root a shell on the device (which refuses a bad value too): refused here, where it is set
    if keys is not None and not (keys == SECRET_MASK and sshkeys.VARIABLE in secrets_raw):
        why = sshkeys.check_value(keys)
        if why:
            raise bad_request(f"{sshkeys.VARIABLE}: {why}")
    return values, set(secrets_raw)


@dataclass
class Stored:
    values: dict[str, str] = field(default_factory=dict)  # plaintext, or Fernet token for secrets
    secrets: set[str] = field(default_factory=set)
    updated: float | None = None


class ConfigStore:
    """Reads and writes configuration variables; ``keys`` are Fernet keys (urlsafe base64), the first one
    encrypts, every one decrypts. Without keys, storing a secret is refused (503)."""

    def __init__(self, keys: Sequence[str | bytes]) -> None:
        self._fernet = MultiFernet([Fernet(k) for k in keys]) if keys else None

    def _require_keys(self) -> MultiFernet:
        if self._fernet is None:
            raise APIError(503, "this server has no secrets key (--secrets-key-file): secrets cannot be stored")
        return self._fernet

    def load(self, conn: Connection, scope: str, owner: str) -> Stored:
        s = Stored()
        for r in conn.execute(sa.select(cv.c.name, cv.c.value, cv.c.secret, cv.c.updated)
                              .where(cv.c.scope == scope, cv.c.owner == owner)):
            s.values[r.name] = r.value
            if r.secret:
                s.secrets.add(r.name)
            s.updated = max(s.updated or 0.0, r.updated)
        return s

    def masked(self, stored: Stored) -> dict[str, str]:
        return {k: SECRET_MASK if k in stored.secrets else v for k, v in sorted(stored.values.items())}

    def plain(self, stored: Stored, owner: str = "") -> dict[str, str]:
        """The values with secrets decrypted. Raises APIError 503 when a secret cannot be decrypted (encrypted
        with a key this server does not have, or damaged): a device must keep its last configuration rather
        than get one without the secret."""
        out = {}
        for k, v in stored.values.items():
            if k in stored.secrets:
                try:
                    v = self.decrypt(v)
                except InvalidToken:
                    log.error("the secret %s of %s cannot be decrypted with this server's secrets keys", k, owner)
                    raise APIError(503, f"the secret {k} cannot be decrypted with this server's secrets key; the "
                                   "configuration is withheld (keep the last one) until an administrator restores "
                                   "the key or sets the value again", {"Retry-After": "600"}) from None
            out[k] = v
        return out

    def decrypt(self, token: str) -> str:
        """Raises InvalidToken when no key decrypts ``token`` (or there is no key)."""
        if self._fernet is None:
            raise InvalidToken
        return self._fernet.decrypt(token.encode()).decode()

    def replace(self, conn: Connection, scope: str, owner: str, values: Mapping[str, str], secrets: Iterable[str],
                merge: bool = False) -> None:
        """Set the variables of one owner (all of them, or only the given ones with ``merge``)."""
        secrets = set(secrets)
        advisory_xact_lock(conn, f"config:{scope}:{owner}")  # one writer per owner: no duplicate-key race
        old = self.load(conn, scope, owner)
        rows = []
        t = now()
        for name, value in values.items():
            if name in secrets:
                if value == SECRET_MASK and name in old.secrets:
                    stored = old.values[name]  # unchanged secret
                else:
                    stored = self._require_keys().encrypt(value.encode()).decode()
            else:
                stored = value
            rows.append({"scope": scope, "owner": owner, "name": name, "value": stored, "secret": name in secrets,
                         "updated": t})
        q = cv.delete().where(cv.c.scope == scope, cv.c.owner == owner)
        if merge:
            q = q.where(cv.c.name.in_(list(values)))
        conn.execute(q)
        if rows:
            conn.execute(cv.insert(), rows)
        if scope == "device":  # the devices whose effective configuration this is: their hash follows
            confighash.refresh(conn, device_ids=[owner])
        elif scope == "group":
            confighash.refresh(conn, group=owner)

    def for_device(self, conn: Connection, device_id: str, group: str | None) -> dict[str, str]:
        """What the device receives: its group's variables overridden by its own, secrets decrypted. Raises
        APIError 503 when a secret cannot be decrypted (see :meth:`plain`)."""
        return self.for_device_hashed(conn, device_id, group)[0]

    def for_device_hashed(self, conn: Connection, device_id: str, group: str | None) -> tuple[dict[str, str], str]:
        """:meth:`for_device` and the hash of that configuration (:mod:`.confighash`), from the same rows."""
        grp = self.load(conn, "group", group) if group else None
        own = self.load(conn, "device", device_id)
        out = self.plain(grp, f"group {group}") if grp else {}
        out.update(self.plain(own, f"device {device_id}"))
        return out, confighash.effective_hash(_rows(grp) if grp else None, _rows(own))


def _rows(stored: Stored) -> dict[str, tuple[str, bool]]:
    return {k: (v, k in stored.secrets) for k, v in stored.values.items()}
