"""Bulk accept (``POST /api/management/v2/devauth/devices/accept``): many devices in one call, by id or by a
filter, with one result per device. Idempotent: an accepted device stays as it is.

Only a device with exactly one pending key and no accepted one is accepted: a second key of an accepted device (a
cloned identity, or a key rotation) and a device with several pending keys are left for an administrator to look
at one by one. Each accepted device gets the staged configuration that matches it (:func:`apply_staged`), and
one audit entry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

from .ansible_import import apply_staged
from .configvars import ConfigStore
from .devauth import set_auth_status
from .errors import bad_request
from .models import auth_sets, devices

MAX_DEVICES = 10_000


def select_ids(c: sa.Connection, status: str, identity: Mapping[str, str | int] | None, group: str | None
               ) -> list[str]:
    """The ids of the devices a filter selects (at most MAX_DEVICES, else 400)."""
    q = sa.select(devices.c.id, devices.c.identity_json).where(devices.c.status == status) \
        .order_by(devices.c.created, devices.c.id)
    if group is not None:
        q = q.where(devices.c.group_name == group)
    ids = []
    for r in c.execute(q):
        if identity:
            try:
                ident = json.loads(r.identity_json)
            except ValueError:
                continue
            if not isinstance(ident, dict) or any(str(ident.get(k)) != str(v) or k not in ident
                                                  for k, v in identity.items()):
                continue
        ids.append(r.id)
        if len(ids) > MAX_DEVICES:
            raise bad_request(f"the filter selects more than {MAX_DEVICES} devices: narrow it")
    return ids


def accept_devices(c: sa.Connection, config: ConfigStore, ids: list[str], record: Callable[[str], None]
                   ) -> list[dict[str, Any]]:
    """Accept each device (see the module's docstring); ``record`` writes one audit entry per accepted device."""
    results = []
    for device_id in dict.fromkeys(ids):  # once each, in order
        row = c.execute(sa.select(devices.c.id).where(devices.c.id == device_id).with_for_update()).first()
        if row is None:
            results.append({"id": device_id, "result": "not found"})
            continue
        sets = c.execute(sa.select(auth_sets.c.id, auth_sets.c.status)
                         .where(auth_sets.c.device_id == device_id)).all()
        pending = [s.id for s in sets if s.status == "pending"]
        if any(s.status == "accepted" for s in sets):
            note = "; another key is pending: review it by hand" if pending else ""
            results.append({"id": device_id, "result": "already accepted" + note})
        elif len(pending) != 1:
            results.append({"id": device_id, "result": "no pending key" if not pending else
                            f"{len(pending)} pending keys: accept one by hand"})
        else:
            set_auth_status(c, device_id, pending[0], "accepted")
            staged = apply_staged(c, config, device_id)
            record(f"auth set {pending[0]} of device {device_id} set to accepted (bulk accept)"
                   + (f"; {staged}" if staged else ""))
            results.append({"id": device_id, "result": "accepted", "auth_set": pending[0],
                            **({"staged": staged} if staged else {})})
    return results
