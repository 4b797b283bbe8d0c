"""Bulk provisioning (``POST /api/management/v2/devauth/devices/provision``): ``build.py provision`` registers the
cards it writes, many devices per call, so that each card's first auth request is accepted at once and the device
gets its configuration without a manual step.

Body: ``{"devices": [item, ...]}`` (at most :data:`MAX_ITEMS`; the CLI sends batches), each item
``{"identity_data": {"device_id": ID}, "pubkey": PEM, "group": name | null, "variables": {...}, "secrets":
[names]}``. Every item is checked first (like a preauthorization and a configuration PUT: the key, the identity, the
group, the variable names and values); a bad item is refused with its index and nothing is written. Then, in one
transaction, each device is preauthorized with its key, put in its group (``null``: no group) and given exactly
these variables (secrets encrypted, see :mod:`.configvars`), with one audit entry per device.

Re-provisioning (a new card, so a new key, for a known identity): the new key is the device's only valid one.
Every other key of the device is rejected — a preauthorized one, a pending one, and an **accepted** one too: the
old card is retired, its tokens stop working at its next request (the token epoch goes up), and the device shows as
``preauthorized`` until the new card authenticates; its history (deployments, inventory) stays with the same device
id. Provisioning the same key again changes nothing about its keys (an accepted key stays accepted): a batch can be
sent again after a time-out.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from ota_common.deviceid import IDENTITY_KEY, is_device_id
from ota_common.varnames import SECRETS_KEY

from .ansible_import import apply_staged
from .apitokens import READ, Caller, Operator
from .audit import names
from .auth import canonical_identity, load_device_pubkey, normalize_pubkey, sha256_hex
from .configvars import check_group_name, parse_config_body
from .context import ServerContext, get_ctx
from .devauth import set_auth_status
from .errors import APIError, bad_request
from .models import auth_sets, devices
from .timeutil import now

router = APIRouter(dependencies=[Depends(READ)])
Ctx = Annotated[ServerContext, Depends(get_ctx)]
PROVISION = "/api/management/v2/devauth/devices/provision"
#: devices in one call (the CLI sends batches of this size)
MAX_ITEMS = 1000


class ProvisionItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    identity_data: dict[str, Any] = Field(min_length=1)
    pubkey: str
    group: str | None = None
    variables: dict[str, Any] = Field(default_factory=dict)
    secrets: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class Checked:
    """One item, checked: what is written for it."""

    index: int
    device_id: str  # the identity's device_id
    identity_json: str
    pubkey_pem: str
    group: str | None
    values: dict[str, str]
    secrets: set[str]


def _item_error(index: int, label: str, message: str) -> APIError:
    return bad_request(f"item {index}{label}: {message}")


def check_item(index: int, raw: Any) -> Checked:
    """Raises APIError 400 naming the item's index (and its device id once known)."""
    try:
        item = ProvisionItem.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "item"
        raise _item_error(index, "", f"{where}: {first['msg']}") from None
    dev = item.identity_data.get(IDENTITY_KEY)
    if not is_device_id(dev):
        raise _item_error(index, "", f"identity_data.{IDENTITY_KEY} must be a DEVICE_ID (1-63 characters A-Z a-z "
                                     "0-9 . _ -, starting with a letter or digit)")
    label = f" ({dev})"
    try:
        pem = normalize_pubkey(load_device_pubkey(item.pubkey))
        ident = canonical_identity(item.identity_data)
        group = None if item.group is None else check_group_name(item.group)
        if SECRETS_KEY in item.variables:
            raise bad_request(f"give the secret names in 'secrets', not as the variable {SECRETS_KEY}")
        values, secrets = parse_config_body({**item.variables, SECRETS_KEY: item.secrets})
    except APIError as e:
        raise _item_error(index, label, e.message) from None
    return Checked(index, str(dev), ident, pem, group, values, secrets)


def check_body(body: Any) -> list[Checked]:
    """All items checked, and no identity or key given twice. Raises APIError 400."""
    if not isinstance(body, dict) or set(body) != {"devices"} or not isinstance(body["devices"], list):
        raise bad_request('the body must be {"devices": [...]}')
    items = body["devices"]
    if not 1 <= len(items) <= MAX_ITEMS:
        raise bad_request(f"give 1 to {MAX_ITEMS} devices per call, not {len(items)}")
    checked = [check_item(i, raw) for i, raw in enumerate(items)]
    seen_ident: dict[str, int] = {}
    seen_key: dict[str, int] = {}
    for c in checked:
        for seen, what, key in ((seen_ident, "identity", c.identity_json), (seen_key, "public key", c.pubkey_pem)):
            if key in seen:
                raise _item_error(c.index, f" ({c.device_id})", f"the same {what} as item {seen[key]}")
            seen[key] = c.index
    return checked


def _foreign_key_owner(c: sa.Connection, item: Checked, device_id: str | None) -> str | None:
    """Another device that already has this public key (a key belongs to one device), or None."""
    q = sa.select(auth_sets.c.device_id).where(auth_sets.c.pubkey_hash == sha256_hex(item.pubkey_pem))
    if device_id is not None:
        q = q.where(auth_sets.c.device_id != device_id)
    row = c.execute(q.limit(1)).first()
    return None if row is None else str(row.device_id)


def provision_one(c: sa.Connection, item: Checked) -> tuple[str, str]:
    """Preauthorize one device with its key (see the module's docstring for a known identity). Returns (the
    server's device id, what happened: ``new``, ``key replaced`` or ``key unchanged``)."""
    t = now()
    ident_hash = sha256_hex(item.identity_json)
    key_hash = sha256_hex(item.pubkey_pem)
    row = c.execute(sa.select(devices.c.id).where(devices.c.identity_hash == ident_hash).with_for_update()).first()
    owner = _foreign_key_owner(c, item, None if row is None else row.id)
    if owner is not None:
        raise _item_error(item.index, f" ({item.device_id})", f"this public key belongs to another device ({owner})")
    if row is None:
        device_id = str(uuid.uuid4())
        c.execute(devices.insert().values(id=device_id, identity_json=item.identity_json, identity_hash=ident_hash,
                                          status="preauthorized", inventory={}, created=t, updated=t))
        c.execute(auth_sets.insert().values(id=str(uuid.uuid4()), device_id=device_id, pubkey=item.pubkey_pem,
                                            pubkey_hash=key_hash, status="preauthorized", created=t))
        return device_id, "new"
    device_id = row.id
    sets = c.execute(sa.select(auth_sets.c.id, auth_sets.c.status, auth_sets.c.pubkey_hash)
                     .where(auth_sets.c.device_id == device_id)).all()
    same = next((s for s in sets if s.pubkey_hash == key_hash), None)
    if same is None:
        keep = str(uuid.uuid4())
        c.execute(auth_sets.insert().values(id=keep, device_id=device_id, pubkey=item.pubkey_pem,
                                            pubkey_hash=key_hash, status="preauthorized", created=t))
    else:
        keep = same.id
    if same is None or same.status != "accepted":
        set_auth_status(c, device_id, keep, "preauthorized")  # and the device's status follows
    for s in sets:
        if s.id != keep and s.status != "rejected":
            set_auth_status(c, device_id, s.id, "rejected")  # an accepted one: its tokens stop working
    return device_id, "key unchanged" if same is not None else "key replaced"


def provision(c: sa.Connection, ctx: ServerContext, who: Caller, items: list[Checked]) -> list[dict[str, Any]]:
    """Write every item (inside the caller's transaction: an error rolls all of them back)."""
    results = []
    for item in items:
        device_id, what = provision_one(c, item)
        staged = apply_staged(c, ctx.config, device_id)  # a staged host for it goes; the item's values win
        c.execute(devices.update().where(devices.c.id == device_id).values(group_name=item.group, updated=now()))
        ctx.config.replace(c, "device", device_id, item.values, item.secrets)
        who.record(c, f"provisioned device {device_id} ({IDENTITY_KEY} {item.device_id}; {what}; group "
                      f"{item.group or 'none'}; variables: {names(item.values)}; secret: {names(item.secrets)})"
                      + (f"; {staged} (replaced by the provisioned values)" if staged else ""))
        results.append({"id": device_id, IDENTITY_KEY: item.device_id, "result": what, "group": item.group})
    return results


@router.post(PROVISION, tags=["devices"], openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "example": {"devices": [{
        "identity_data": {IDENTITY_KEY: "cam-0001"}, "pubkey": "-----BEGIN PUBLIC KEY-----\n...",
        "group": "north", "variables": {"DVR_IP": "10.0.0.5", "DVR_PASSWORD": "s3cret"},
        "secrets": ["DVR_PASSWORD"]}]}}}}}})
async def provision_devices(request: Request, ctx: Ctx, who: Operator) -> dict[str, Any]:
    """Preauthorize many devices with their keys, groups and variables in one transaction (``build.py
    provision``): ``{"devices": [{"identity_data": {"device_id": ID}, "pubkey": PEM, "group": name | null,
    "variables": {...}, "secrets": [names]}, ...]}``, at most 1000. A bad item is refused (400) with its index and
    nothing is written. A known identity gets the new key as its only valid one: its other keys, an accepted one
    included, are rejected (the old card stops working). Answer: ``ids`` (the server's device ids, in the order of
    the items) and one result per device."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise bad_request("the body is not valid JSON") from None
    items = check_body(body)

    def write() -> list[dict[str, Any]]:
        with ctx.db.write() as c:
            return provision(c, ctx, who, items)

    results = await run_in_threadpool(write)
    return {"ids": [r["id"] for r in results], "devices": results, "provisioned": len(results)}
