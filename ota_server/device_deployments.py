"""The device side of deployments: ``next`` (v2 POST, and v1 POST and GET as mender-client 3.4 falls back to
them) and status reports.

Hot path (``next``, status): the token check of :mod:`.devauth`, one indexed read of the device's active
deployments, one indexed read of the open dynamic deployments that would take it (:data:`.deployments.JOINABLE_SQL`);
nothing is written unless something changed. Handlers are ``async`` and call the database
directly: the queries are short, and skipping the thread pool is what keeps the poll cheap. The rules of a
``next`` body (:func:`check_provides`) and of a device that waits (:func:`.deployments.is_waiting`) are also
the poll shortcut's (:mod:`.fastpoll`), which answers the idle polls before this route is reached.
"""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Body, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ota_common.varnames import CONFIG_HASH_HEADER

from . import deployments as rollout
from .auth import canonical_json, sha256_hex
from .confighash import poll_hash
from .context import ServerContext
from .deployments import REPORTABLE
from .devauth import Ctx, CurrentDevice, Device
from .downloads import HINT, ROLLBACK, rollback_hint
from .errors import bad_request, error_doc, found_or_404
from .models import artifacts as art_t
from .models import deployment_devices as dd
from .models import devices
from .timeutil import now, rfc3339

router = APIRouter(tags=["device API"])
NEXT_V2 = "/api/devices/v2/deployments/device/deployments/next"
NEXT_V1 = "/api/devices/v1/deployments/device/deployments/next"
NO_CONTENT = 204
#: the device's unfinished deployments, oldest first, read through the driver (see Database.fetch)
#: (the artifact is the device's own ``target_artifact`` in a rollback deployment, else the deployment's)
ACTIVE_SQL = (
    "SELECT dd.deployment_id, dd.status, dd.not_before, d.status, COALESCE(dd.target_artifact, d.artifact_name), "
    "d.allow_downgrade, d.kind FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id "
    "WHERE dd.device_id = ? AND dd.active = ? ORDER BY d.created"
)


PROVIDES_SCHEMA: dict[str, Any] = {
    "required": ["device_type", "artifact_name"], "maxProperties": 200, "propertyNames": {"maxLength": 1024},
    "properties": {"device_type": {"type": "string", "minLength": 1}, "artifact_name": {"type": "string", "minLength": 1}}}


class ProvidesError(ValueError):
    """A provides map that breaks :func:`check_provides` (a ValueError: pydantic reports it as a field's)."""


def check_provides(v: dict[str, Any], prefix: str = "") -> None:
    """The rules of a provides map: ``device_type`` and ``artifact_name`` non-empty strings, at most 200 keys
    of at most 1024 characters (``prefix``: where the map is, for the message).

    Raises:
        ProvidesError: saying which rule the map breaks.
    """
    for key in ("device_type", "artifact_name"):
        if not isinstance(v.get(key), str) or not v[key]:
            raise ProvidesError(f"{prefix}{key} must be a non-empty string")
    if len(v) > 200 or any(len(k) > 1024 for k in v):
        raise ProvidesError(f"too many or too long {prefix.rstrip('.') or 'provides'}")


class NextBody(BaseModel):
    """The body of ``next`` v2 (and of v1 POST in its v2 shape)."""

    model_config = ConfigDict(extra="allow")
    device_provides: dict[str, Any] = Field(json_schema_extra=PROVIDES_SCHEMA)  # documented; checked by _provides
    update_control_map: bool = False

    @field_validator("device_provides")
    @classmethod
    def _provides(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_provides(v, "device_provides.")
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
    try:
        check_provides(doc)
    except ProvidesError as problem:
        raise bad_request(f"invalid request: {problem} (the body is the provides map, or "
                          '{"device_provides": {...}})') from None
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
    ctx.last_seen.seen(device.id)
    _record_provides(ctx, device, provides)
    if rollout.joinable(ctx.db.fetch(rollout.JOINABLE_SQL, (rollout.ALL_GROUPS, device.id))):
        with ctx.db.write() as c:  # an open dynamic deployment of its group, of all devices or of a filter that
            # its inventory (with the provides just recorded) matches takes it now
            rollout.join_open(c, device.id)
    t = now()
    for deployment_id, dstatus, not_before, status, artifact_name, allow_downgrade, kind in ctx.db.fetch(
            ACTIVE_SQL, (device.id, True)):
        if rollout.is_waiting(dstatus, not_before, status, t):
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
            match = rollout.choose_artifact(c, device.id, provides,
                                            [a for a in candidates if device_type in a.device_types])
        if match is None:
            with ctx.db.write() as c:
                rollout.set_device_final(c, deployment_id, device.id, "noartifact",
                                         f"no artifact {artifact_name} for device type {device_type}",
                                         only_from=("pending",))
            continue
        if dstatus == "pending" or status == "pending":
            running = str(provides["artifact_name"])
            with ctx.db.write() as c:
                rollout.hand_out(c, deployment_id, device.id, running if len(running) <= 256 else None)
        expires = int(t) + ctx.links.ttl  # the store's URL (signed link or presigned GET) expires with the link TTL
        uri = ctx.store.download_url(match.id, expires, ctx.base_url(request))
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
        if kind == ROLLBACK:  # our agent may re-arm the slot that still holds it (a Mender client ignores this)
            body[HINT] = rollback_hint(ctx.links, ctx.base_url(request), match.id, t)
        return JSONResponse(body, headers={CONFIG_HASH_HEADER: poll_hash(device.config_hash)})
    return Response(status_code=NO_CONTENT, headers={CONFIG_HASH_HEADER: poll_hash(device.config_hash)})


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


@router.get(NEXT_V1, responses=NEXT_RESPONSES)
async def next_v1_get(request: Request, device: Device, ctx: Ctx,
                      artifact_name: Annotated[str, Query(min_length=1, max_length=256)],
                      device_type: Annotated[str, Query(min_length=1, max_length=128)]) -> Response:
    return _next(ctx, request, device, {"artifact_name": artifact_name, "device_type": device_type})


#: the longest ``substate`` a status report may carry
SUBSTATE_MAX = 4096
STATUS_PATH = "/api/devices/v1/deployments/device/deployments/{deployment_id}/status"


class StatusBody(BaseModel):
    status: str = Field(json_schema_extra={"enum": list[Any](sorted(REPORTABLE))})  # documented; checked by _status
    substate: str | None = Field(None, max_length=SUBSTATE_MAX)

    @field_validator("status")
    @classmethod
    def _status(cls, v: str) -> str:
        if v not in REPORTABLE:
            raise ValueError(f"unknown status {v!r}; one of {', '.join(sorted(REPORTABLE))}")
        return v


def own_deployment(c: sa.Connection, deployment_id: str, device_id: str) -> Any:
    """The device's row in the deployment (its status).

    Raises:
        APIError: 404 when the deployment is not this device's.
    """
    return found_or_404(c.execute(
        sa.select(dd.c.status).where(dd.c.deployment_id == deployment_id, dd.c.device_id == device_id)
    ).first(), "deployment for this device")


@router.put(STATUS_PATH, status_code=204,
            responses={204: {"description": "stored, or ignored (a repeat, or an older status than the stored one)"},
                       400: error_doc("invalid, or a different final status after a final one"),
                       404: error_doc("not a deployment of this device"), 409: error_doc("aborted")})
async def put_status(deployment_id: str, body: StatusBody, device: Device, ctx: Ctx) -> Response:
    """Report progress. Statuses only move forward (downloading, installing, rebooting, then a final one): a
    report that repeats the current status or goes backwards is acknowledged and ignored, so is a repeated
    final status (a repeated ``failure`` uses no second retry); a different final status after a final one is
    refused with 400; 409 once the deployment was aborted."""
    await store_status(ctx, deployment_id, device.id, body.status, body.substate)
    return Response(status_code=NO_CONTENT)


async def store_status(ctx: ServerContext, deployment_id: str, device_id: str, status: str, substate: str | None
                       ) -> None:
    """Store a status report (:func:`.deployments.report_status`) through the group commit: returns once it is
    committed (the route, and the report shortcut of :mod:`.fastreport`, answer 204 only then); a report that
    passed the failure limit aborts the deployment in a transaction of its own.

    Raises:
        APIError: what :func:`.deployments.report_status` raises (404, 409, 400).
    """
    ctx.last_seen.seen(device_id)
    report = await ctx.committer.report(deployment_id, device_id, status, substate)  # answered once committed
    if report.abort:  # the failure limit says abort: paused above, aborted now (see gates.check_failure_limit)
        with ctx.db.write() as c:
            rollout.abort(c, deployment_id)
