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
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import yaml
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy.engine import Connection

from .db import advisory_xact_lock
from .errors import APIError, bad_request
from .models import config_values as cv
from .models import devices
from .timeutil import now

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
GROUP_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SECRET_MASK = "********"
SECRETS_KEY = "_secrets"
MAX_VALUE = 64 * 1024
MAX_VARS = 1000
log = logging.getLogger("ota_server")


def check_group_name(name: Any) -> str:
    if not isinstance(name, str) or not GROUP_RE.match(name):
        raise bad_request(f"invalid group name {name!r}: use 1-64 characters A-Z a-z 0-9 _ -")
    return name


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
        if not NAME_RE.match(name):
            raise bad_request(f"invalid variable name {name!r}: letters, digits, _ . - (not starting with a digit)")
        values[name] = scalar_to_str(name, value)
    if len(values) > MAX_VARS:
        raise bad_request(f"at most {MAX_VARS} variables")
    unknown = sorted(set(secrets_raw) - set(values))
    if unknown:
        raise bad_request(f"{SECRETS_KEY} names variables that are not set: {', '.join(unknown)}")
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

    def for_device(self, conn: Connection, device_id: str, group: str | None) -> dict[str, str]:
        """What the device receives: its group's variables overridden by its own, secrets decrypted. Raises
        APIError 503 when a secret cannot be decrypted (see :meth:`plain`)."""
        out = self.plain(self.load(conn, "group", group), f"group {group}") if group else {}
        out.update(self.plain(self.load(conn, "device", device_id), f"device {device_id}"))
        return out


# ---------------------------------------------------------------------------------------------------------
# Ansible inventory import

#: identity attributes a host name (or its DEVICE_ID variable) is compared with
MATCH_IDENTITY_KEYS = ("hostname", "device_id", "DEVICE_ID", "serial", "serial_number", "mac")


@dataclass
class HostVars:
    name: str
    group: str | None
    vars: dict[str, Any]
    secrets: set[str]


@dataclass
class ParsedInventory:
    hosts: dict[str, HostVars]
    #: group name → its variables merged with its ancestors' (and ``all``'s), lowest precedence first
    groups: dict[str, dict[str, Any]]
    group_secrets: dict[str, set[str]]
    warnings: list[str]


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be a mapping")
    return value


def parse_ansible_inventory(text: str) -> ParsedInventory:
    """The standard YAML inventory: ``all: {vars, hosts, children: {group: {vars, hosts, children}}}``.
    Precedence as in Ansible: host vars > child group vars > parent group vars > ``all`` vars. A host in
    several groups is placed in the last one read (the server has one group per device) and a warning says so."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise bad_request(f"not a valid YAML inventory: {e}".splitlines()[0]) from None
    except RecursionError:
        raise bad_request("not a valid YAML inventory: nested too deeply") from None
    doc = _mapping(doc, "the inventory")
    if set(doc) - {"all"} and "all" not in doc:  # top-level groups without `all:` are allowed too
        doc = {"all": {"children": doc}}
    root = _mapping(doc.get("all"), "all")
    hosts: dict[str, HostVars] = {}
    groups: dict[str, dict[str, Any]] = {}
    group_secrets: dict[str, set[str]] = {}
    warnings: list[str] = []

    def split_secrets(vars_: dict[str, Any], where: str) -> tuple[dict[str, Any], set[str]]:
        vars_ = dict(vars_)
        raw = vars_.pop(SECRETS_KEY, [])
        if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
            raise bad_request(f"{where}: {SECRETS_KEY} must be a list of variable names")
        return vars_, set(raw)

    def walk(name: str, node: dict[str, Any], inherited: dict[str, Any], inherited_secrets: set[str], depth: int) -> None:
        if depth > 20:
            raise bad_request("the inventory nests groups more than 20 levels deep")
        node_vars, node_secrets = split_secrets(_mapping(node.get("vars"), f"{name}.vars"), f"{name}.vars")
        merged = {**inherited, **node_vars}
        secrets = inherited_secrets | node_secrets
        if name != "all":
            check_group_name(name)
            groups[name] = merged
            group_secrets[name] = secrets
        for host, hvars in _mapping(node.get("hosts"), f"{name}.hosts").items():
            hv, hs = split_secrets(_mapping(hvars, f"host {host}"), f"host {host}")
            host = str(host)
            entry = hosts.setdefault(host, HostVars(host, None, {}, set()))
            entry.vars.update(hv)
            entry.secrets |= hs
            if name != "all":
                if entry.group is not None and entry.group != name:
                    warnings.append(f"host {host} is in groups {entry.group} and {name}; the server keeps {name}")
                entry.group = name
        for child, cnode in _mapping(node.get("children"), f"{name}.children").items():
            walk(str(child), _mapping(cnode, f"group {child}"), merged, secrets, depth + 1)

    walk("all", root, {}, set(), 0)
    all_vars, all_secrets = split_secrets(_mapping(root.get("vars"), "all.vars"), "all.vars")
    for h in hosts.values():
        if h.group is None:  # only under `all`: its device variables carry `all`'s too
            h.vars = {**all_vars, **h.vars}
            h.secrets |= all_secrets
    return ParsedInventory(hosts, groups, group_secrets, warnings)


def match_hosts(conn: Connection, host_names: Iterable[str], host_vars: Mapping[str, Mapping[str, Any]]
                ) -> tuple[dict[str, str], dict[str, str]]:
    """Map host → device id. A host matches a device when the host name, or its ``DEVICE_ID`` variable, equals
    the device id or one of the identity attributes in ``MATCH_IDENTITY_KEYS``. Returns (matched, unmatched
    host → reason)."""
    import json

    index: dict[str, set[str]] = {}
    for r in conn.execute(sa.select(devices.c.id, devices.c.identity_json)):
        keys = {r.id}
        try:
            ident = json.loads(r.identity_json)
        except ValueError:
            ident = {}
        for k in MATCH_IDENTITY_KEYS:
            v = ident.get(k)
            if isinstance(v, (str, int)):
                keys.add(str(v))
        for k in keys:
            index.setdefault(k, set()).add(r.id)
    matched: dict[str, str] = {}
    unmatched: dict[str, str] = {}
    for host in host_names:
        candidates = {host}
        dev_id_var = host_vars.get(host, {}).get("DEVICE_ID")
        if isinstance(dev_id_var, (str, int)):
            candidates.add(str(dev_id_var))
        found: set[str] = set()
        for c in candidates:
            found |= index.get(c, set())
        if len(found) == 1:
            matched[host] = found.pop()
        elif not found:
            unmatched[host] = "no device has this id, hostname, device_id or DEVICE_ID"
        else:
            unmatched[host] = f"ambiguous: {len(found)} devices match"
    return matched, unmatched
