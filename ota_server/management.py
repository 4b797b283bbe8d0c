"""The management API (``Authorization: Bearer <API token>``; every route declares its scope, see
:mod:`ota_server.apitokens`, and every change is written to the audit log): devices, inventory, configuration
variables, artifacts and deployments. Paths and JSON shapes follow Mender's management API where it has the operation;
our extensions are extra fields. Lists are plain JSON arrays; errors are ``{"error": "message"}``."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ota_common.fleetca import MAX_DEVICE_CERT

from . import confighash, revocation
from . import deployments as rollout
from .ansible_import import ImportPlan, apply_staged, import_inventory, parse_body, staged_list
from .apitokens import READ, Caller, Operator
from .audit import names
from .auth import canonical_identity, load_device_pubkey, normalize_pubkey, sha256_hex
from .bulk_accept import MAX_DEVICES, accept_devices, select_ids
from .configvars import GROUP_RE, check_group_name, parse_config_body
from .context import ServerContext, get_ctx
from .db import where_given
from .devauth import set_auth_status
from .errors import bad_request, conflict, found_or_404, not_found
from .lastseen import is_stale, stale_clause
from .models import auth_sets, devices
from .models import config_values as cv
from .timeutil import now, rfc3339

#: every route needs a valid token (scope read at least); routes that change something declare ``operate``
router = APIRouter(dependencies=[Depends(READ)])
READS = [Depends(READ)]
Ctx = Annotated[ServerContext, Depends(get_ctx)]
Page = Annotated[int, Query(ge=1, le=1_000_000)]
PerPage = Annotated[int, Query(ge=1, le=10_000)]
DEFAULT_PER_PAGE = 500
ID_MAX = 64


def _json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise bad_request("the body is not valid JSON") from None


def _created(location: str, body: dict[str, Any] | None = None) -> Response:
    if body is None:
        return Response(status_code=201, headers={"Location": location})
    return JSONResponse(body, status_code=201, headers={"Location": location})


# ---------------------------------------------------------------------------------------------------------
# Device authentication (devauth v2)

DEVAUTH = "/api/management/v2/devauth/devices"


def _device_doc(row: Any, sets: list[Any], cutoff: float) -> dict[str, Any]:
    identity = json.loads(row.identity_json)
    return {
        "id": row.id,
        "identity_data": identity,
        "status": row.status,
        "auth_sets": [{"id": s.id, "identity_data": identity, "pubkey": s.pubkey, "status": s.status,
                       "ts": rfc3339(s.created), **_cert_doc(s)} for s in sets],
        "created_ts": rfc3339(row.created),
        "updated_ts": rfc3339(row.updated),
        "decommissioning": False,
        # extensions: the last authenticated request (written in batches: up to last_seen_flush_seconds late)
        # and whether an accepted device has been silent for longer than stale_after
        "last_seen": rfc3339(row.last_seen),
        "stale": is_stale(row.status, row.last_seen, row.updated, cutoff),
    }


def _cert_doc(s: Any) -> dict[str, Any]:
    """Our extension: the fleet certificate that accepted the set (``refused``: null), or the last one refused
    and why (``refused``: a reason such as ``expired``), so that the pending list says why a device waits."""
    if s.cert_serial is None and s.cert_refused is None:
        return {}
    return {"device_cert": {"serial": s.cert_serial, "refused": s.cert_refused}}


def _devices(conn: sa.Connection, cutoff: float, *where: Any, page: int = 1, per_page: int = DEFAULT_PER_PAGE
             ) -> list[dict[str, Any]]:
    """The devices matching ``where``, one page; ``cutoff`` (now - stale_after) says which are stale."""
    q = (sa.select(devices).where(*where).order_by(devices.c.created, devices.c.id).limit(per_page)
         .offset((page - 1) * per_page))
    rows = conn.execute(q).all()
    sets: dict[str, list[Any]] = {r.id: [] for r in rows}
    if rows:
        for s in conn.execute(sa.select(auth_sets).where(auth_sets.c.device_id.in_(list(sets)))
                              .order_by(auth_sets.c.created)):
            sets[s.device_id].append(s)
    return [_device_doc(r, sets[r.id], cutoff) for r in rows]


class Preauth(BaseModel):
    model_config = ConfigDict(extra="forbid")
    identity_data: dict[str, Any] = Field(min_length=1)
    pubkey: str
    force: bool = False


@router.post(DEVAUTH, status_code=201, tags=["devices"], response_class=Response)
def preauthorize(body: Preauth, ctx: Ctx, who: Operator) -> Response:
    """Preauthorize a device (identity + public key): it is accepted at its first auth request."""
    pem = normalize_pubkey(load_device_pubkey(body.pubkey))
    ident = canonical_identity(body.identity_data)
    t = now()
    device_id = str(uuid.uuid4())
    with ctx.db.write() as c:
        existing = c.execute(sa.select(devices.c.id).where(devices.c.identity_hash == sha256_hex(ident))).first()
        if existing is not None:
            raise conflict(f"a device with this identity already exists: {existing.id}")
        c.execute(devices.insert().values(id=device_id, identity_json=ident, identity_hash=sha256_hex(ident),
                                          status="preauthorized", inventory={}, created=t, updated=t))
        c.execute(auth_sets.insert().values(id=str(uuid.uuid4()), device_id=device_id, pubkey=pem,
                                            pubkey_hash=sha256_hex(pem), status="preauthorized", created=t))
        staged = apply_staged(c, ctx.config, device_id)
        who.record(c, f"preauthorized device {device_id} (identity: {names(body.identity_data)})"
                      + (f"; {staged}" if staged else ""))
    return _created(f"{DEVAUTH}/{device_id}")


@router.get(DEVAUTH, tags=["devices"], dependencies=READS)
def list_devices(ctx: Ctx, status: Annotated[str | None, Query(pattern="^(pending|accepted|rejected|preauthorized)$")] = None,
                 stale: Annotated[bool | None, Query(description="only the stale devices (true) or the others (false): "
                                                     "accepted and silent for longer than stale_after")] = None,
                 page: Page = 1, per_page: PerPage = DEFAULT_PER_PAGE) -> list[dict[str, Any]]:
    """Devices, oldest first. ``last_seen`` and ``stale`` (and the ``stale`` filter) are extensions of
    Mender's shape."""
    cutoff = now() - ctx.settings.stale_after
    where = [] if status is None else [devices.c.status == status]
    if stale is not None:
        where.append(stale_clause(cutoff) if stale else sa.not_(stale_clause(cutoff)))
    with ctx.db.read() as c:
        return _devices(c, cutoff, *where, page=page, per_page=per_page)


@router.get(DEVAUTH + "/{device_id}", tags=["devices"], dependencies=READS)
def get_device(device_id: str, ctx: Ctx) -> dict[str, Any]:
    with ctx.db.read() as c:
        found = _devices(c, now() - ctx.settings.stale_after, devices.c.id == device_id)
    if not found:
        raise not_found("device")
    return found[0]


class AuthStatus(BaseModel):
    status: str = Field(pattern="^(accepted|rejected|pending)$")


@router.put(DEVAUTH + "/{device_id}/auth/{auth_id}/status", status_code=204, tags=["devices"])
def put_auth_status(device_id: str, auth_id: str, body: AuthStatus, ctx: Ctx, who: Operator) -> Response:
    """Accept, reject (or return to pending) one auth set. Accepting one rejects the device's other accepted
    set; a device that is no longer accepted gets 401 at its next request."""
    with ctx.db.write() as c:
        found_or_404(c.execute(sa.select(auth_sets.c.id).where(auth_sets.c.id == auth_id,
                                                               auth_sets.c.device_id == device_id)).first(),
                     "device or auth set")
        device_status = set_auth_status(c, device_id, auth_id, body.status)
        staged = apply_staged(c, ctx.config, device_id) if device_status == "accepted" else ""
        who.record(c, f"auth set {auth_id} of device {device_id} set to {body.status} (device now {device_status})"
                      + (f"; {staged}" if staged else ""))
    return Response(status_code=204)


class AcceptFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["pending"] = "pending"
    #: identity attributes that must all be equal
    identity: dict[str, str | int] | None = Field(None, max_length=32)
    group: str | None = Field(None, pattern=GROUP_RE.pattern)


class BulkAccept(BaseModel):
    """Either ``ids`` or ``filter``."""

    model_config = ConfigDict(extra="forbid")
    ids: list[Annotated[str, Field(max_length=ID_MAX)]] | None = Field(None, min_length=1, max_length=MAX_DEVICES)
    filter: AcceptFilter | None = None

    @model_validator(mode="after")
    def _one(self) -> BulkAccept:
        if (self.ids is None) == (self.filter is None):
            raise ValueError("give either ids or filter")
        return self


@router.post(DEVAUTH + "/accept", tags=["devices"])
def bulk_accept(body: BulkAccept, ctx: Ctx, who: Operator) -> dict[str, Any]:
    """Accept many devices: ``{"ids": [...]}`` or ``{"filter": {"status": "pending", "identity": {name: value},
    "group": name}}``. A device is accepted only when it has exactly one pending key and no accepted one; the
    answer has one result per device (``accepted``, ``already accepted``, ``not found``, ...); each accepted
    device gets its staged configuration and one audit entry. Idempotent."""
    with ctx.db.write() as c:
        if body.ids is not None:
            ids = body.ids
        else:
            assert body.filter is not None
            ids = select_ids(c, body.filter.status, body.filter.identity, body.filter.group)
        results = accept_devices(c, ctx.config, ids, lambda summary: who.record(c, summary))
    return {"results": results, "accepted": sum(r["result"] == "accepted" for r in results)}


@router.delete(DEVAUTH + "/{device_id}", status_code=204, tags=["devices"])
def decommission(device_id: str, ctx: Ctx, who: Operator) -> Response:
    """Decommission: the device, its keys, inventory and variables are removed, its tokens stop working at
    once, and its unfinished deployments count it as ``decommissioned``."""
    with ctx.db.write() as c:
        if c.execute(sa.delete(devices).where(devices.c.id == device_id)).rowcount == 0:
            raise not_found("device")
        c.execute(sa.delete(auth_sets).where(auth_sets.c.device_id == device_id))
        c.execute(sa.delete(cv).where(cv.c.scope == "device", cv.c.owner == device_id))
        rollout.decommission_device(c, device_id)
        who.record(c, f"decommissioned device {device_id}")
    return Response(status_code=204)


# ---------------------------------------------------------------------------------------------------------
# Revoked device certificates (zero-touch enrolment, see :mod:`.revocation`)

REVOKED = "/api/management/v2/devauth/certificates/revoked"


class Revoke(BaseModel):
    """Either ``certificate`` (PEM: its key is known then, and every auth set of it is rejected) or ``serial``."""

    model_config = ConfigDict(extra="forbid")
    certificate: str | None = Field(None, max_length=MAX_DEVICE_CERT)
    serial: str | None = Field(None, max_length=64, examples=["3f9a0c51d2"])
    reason: str = Field("", max_length=256)

    @model_validator(mode="after")
    def _one(self) -> Revoke:
        if (self.certificate is None) == (self.serial is None):
            raise ValueError("give either certificate or serial")
        return self


@router.post(REVOKED, tags=["devices"], responses={201: {"description": "revoked now"},
                                                   200: {"description": "already revoked"}})
def revoke_certificate(body: Revoke, ctx: Ctx, who: Operator) -> JSONResponse:
    """Revoke a device certificate of the fleet CA: it (and any certificate for its key) never enrols a device
    again, and every auth set of its key, or that it accepted, is rejected: such a device gets 401 at its next
    request. Idempotent (200 when it was revoked already); ``rejected`` lists the auth sets rejected now."""
    if body.certificate is not None:
        serial, key_hash, device_id = revocation.parse_certificate(body.certificate)
    else:
        assert body.serial is not None
        serial, key_hash, device_id = revocation.normalize_serial(body.serial), None, None
    with ctx.db.write() as c:
        entry, state, rejected = revocation.revoke(c, serial, key_hash, device_id, body.reason.strip(),
                                                   who.principal.name)
        if state != "unchanged" or rejected:
            who.record(c, f"revoked device certificate {serial} ({entry['device_id'] or 'device id unknown'})"
                          + (f": {body.reason.strip()}" if body.reason.strip() else "")
                          + (f"; rejected auth sets: {names(rejected)}" if rejected else ""))
    return JSONResponse({**entry, "rejected": rejected}, status_code=201 if state == "new" else 200)


@router.get(REVOKED, tags=["devices"], dependencies=READS)
def revoked_certificates(ctx: Ctx, page: Page = 1, per_page: PerPage = DEFAULT_PER_PAGE) -> list[dict[str, Any]]:
    """The revoked device certificates, newest first."""
    with ctx.db.read() as c:
        return revocation.revoked_list(c, page, per_page)


# ---------------------------------------------------------------------------------------------------------
# Inventory

INVENTORY = "/api/management/v1/inventory"


def _inventory_doc(row: Any) -> dict[str, Any]:
    attrs: list[dict[str, Any]] = []
    for name, value in sorted(json.loads(row.identity_json).items()):
        attrs.append({"name": name, "value": value, "scope": "identity"})
    attrs.append({"name": "status", "value": row.status, "scope": "identity"})
    for name, value in sorted((row.inventory or {}).items()):
        attrs.append({"name": name, "value": value, "scope": "inventory"})
    if row.group_name:
        attrs.append({"name": "group", "value": row.group_name, "scope": "system"})
    attrs.append({"name": "created_ts", "value": rfc3339(row.created), "scope": "system"})
    updated = max(row.updated, row.inventory_updated or 0)
    attrs.append({"name": "updated_ts", "value": rfc3339(updated), "scope": "system"})
    return {"id": row.id, "attributes": attrs, "updated_ts": rfc3339(updated)}


@router.get(INVENTORY + "/devices", tags=["inventory"], dependencies=READS)
def inventory_devices(ctx: Ctx, group: Annotated[str | None, Query(pattern=GROUP_RE.pattern)] = None,
                      page: Page = 1, per_page: PerPage = DEFAULT_PER_PAGE) -> list[dict[str, Any]]:
    q = sa.select(devices).order_by(devices.c.created, devices.c.id).limit(per_page).offset((page - 1) * per_page)
    with ctx.db.read() as c:
        return [_inventory_doc(r) for r in c.execute(where_given(q, devices.c.group_name, group))]


@router.get(INVENTORY + "/devices/{device_id}", tags=["inventory"], dependencies=READS)
def inventory_device(device_id: str, ctx: Ctx) -> dict[str, Any]:
    with ctx.db.read() as c:
        row = found_or_404(c.execute(sa.select(devices).where(devices.c.id == device_id)).first(), "device")
    return _inventory_doc(row)


class GroupBody(BaseModel):
    group: str = Field(pattern=GROUP_RE.pattern)


@router.put(INVENTORY + "/devices/{device_id}/group", status_code=204, tags=["inventory"])
def put_group(device_id: str, body: GroupBody, ctx: Ctx, who: Operator) -> Response:
    """Move the device into a group. An accepted device joins the group's open dynamic deployments at once
    (in their current phase); deployments it already has are not withdrawn."""
    with ctx.db.write() as c:
        if c.execute(devices.update().where(devices.c.id == device_id)
                     .values(group_name=body.group, updated=now())).rowcount == 0:
            raise not_found("device")
        confighash.refresh(c, device_ids=[device_id])
        joined = rollout.join_open(c, device_id)
        who.record(c, f"device {device_id} moved to group {body.group}"
                      + (f"; joined dynamic deployment(s) {names(joined)}" if joined else ""))
    return Response(status_code=204)


@router.delete(INVENTORY + "/devices/{device_id}/group/{name}", status_code=204, tags=["inventory"])
def delete_group(device_id: str, name: str, ctx: Ctx, who: Operator) -> Response:
    with ctx.db.write() as c:
        if c.execute(devices.update().where(devices.c.id == device_id, devices.c.group_name == name)
                     .values(group_name=None, updated=now())).rowcount == 0:
            raise not_found("device in this group")
        confighash.refresh(c, device_ids=[device_id])
        who.record(c, f"device {device_id} removed from group {name}")
    return Response(status_code=204)


@router.get(INVENTORY + "/groups", tags=["inventory"], dependencies=READS)
def groups(ctx: Ctx) -> list[str]:
    """Groups that have devices or configuration variables."""
    with ctx.db.read() as c:
        names = {r[0] for r in c.execute(sa.select(devices.c.group_name).where(devices.c.group_name.is_not(None))
                                         .distinct())}
        names |= {r[0] for r in c.execute(sa.select(cv.c.owner).where(cv.c.scope == "group").distinct())}
    return sorted(names)


@router.post(INVENTORY + "/import/ansible", tags=["inventory", "configuration"],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/yaml": {"schema": {"type": "string"}}, "text/x-ini": {"schema": {"type": "string"}},
                 "application/json": {"schema": {"type": "object"}}}}})
async def import_ansible(request: Request, ctx: Ctx, who: Operator,
                         dry_run: Annotated[bool, Query(description="report what would change, change nothing")]
                         = False) -> dict[str, Any]:
    """Import groups, group variables and host variables from an Ansible inventory: YAML, INI, or the resolved
    JSON form that ``build.py fleet import-ansible`` sends (see :mod:`ota_server.ansible_import`).

    A host matches a device when its name, or its ``DEVICE_ID`` variable, equals the device id or the
    identity attribute ``hostname``, ``device_id``, ``DEVICE_ID``, ``serial``, ``serial_number`` or ``mac``.
    Matched devices join the host's group; group variables (with inherited ones) become the group's variables,
    host variables the device's (only the names the inventory mentions are replaced). ``_secrets: [names]`` in
    any ``vars`` marks secrets. ``ansible_*`` variables are dropped (``dropped`` names them). A host that no device
    matches yet is staged (``staged``) and applied when a matching device is accepted."""
    plan = ImportPlan.of(parse_body(await request.body(), request.headers.get("content-type")))
    if dry_run:
        with ctx.db.read() as c:
            return import_inventory(c, ctx.config, plan, write=False)[0]
    with ctx.db.write() as c:
        answer, summary = import_inventory(c, ctx.config, plan)
        who.record(c, summary)
    return answer


@router.get(INVENTORY + "/import/ansible/staged", tags=["inventory", "configuration"], dependencies=READS)
def staged_hosts(ctx: Ctx) -> list[dict[str, Any]]:
    """Hosts of an import that wait for their device: ``[{host, device_id_var, group, variables}]`` (names only)."""
    with ctx.db.read() as c:
        return staged_list(c)


# ---------------------------------------------------------------------------------------------------------
# Configuration variables

CONFIG = "/api/management/v1/deviceconfig/configurations"
CONFIG_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "additionalProperties": {"type": ["string", "number", "boolean", "array"]},
    "example": {"DEVICE_ID": "cam-17", "DVR_IP": "10.0.0.5", "DVR_PASSWORD": "s3cret", "_secrets": ["DVR_PASSWORD"]},
}}}}}


def _device_group(c: sa.Connection, device_id: str) -> str | None:
    row = found_or_404(c.execute(sa.select(devices.c.group_name).where(devices.c.id == device_id)).first(), "device")
    return row.group_name  # type: ignore[no-any-return]


@router.put(CONFIG + "/device/{device_id}", status_code=204, tags=["configuration"], openapi_extra=CONFIG_BODY)
async def put_device_config(device_id: str, request: Request, ctx: Ctx, who: Operator) -> Response:
    """Replace the device's variables: ``{name: value, ..., "_secrets": [names]}``."""
    replace_config(ctx, who, "device", device_id, _json_body(await request.body()))
    return Response(status_code=204)


def replace_config(ctx: ServerContext, who: Caller, scope: Literal["device", "group"], owner: str, body: Any) -> None:
    """Replace the variables of a device or a group with ``body`` (``{name: value, ..., "_secrets": [names]}``;
    a secret given as ``SECRET_MASK`` keeps its stored value) and write the audit entry: the API's and the
    dashboard's one way to do it.

    Raises:
        APIError: 400 for a bad body or group name, 404 for an unknown device, 503 for a secret without a key.
    """
    if scope == "group":
        check_group_name(owner)
    values, secrets = parse_config_body(body)
    with ctx.db.write() as c:
        if scope == "device":
            _device_group(c, owner)
        ctx.config.replace(c, scope, owner, values, secrets)
        who.record(c, f"replaced the variables of {scope} {owner}: {names(values)} (secret: {names(secrets)})")


@router.get(CONFIG + "/device/{device_id}", tags=["configuration"], dependencies=READS)
def get_device_config(device_id: str, ctx: Ctx) -> dict[str, Any]:
    """``configured``: the device's own variables; ``effective``: what the device receives (its group's
    overridden by its own). Secrets are masked. ``config_hash``: the hash of ``effective`` the device is told on
    every poll; ``applied_hash``: the one it reports it applied, ``in_sync`` when they are equal; ``config_status``
    (``applied``, ``refused``: invalid for this image, ``reverted``: its health checks failed) with
    ``config_refused`` (why) and ``refused_hash`` as the device reports them."""
    with ctx.db.read() as c:
        row = found_or_404(c.execute(sa.select(devices.c.group_name, devices.c.config_hash, devices.c.inventory)
                                     .where(devices.c.id == device_id)).first(), "device")
        group = row.group_name
        own = ctx.config.load(c, "device", device_id)
        grp = ctx.config.load(c, "group", group) if group else None
    effective = ctx.config.masked(grp) if grp else {}
    effective.update(ctx.config.masked(own))
    secrets = sorted(own.secrets | (grp.secrets - set(own.values) if grp else set()))
    return {"id": device_id, "group": group, "configured": ctx.config.masked(own), "secrets": sorted(own.secrets),
            "effective": dict(sorted(effective.items())), "effective_secrets": secrets,
            "updated_ts": rfc3339(own.updated), **confighash.sync_state(row.config_hash, row.inventory)}


@router.put(CONFIG + "/group/{group}", status_code=204, tags=["configuration"], openapi_extra=CONFIG_BODY)
async def put_group_config(group: str, request: Request, ctx: Ctx, who: Operator) -> Response:
    """Replace a group's variables (our extension): the devices of the group receive them."""
    check_group_name(group)
    replace_config(ctx, who, "group", group, _json_body(await request.body()))
    return Response(status_code=204)


@router.get(CONFIG + "/group/{group}", tags=["configuration"], dependencies=READS)
def get_group_config(group: str, ctx: Ctx) -> dict[str, Any]:
    check_group_name(group)
    with ctx.db.read() as c:
        stored = ctx.config.load(c, "group", group)
    return {"group": group, "configured": ctx.config.masked(stored), "secrets": sorted(stored.secrets),
            "updated_ts": rfc3339(stored.updated)}

