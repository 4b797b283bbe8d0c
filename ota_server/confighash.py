"""The hash of a device's effective configuration, kept in ``devices.config_hash`` so that every ``next`` answer
(the route's and the poll shortcut's, :mod:`.fastpoll`) can carry it in a header without another read.

The hash is sha256 over the canonical JSON of the effective configuration: the group's variables overridden by
the device's own, each secret as ``{"secret": <its Fernet token>}``. Secrets are thus in the hash input (a new
secret value is a new token) without ever being decrypted for it, and the hash of a guessable secret cannot be
tested offline by whoever reads it (the token holds a random IV). Re-encrypting (``secrets rotate``) changes the
hash without a change of values: the devices fetch once more and find nothing to do.

It is computed when something it depends on changes, never per poll: :func:`refresh` after a device's or a
group's variables are replaced (:meth:`.configvars.ConfigStore.replace`) and after a device changes group. A
device whose column is NULL (a new one: no variables, no group) has :data:`EMPTY_HASH`, the empty configuration's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ota_common.varnames import is_config_hash

from .auth import canonical_json, sha256_hex
from .models import config_values as cv
from .models import devices

_Rows = Mapping[str, tuple[str, bool]]  # name -> (stored value, secret)
CHUNK = 500  # ids per IN (...) list: well under SQLite's and PostgreSQL's parameter limits


def effective_hash(group_rows: _Rows | None, own_rows: _Rows) -> str:
    """The hash of what the device receives (its group's variables overridden by its own)."""
    merged: dict[str, Any] = {}
    for rows in (group_rows or {}, own_rows):
        for name, (value, secret) in rows.items():
            merged[name] = {"secret": value} if secret else value
    return sha256_hex(canonical_json(merged))


EMPTY_HASH = effective_hash(None, {})


def _rows(conn: Connection, scope: str, owners: list[str]) -> dict[str, dict[str, tuple[str, bool]]]:
    out: dict[str, dict[str, tuple[str, bool]]] = {o: {} for o in owners}
    for i in range(0, len(owners), CHUNK):
        for r in conn.execute(sa.select(cv.c.owner, cv.c.name, cv.c.value, cv.c.secret)
                              .where(cv.c.scope == scope, cv.c.owner.in_(owners[i:i + CHUNK]))):
            out[r.owner][r.name] = (r.value, bool(r.secret))
    return out


def refresh(conn: Connection, *, device_ids: Iterable[str] = (), group: str | None = None) -> int:
    """Recompute ``devices.config_hash`` of the given devices and of every device in ``group`` (inside the
    caller's transaction, after its change). Returns how many changed."""
    q = sa.select(devices.c.id, devices.c.group_name, devices.c.config_hash)
    ids = list(device_ids)
    targets: dict[str, Any] = {}
    for i in range(0, len(ids), CHUNK):
        targets.update({r.id: r for r in conn.execute(q.where(devices.c.id.in_(ids[i:i + CHUNK])))})
    if group is not None:
        targets.update({r.id: r for r in conn.execute(q.where(devices.c.group_name == group))})
    return _store(conn, list(targets.values()))


def refresh_all(conn: Connection) -> int:
    """Recompute every device's hash (the migration that adds the column; ``secrets rotate``)."""
    return _store(conn, list(conn.execute(sa.select(devices.c.id, devices.c.group_name, devices.c.config_hash))))


def _store(conn: Connection, targets: list[Any]) -> int:
    if not targets:
        return 0
    own = _rows(conn, "device", [t.id for t in targets])
    groups = _rows(conn, "group", sorted({t.group_name for t in targets if t.group_name}))
    changed = []
    for t in targets:
        h = effective_hash(groups.get(t.group_name) if t.group_name else None, own[t.id])
        if h != (t.config_hash or EMPTY_HASH):
            changed.append({"_id": t.id, "_hash": h})
    if changed:
        conn.execute(devices.update().where(devices.c.id == sa.bindparam("_id"))
                     .values(config_hash=sa.bindparam("_hash")), changed)
    return len(changed)


def poll_hash(stored: str | None) -> str:
    """The header value for a device row's ``config_hash``."""
    return stored or EMPTY_HASH


def sync_state(stored: str | None, inventory: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the management API shows of a device's configuration delivery: the server's hash, the one the device
    reports it applied (its inventory's ``config_hash``), whether they agree, and a refusal the device reported
    (``config_status``, ``config_refused``, ``config_refused_hash``). Reported values that are not of their
    shape show as None (the inventory is the device's word)."""
    inv = inventory or {}
    applied = inv.get("config_hash")
    applied = applied if is_config_hash(applied) else None
    status = inv.get("config_status")
    refused = inv.get("config_refused")
    refused_hash = inv.get("config_refused_hash")
    server = poll_hash(stored)
    return {"config_hash": server, "applied_hash": applied, "in_sync": applied == server,
            "config_status": status if status in STATUSES else None,
            "config_refused": refused[:1000] if isinstance(refused, str) and refused else None,
            "refused_hash": refused_hash if is_config_hash(refused_hash) else None}


#: the agent's ``config_status`` values
STATUSES = ("applied", "refused", "reverted")

__all__ = ["EMPTY_HASH", "STATUSES", "effective_hash", "poll_hash", "refresh", "refresh_all", "sync_state"]
