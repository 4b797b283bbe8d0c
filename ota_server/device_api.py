"""The device API: the subset of Mender's that the stock mender-client 3.x and our agent use.

Hot path (``next``, status): one HS256 check, one primary-key read of the device's status, accepted auth set and
token epoch (so a decommission, a rejection or another key accepted is honoured at the very next request, by every
worker: a token is valid only for the auth set and epoch it was issued for), one indexed read of the device's
active deployments; nothing is written unless something changed. Handlers are ``async`` and call the database
directly: the queries are short, and skipping the thread pool is what keeps the poll cheap.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import deployments as rollout
from .auth import AuthRequest, canonical_json, parse_auth_request, sha256_hex
from .context import ServerContext, get_ctx
from .deployments import REPORTABLE
from .downloads import ArtifactFileResponse
from .errors import APIError, bad_request, error_doc, not_found, unauthorized
from .models import artifacts as art_t
from .models import auth_sets, devices
from .models import deployment_devices as dd
from .timeutil import now, rfc3339

router = APIRouter(tags=["device API"])
ROOTFS_CHECKSUM = "rootfs-image.checksum"
AUTH_REQUESTS = "/api/devices/v1/authentication/auth_requests"
NEXT_V2 = "/api/devices/v2/deployments/device/deployments/next"
NEXT_V1 = "/api/devices/v1/deployments/device/deployments/next"
NO_CONTENT = 204


def derive_status(statuses: list[str]) -> str:
    for s in ("accepted", "preauthorized", "pending"):
        if s in statuses:
            return s
    return "rejected" if statuses else "pending"


# ---------------------------------------------------------------------------------------------------------
# Authentication


class AuthRequestBody(BaseModel):
    """Documented for OpenAPI; the handler verifies the signature over the raw bytes."""

    id_data: str = Field(description="JSON string of the identity object")
    pubkey: str = Field(description="PEM public key of the device")
    tenant_token: str = ""


@router.post(
    AUTH_REQUESTS, response_class=Response,
    responses={200: {"content": {"application/jwt": {"schema": {"type": "string"}}}, "description": "the device token"},
               401: error_doc("unknown (now pending), rejected or badly signed"),
               429: error_doc("too many auth requests (per address, per identity) or too many pending devices")},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": AuthRequestBody.model_json_schema()}}}},
)
async def auth_request(request: Request) -> Response:
    """Signed with the device key (``X-MEN-Signature``: RSA PKCS#1 v1.5, ECDSA DER or ed25519 over the body).
    An unknown device is recorded as pending; a preauthorized one is accepted.

    Raises:
        APIError: 400 malformed; 401 badly signed, pending or rejected; 429 too many auth requests from this
            address or for this identity, or too many devices (or keys of this device) already pending.
    """
    ctx = get_ctx(request)
    ctx.auth_limits.check_address(request.client.host if request.client else "")
    body = await request.body()
    req = parse_auth_request(body, request.headers.get("x-men-signature"))
    ctx.auth_limits.check_identity(req.identity_hash)
    try:
        token = _authenticate(ctx, req)
    except sa.exc.IntegrityError:  # the same new device asked twice at once: the other request created it
        token = _authenticate(ctx, req)
    if token is None:
        raise unauthorized("device is not authorized (pending or rejected); an administrator must accept it")
    return Response(token, media_type="application/jwt")


def _authenticate(ctx: ServerContext, req: AuthRequest) -> str | None:
    """Record the auth request; the token when its auth set is accepted (or preauthorized). The device's row
    is locked while its auth sets are looked at, so that its status follows them (an administrator may accept
    or reject at the same moment). Raises IntegrityError when another request created the same device or auth
    set meanwhile (the caller tries again), APIError 429 past the pending caps."""
    settings = ctx.settings
    t = now()
    with ctx.db.write() as c:
        device = c.execute(sa.select(devices.c.id).where(devices.c.identity_hash == req.identity_hash)
                           .with_for_update()).first()
        if device is None:
            _check_room(c, devices.c.status == "pending", settings.max_pending_devices,
                        "too many devices are waiting for an administrator")
            device_id = str(uuid.uuid4())
            c.execute(devices.insert().values(
                id=device_id, identity_json=req.identity_json, identity_hash=req.identity_hash, status="pending",
                inventory={}, created=t, updated=t))
        else:
            device_id = device.id
        aset = c.execute(sa.select(auth_sets.c.id, auth_sets.c.status).where(
            auth_sets.c.device_id == device_id, auth_sets.c.pubkey_hash == req.pubkey_hash)).first()
        if aset is None:
            _check_room(c, (auth_sets.c.device_id == device_id) & (auth_sets.c.status == "pending"),
                        settings.max_pending_auth_sets, "too many keys of this device are waiting for an administrator",
                        auth_sets)
            c.execute(auth_sets.insert().values(id=str(uuid.uuid4()), device_id=device_id, pubkey=req.pubkey_pem,
                                                pubkey_hash=req.pubkey_hash, status="pending", created=t))
            _refresh_status(c, device_id)
        elif aset.status in ("accepted", "preauthorized"):
            bound = c.execute(sa.select(devices.c.auth_set_id).where(devices.c.id == device_id)).scalar()
            if aset.status == "preauthorized" or bound != aset.id:  # (not bound: a row written by hand)
                accept_auth_set(c, device_id, aset.id)
            epoch = c.execute(sa.select(devices.c.token_epoch).where(devices.c.id == device_id)).scalar_one()
            return ctx.tokens.issue(device_id, aset.id, int(epoch))
    return None


#: what a refused newcomer is told to wait (seconds) when the pending devices or keys are at their cap
PENDING_RETRY_AFTER = 300


def _check_room(c: sa.Connection, where: Any, cap: int, message: str, table: sa.Table = devices) -> None:
    """Raises:
        APIError: 429 when ``cap`` (0: no cap) rows of ``table`` already match ``where``."""
    if cap and c.execute(sa.select(sa.func.count()).select_from(table).where(where)).scalar_one() >= cap:
        raise APIError(429, f"{message} (at most {cap}); try again later",
                       {"Retry-After": str(PENDING_RETRY_AFTER)})


def _lock_device(c: sa.Connection, device_id: str) -> None:
    c.execute(sa.select(devices.c.id).where(devices.c.id == device_id).with_for_update())


def _refresh_status(c: sa.Connection, device_id: str, new_grant: bool = False) -> str:
    """Derive the device's status from its auth sets and record its accepted set. The token epoch goes up when
    the accepted set changes (rejected, replaced) or is granted again (``new_grant``): every device token
    issued before stops working at once. A new pending key leaves the accepted set and its tokens alone."""
    sets = c.execute(sa.select(auth_sets.c.id, auth_sets.c.status).where(auth_sets.c.device_id == device_id)).all()
    status = derive_status([s.status for s in sets])
    accepted = next((s.id for s in sets if s.status == "accepted"), None)
    bound = c.execute(sa.select(devices.c.auth_set_id).where(devices.c.id == device_id)).scalar()
    values: dict[str, Any] = {"status": status, "updated": now(), "auth_set_id": accepted}
    if new_grant or bound != accepted:
        values["token_epoch"] = devices.c.token_epoch + 1
    c.execute(devices.update().where(devices.c.id == device_id).values(**values))
    return status


def accept_auth_set(c: sa.Connection, device_id: str, auth_set_id: str) -> None:
    """Accept one auth set; the device's other accepted sets are rejected (one key at a time), and tokens
    issued before (for any of its sets) stop working."""
    c.execute(auth_sets.update().where(auth_sets.c.device_id == device_id, auth_sets.c.id != auth_set_id,
                                       auth_sets.c.status == "accepted").values(status="rejected"))
    c.execute(auth_sets.update().where(auth_sets.c.id == auth_set_id).values(status="accepted"))
    _refresh_status(c, device_id, new_grant=True)


def set_auth_status(c: sa.Connection, device_id: str, auth_set_id: str, status: str) -> str:
    """An administrator's decision on one auth set; the device's row is locked first (as by auth requests)."""
    _lock_device(c, device_id)
    if status == "accepted":
        accept_auth_set(c, device_id, auth_set_id)
        return "accepted"
    c.execute(auth_sets.update().where(auth_sets.c.id == auth_set_id).values(status=status))
    return _refresh_status(c, device_id)


# ---------------------------------------------------------------------------------------------------------
# The authenticated device


@dataclass(frozen=True)
class CurrentDevice:
    id: str
    provides_hash: str | None
    group: str | None


#: hot-path statements, run through the driver (see Database.fetch)
DEVICE_SQL = "SELECT status, provides_hash, group_name, auth_set_id, token_epoch FROM devices WHERE id = ?"
ACTIVE_SQL = (
    "SELECT dd.deployment_id, dd.status, dd.not_before, d.status, d.artifact_name, d.allow_downgrade "
    "FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id "
    "WHERE dd.device_id = ? AND dd.active = ? ORDER BY d.created"
)


async def current_device(request: Request) -> CurrentDevice:
    """The device of a valid token, read on every request.

    Raises:
        APIError: 401 for a bad or expired token, an unknown (decommissioned) device, a device that is not
            accepted, or a token issued for an auth set or epoch that is no longer the device's (its key was
            rejected or replaced, or accepted again since).
    """
    ctx = get_ctx(request)
    claims = ctx.tokens.verify(request.headers.get("authorization"))
    rows = ctx.db.fetch(DEVICE_SQL, (claims.device_id,))
    if not rows:
        raise unauthorized("unknown or decommissioned device")
    status, provides_hash, group, auth_set_id, epoch = rows[0]
    if status != "accepted":
        raise unauthorized(f"device is {status}, not accepted")
    if auth_set_id != claims.auth_set_id or epoch != claims.epoch:
        raise unauthorized("device token revoked (its key was rejected, replaced or accepted again): "
                           "authenticate again")
    return CurrentDevice(claims.device_id, provides_hash, group)


async def _ctx(request: Request) -> ServerContext:
    # async on purpose: FastAPI runs a plain ``def`` dependency in the thread pool, a hop per request
    return get_ctx(request)


Device = Annotated[CurrentDevice, Depends(current_device)]
Ctx = Annotated[ServerContext, Depends(_ctx)]


# ---------------------------------------------------------------------------------------------------------
# Deployments


PROVIDES_SCHEMA: dict[str, Any] = {
    "required": ["device_type", "artifact_name"], "maxProperties": 200, "propertyNames": {"maxLength": 1024},
    "properties": {"device_type": {"type": "string", "minLength": 1}, "artifact_name": {"type": "string", "minLength": 1}}}


def provides_problem(v: dict[str, Any], prefix: str = "") -> str | None:
    """What is wrong with a provides map (``device_type`` and ``artifact_name`` non-empty strings, at most 200
    keys of at most 1024 characters), or None."""
    for key in ("device_type", "artifact_name"):
        if not isinstance(v.get(key), str) or not v[key]:
            return f"{prefix}{key} must be a non-empty string"
    if len(v) > 200 or any(len(k) > 1024 for k in v):
        return f"too many or too long {prefix.rstrip('.') or 'provides'}"
    return None


class NextBody(BaseModel):
    """The body of ``next`` v2 (and of v1 POST in its v2 shape)."""

    model_config = ConfigDict(extra="allow")
    device_provides: dict[str, Any] = Field(json_schema_extra=PROVIDES_SCHEMA)  # documented; checked by _provides
    update_control_map: bool = False

    @field_validator("device_provides")
    @classmethod
    def _provides(cls, v: dict[str, Any]) -> dict[str, Any]:
        if problem := provides_problem(v, "device_provides."):
            raise ValueError(problem)
        return v


#: the v1 POST body: the v2 shape, or the flat provides map that mender-client 3.4 sends when v2 answered 404
NEXT_V1_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
    {"$ref": "#/components/schemas/NextBody"},
    {"type": "object", "title": "FlatProvides", "additionalProperties": True, "not": {"required": ["device_provides"]},
     "description": "the device's provides as the body itself (mender-client 3.4's fallback)", **PROVIDES_SCHEMA},
]}}}}}


def v1_provides(doc: dict[str, Any]) -> dict[str, Any]:
    """The provides in a v1 POST body, either shape.

    Raises:
        RequestValidationError: the v2 shape is malformed (answered 400 like any invalid body).
        APIError: 400 when the flat map is malformed.
    """
    if "device_provides" in doc:
        try:
            return NextBody.model_validate(doc).device_provides
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None
    if problem := provides_problem(doc):
        raise bad_request(f"invalid request: {problem} (the body is the provides map, or {{\"device_provides\": {{...}}}})")
    return doc


def _record_provides(ctx: ServerContext, device: CurrentDevice, provides: dict[str, Any]) -> None:
    h = sha256_hex(canonical_json(provides))
    if h == device.provides_hash:
        return
    with ctx.db.write() as c:
        inv = c.execute(sa.select(devices.c.inventory).where(devices.c.id == device.id)).scalar() or {}
        inv = {**inv, **provides}
        c.execute(devices.update().where(devices.c.id == device.id).values(
            inventory=inv, provides_hash=h, device_type=str(provides["device_type"]), inventory_updated=now()))


def _next(ctx: ServerContext, request: Request, device: CurrentDevice, provides: dict[str, Any]) -> Response:
    _record_provides(ctx, device, provides)
    t = now()
    for deployment_id, dstatus, not_before, status, artifact_name, allow_downgrade in ctx.db.fetch(
            ACTIVE_SQL, (device.id, True)):
        if dstatus == "pending" and (not_before > t or status not in ("pending", "inprogress")):
            continue  # phase not started yet, or the deployment is paused
        if dstatus == "pending" and provides["artifact_name"] == artifact_name:
            with ctx.db.write() as c:
                rollout.set_device_final(c, deployment_id, device.id, "already-installed",
                                         f"the device already runs {artifact_name}", only_from=("pending",))
            continue
        device_type = str(provides["device_type"])
        with ctx.db.read() as c:
            candidates = c.execute(sa.select(art_t.c.id, art_t.c.device_types, art_t.c.info)
                                   .where(art_t.c.name == artifact_name).order_by(art_t.c.created)).all()
        match = _choose_artifact(ctx, device, provides, [a for a in candidates if device_type in a.device_types])
        if match is None:
            with ctx.db.write() as c:
                rollout.set_device_final(c, deployment_id, device.id, "noartifact",
                                         f"no artifact {artifact_name} for device type {device_type}",
                                         only_from=("pending",))
            continue
        if dstatus == "pending" or status == "pending":
            with ctx.db.write() as c:
                rollout.hand_out(c, deployment_id, device.id)
        uri, expires = ctx.links.link(ctx.base_url(request), match.id, t)
        body = {
            "id": deployment_id,
            "artifact": {
                "id": match.id,
                "artifact_name": artifact_name,
                "source": {"uri": uri, "expire": rfc3339(expires)},
                "device_types_compatible": list(match.device_types),
            },
            "allow_downgrade": bool(allow_downgrade),
        }
        return JSONResponse(body)
    return Response(status_code=NO_CONTENT)


def source_checksum(info: dict[str, Any]) -> str | None:
    """The ``rootfs-image.checksum`` an artifact depends on (a delta: installable only on that image)."""
    value = (info.get("artifact_depends") or {}).get(ROOTFS_CHECKSUM)
    return value if isinstance(value, str) else None


def _update_modules(value: Any) -> set[str]:
    if isinstance(value, str):
        return {v for v in value.replace(",", " ").split() if v}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, str)}
    return set()


def _choose_artifact(ctx: ServerContext, device: CurrentDevice, provides: dict[str, Any], fitting: list[Any]) -> Any:
    """Of the artifacts with the deployment's name that fit the device type: a delta whose source is the
    image the device runs (its ``rootfs-image.checksum`` provide equals the delta's depends) when the device
    says it installs that payload type (inventory ``update_modules``, as the Mender client reports update
    modules), else the full artifact. An artifact that depends on another image is never offered otherwise."""
    full = next((a for a in fitting if source_checksum(a.info) is None), None)
    running = provides.get(ROOTFS_CHECKSUM)
    deltas = [a for a in fitting if running and source_checksum(a.info) == running]
    if deltas:
        with ctx.db.read() as c:
            inventory = c.execute(sa.select(devices.c.inventory).where(devices.c.id == device.id)).scalar() or {}
        modules = _update_modules(inventory.get("update_modules")) | {"rootfs-image"}
        for a in deltas:
            types = {u.get("type_info", {}).get("type") for u in a.info.get("updates", [])}
            if types and types <= modules:
                return a
    return full


NEXT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "a deployment for this device"}, 204: {"description": "nothing to do"},
    401: error_doc("missing/invalid token, or the device is not accepted"),
}


@router.post(NEXT_V2, responses=NEXT_RESPONSES)
async def next_v2(body: NextBody, request: Request, device: Device, ctx: Ctx) -> Response:
    """The deployment this device should install now (204: none)."""
    return _next(ctx, request, device, body.device_provides)


@router.post(NEXT_V1, responses=NEXT_RESPONSES, openapi_extra=NEXT_V1_BODY)
async def next_v1_post(body: Annotated[dict[str, Any], Body()], request: Request, device: Device, ctx: Ctx) -> Response:
    """v1 of ``next``: the body is v2's, or the device's flat provides map (mender-client 3.4 sends that here
    after v2 answered 404)."""
    return _next(ctx, request, device, v1_provides(body))


class FastPoll:
    """ASGI shortcut for the most frequent request of a fleet: a ``next`` POST (v2 or v1) of an accepted
    device whose provides did not change and that has nothing to do. It runs the same checks as the route
    (token, the device's status read from the database, body rules of :class:`NextBody`, the same two reads)
    and answers 204 without FastAPI's routing, dependency and validation machinery. Whenever the answer could
    be anything else — an error, a deployment to hand out, provides to record, an unusual body — the request
    goes on, body replayed, to the regular route, which gives the answer. Installed innermost, so metrics,
    body limits and body checks wrap it as they wrap the routes."""

    PATHS = frozenset({NEXT_V2, NEXT_V1})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away (or a body limit answered already)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _idle_poll(scope, body):
            scope["route"] = _FAST_ROUTES[scope["path"]]  # labels the request's metrics like the route's
            await send({"type": "http.response.start", "status": NO_CONTENT, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@dataclass(frozen=True)
class _RouteLabel:
    path: str


_FAST_ROUTES = {p: _RouteLabel(p) for p in FastPoll.PATHS}


#: the idle-poll question in one statement: the device row and how many unfinished deployments it has (the
#: ``deployment_devices(device_id, active)`` index answers the count); only a device with some reads them
POLL_SQL = ("SELECT d.status, d.provides_hash, d.auth_set_id, d.token_epoch, (SELECT count(*) FROM "
            "deployment_devices dd WHERE dd.device_id = d.id AND dd.active = ?) FROM devices d WHERE d.id = ?")
#: ``next`` bodies already checked -> the hash of their provides (None: not a body the shortcut takes). A
#: fleet sends few distinct bodies (one per running version and device type), so this stays small.
_BODIES: dict[tuple[bool, bytes], str | None] = {}
BODY_CACHE_SIZE = 10_000
BODY_CACHE_MAX_LEN = 4096


def _provides_hash(body: bytes, flat_allowed: bool) -> str | None:
    """The hash of a ``next`` body's provides if the body follows the route's rules (the v2 shape, or with
    ``flat_allowed`` — v1 POST — the flat provides map; :func:`provides_problem`), else None. Bodies are
    remembered: a device sends the same one on every poll."""
    key = (flat_allowed, body)
    known = _BODIES.get(key, "")
    if known != "":
        return known
    found: str | None = None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    provides: Any = None
    if isinstance(doc, dict):
        if "device_provides" in doc or not flat_allowed:  # v2's shape
            if type(doc.get("update_control_map", False)) is bool:
                provides = doc.get("device_provides")
        else:  # v1 POST with the flat provides map
            provides = doc
    if isinstance(provides, dict) and provides_problem(provides) is None:
        found = sha256_hex(canonical_json(provides))
    if len(body) <= BODY_CACHE_MAX_LEN:
        if len(_BODIES) >= BODY_CACHE_SIZE:
            _BODIES.clear()
        _BODIES[key] = found
    return found


def _idle_poll(scope: Scope, body: bytes) -> bool:
    """True when the regular ``next`` route would answer this request with 204 and change nothing."""
    auth = ctype = None
    for name, value in scope["headers"]:
        if name == b"authorization" and auth is None:  # the first one, as Starlette's headers.get
            auth = value
        elif name == b"content-type" and ctype is None:
            ctype = value
    if auth is None or ctype is None or ctype.split(b";", 1)[0].strip().lower() != b"application/json":
        return False
    ctx: ServerContext = scope["app"].state.ctx
    try:
        claims = ctx.tokens.verify(auth.decode("latin-1"))
    except APIError:
        return False
    provides_hash = _provides_hash(body, scope["path"] == NEXT_V1)
    if provides_hash is None:
        return False
    rows = ctx.db.fetch(POLL_SQL, (True, claims.device_id))
    if not rows:
        return False
    status, known_hash, auth_set_id, epoch, active = rows[0]
    if (status != "accepted" or auth_set_id != claims.auth_set_id or epoch != claims.epoch
            or known_hash != provides_hash):
        return False
    if not active:
        return True
    t = now()
    for _, dstatus, not_before, status, _, _ in ctx.db.fetch(ACTIVE_SQL, (claims.device_id, True)):
        if not (dstatus == "pending" and (not_before > t or status not in ("pending", "inprogress"))):
            return False  # something to hand out or to record: the route does it
    return True


@router.get(NEXT_V1, responses=NEXT_RESPONSES)
async def next_v1_get(request: Request, device: Device, ctx: Ctx,
                      artifact_name: Annotated[str, Query(min_length=1, max_length=256)],
                      device_type: Annotated[str, Query(min_length=1, max_length=128)]) -> Response:
    return _next(ctx, request, device, {"artifact_name": artifact_name, "device_type": device_type})


class StatusBody(BaseModel):
    status: str = Field(json_schema_extra={"enum": list[Any](sorted(REPORTABLE))})  # documented; checked by _status
    substate: str | None = Field(None, max_length=4096)

    @field_validator("status")
    @classmethod
    def _status(cls, v: str) -> str:
        if v not in REPORTABLE:
            raise ValueError(f"unknown status {v!r}; one of {', '.join(sorted(REPORTABLE))}")
        return v


def own_deployment(c: sa.Connection, deployment_id: str, device_id: str) -> Any:
    """The device's row in the deployment (its status, the deployment's status and retries).

    Raises:
        APIError: 404 when the deployment is not this device's.
    """
    row = c.execute(
        sa.select(dd.c.status).where(dd.c.deployment_id == deployment_id, dd.c.device_id == device_id)
    ).first()
    if row is None:
        raise not_found("deployment for this device")
    return row


@router.put("/api/devices/v1/deployments/device/deployments/{deployment_id}/status", status_code=204,
            responses={204: {"description": "stored, or ignored (a repeat, or an older status than the stored one)"},
                       400: error_doc("invalid, or a different final status after a final one"),
                       404: error_doc("not a deployment of this device"), 409: error_doc("aborted")})
async def put_status(deployment_id: str, body: StatusBody, device: Device, ctx: Ctx) -> Response:
    """Report progress. Statuses only move forward (downloading, installing, rebooting, then a final one): a
    report that repeats the current status or goes backwards is acknowledged and ignored, so is a repeated
    final status (a repeated ``failure`` uses no second retry); a different final status after a final one is
    refused with 400; 409 once the deployment was aborted."""
    with ctx.db.write() as c:
        rollout.report_status(c, deployment_id, device.id, body.status, body.substate)
    return Response(status_code=NO_CONTENT)


# ---------------------------------------------------------------------------------------------------------
# Inventory and configuration


Scalar = str | int | float


class Attribute(BaseModel):
    name: str = Field(min_length=1, max_length=1024)
    value: Scalar | list[Scalar]
    description: str | None = None


def _put_inventory(ctx: ServerContext, device: CurrentDevice, attrs: list[Attribute], merge: bool) -> Response:
    new = {a.name: a.value for a in attrs}
    if len(new) > 1000:
        raise bad_request("at most 1000 attributes")
    with ctx.db.write() as c:
        inv: dict[str, Any] = {}
        if merge:
            inv = c.execute(sa.select(devices.c.inventory).where(devices.c.id == device.id)).scalar() or {}
        inv = {**inv, **new}
        values: dict[str, Any] = {"inventory": inv, "inventory_updated": now()}
        if not merge:
            values["provides_hash"] = None  # the next poll records the provides again
        c.execute(devices.update().where(devices.c.id == device.id).values(**values))
    return Response(status_code=200)


@router.put("/api/devices/v1/inventory/device/attributes", status_code=200, response_class=Response)
async def put_inventory(attrs: list[Attribute], device: Device, ctx: Ctx) -> Response:
    """Replace the device's inventory attributes."""
    return _put_inventory(ctx, device, attrs, merge=False)


@router.patch("/api/devices/v1/inventory/device/attributes", status_code=200, response_class=Response)
async def patch_inventory(attrs: list[Attribute], device: Device, ctx: Ctx) -> Response:
    """Add or update some inventory attributes."""
    return _put_inventory(ctx, device, attrs, merge=True)


@router.get("/api/devices/v1/deviceconfig/configuration", response_model=dict[str, str],
            responses={503: error_doc("a secret cannot be decrypted with this server's secrets key: the device "
                                      "keeps its last configuration")})
async def get_configuration(device: Device, ctx: Ctx) -> Response:
    """The device's configuration variables: its group's, overridden by its own; secrets decrypted. Never a
    configuration without one of its secrets: if one cannot be decrypted the answer is 503."""
    with ctx.db.read() as c:
        values = ctx.config.for_device(c, device.id, device.group)
    return JSONResponse(values)


# ---------------------------------------------------------------------------------------------------------
# Downloads


#: the shapes of a link's query values, documented (not validated by FastAPI: any other value is a 403, as a
#: wrong signature is), so that fuzzing sends valid ones next to invalid ones
LinkExpires = Annotated[str | None, Query(description="expiry of the link (epoch seconds)",
                                          json_schema_extra={"pattern": "^[0-9]{1,15}$"})]
LinkSig = Annotated[str | None, Query(description="HMAC-SHA256 of the artifact id and the expiry, hex",
                                      json_schema_extra={"pattern": "^[0-9a-f]{64}$"})]


@router.head("/api/devices/v1/download/{artifact_id}", include_in_schema=False)
@router.get("/api/devices/v1/download/{artifact_id}", response_class=Response,
            responses={200: {"content": {"application/vnd.mender-artifact": {}}},
                       206: {"content": {"application/vnd.mender-artifact": {}}},
                       403: error_doc("bad or expired link"), 404: error_doc("no such artifact"),
                       416: error_doc("unsatisfiable range")},
            openapi_extra={"parameters": [  # read by the file response; documented so that they are fuzzed too
                {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "one byte range (several, or a malformed one: the whole file)"},
                {"name": "If-Range", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "the ETag (or date) the Range is valid for"}]})
async def download(artifact_id: str, ctx: Ctx, expires: LinkExpires = None, sig: LinkSig = None) -> Response:
    """The artifact behind a signed link (from ``next``). Range requests: one range → 206.

    Raises:
        APIError: 403 for a link that is malformed, not signed by this server or expired; 404 for an artifact
            that is gone.
    """
    ctx.links.check(artifact_id, expires, sig)
    with ctx.db.read() as c:
        row = c.execute(sa.select(art_t.c.name, art_t.c.sha256).where(art_t.c.id == artifact_id)).first()
    if row is None:
        raise not_found("artifact")
    path = f"{ctx.artifact_dir}/{artifact_id}.mender"
    return ArtifactFileResponse(path, row.sha256, f"{row.name}.mender")
