"""The device API: the subset of Mender's that the stock mender-client 3.x and our agent use.

Its parts: authentication and the token check of every request (:mod:`.devauth`), ``next`` and status
reports (:mod:`.device_deployments`, with the poll shortcut of :mod:`.fastpoll` in front), deployment logs
(:mod:`.device_logs`), and here the inventory, the configuration and the signed downloads.
"""

from __future__ import annotations

import io
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from artifacts.format import MAX_HEADER_PART
from artifacts.reader import header_part_size
from ota_common.errors import ArtifactError
from ota_common.varnames import CONFIG_HASH_HEADER

from . import deployments as rollout
from .context import ServerContext
from .devauth import Ctx, CurrentDevice, Device
from .downloads import HEADER_SUFFIX, ArtifactFileResponse
from .errors import APIError, bad_request, error_doc, found_or_404
from .metrics import CONFIG_REVERTS
from .models import artifacts as art_t
from .models import devices
from .timeutil import now

router = APIRouter(tags=["device API"])


# ---------------------------------------------------------------------------------------------------------
# Inventory and configuration


Scalar = str | int | float


#: an inventory attribute's name (also the names of a deployment's inventory filter)
AttributeName = Annotated[str, Field(min_length=1, max_length=1024)]


class Attribute(BaseModel):
    name: AttributeName
    value: Scalar | list[Scalar]
    description: str | None = None


def _put_inventory(ctx: ServerContext, device: CurrentDevice, attrs: list[Attribute], merge: bool) -> Response:
    ctx.last_seen.seen(device.id)
    new = {a.name: a.value for a in attrs}
    if len(new) > 1000:
        raise bad_request("at most 1000 attributes")
    with ctx.db.write() as c:
        inv: dict[str, Any] = {}
        if merge or new.get("config_status") == "reverted":
            inv = c.execute(sa.select(devices.c.inventory).where(devices.c.id == device.id)).scalar() or {}
        if new.get("config_status") == "reverted" and new.get("config_refused_hash") != inv.get("config_refused_hash"):
            CONFIG_REVERTS.inc()  # a new revert, not the same one reported again
        if not merge:
            inv = {}
        inv = {**inv, **new}
        values: dict[str, Any] = {"inventory": inv, "inventory_updated": now()}
        if not merge:
            values["provides_hash"] = None  # the next poll records the provides again
        c.execute(devices.update().where(devices.c.id == device.id).values(**values))
        rollout.join_open(c, device.id, filtered_only=True)  # its inventory may match a dynamic filter now
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
    ctx.last_seen.seen(device.id)
    with ctx.db.read() as c:
        values, config_hash = ctx.config.for_device_hashed(c, device.id, device.group)
    return JSONResponse(values, headers={CONFIG_HASH_HEADER: config_hash})


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
                       307: {"description": "artifacts in an object store: on to its presigned URL"},
                       403: error_doc("bad or expired link"), 404: error_doc("no such artifact"),
                       416: error_doc("unsatisfiable range")},
            openapi_extra={"parameters": [  # read by the file response; documented so that they are fuzzed too
                {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "one byte range (several, or a malformed one: the whole file)"},
                {"name": "If-Range", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "the ETag (or date) the Range is valid for"}]})
async def download(artifact_id: str, ctx: Ctx, expires: LinkExpires = None, sig: LinkSig = None) -> Response:
    """The artifact behind a signed link (from ``next``). Range requests: one range → 206.

    With an object store (``--storage s3://...``), ``next`` hands out the store's presigned URLs; a link to
    this route (one handed out before the store changed) answers 307 to a presigned URL expiring with it.

    Raises:
        APIError: 403 for a link that is malformed, not signed by this server or expired; 404 for an artifact
            that is gone.
    """
    ctx.links.check(artifact_id, expires, sig)
    with ctx.db.read() as c:
        row = found_or_404(c.execute(sa.select(art_t.c.name, art_t.c.sha256).where(art_t.c.id == artifact_id)).first(),
                           "artifact")
    path = ctx.store.local_path(artifact_id)
    if path is None:  # an object store: a link this server signed goes on to the store's presigned URL
        return RedirectResponse(ctx.store.download_url(artifact_id, int(expires or 0), ""), status_code=307)
    return ArtifactFileResponse(path, row.sha256, f"{row.name}.mender")


@router.get("/api/devices/v1/download/{artifact_id}" + HEADER_SUFFIX, response_class=Response,
            responses={200: {"content": {"application/vnd.mender-artifact": {}}},
                       403: error_doc("bad or expired link"), 404: error_doc("no such artifact"),
                       413: error_doc("the header part is larger than the agent takes")})
def download_header(artifact_id: str, ctx: Ctx, expires: LinkExpires = None, sig: LinkSig = None) -> Response:
    """The artifact's signed header part only, behind a signed link (the ``vv_rollback`` hint of a rollback
    deployment's ``next``): its leading members ``version``, ``manifest``, ``manifest.sig`` and ``header.tar*``,
    a few KB, from which the agent verifies what it would install and checks the slot it kept against it.
    Range is not supported (the answer is small).

    Raises:
        APIError: 403 for a link that is malformed, not signed by this server for the header, or expired; 404
            for an artifact that is gone; 413 when the header part is larger than ``MAX_HEADER_PART``.
    """
    ctx.links.check(artifact_id, expires, sig, part="header")
    with ctx.db.read() as c:
        found_or_404(c.execute(sa.select(art_t.c.id).where(art_t.c.id == artifact_id)).first(), "artifact")
    try:
        with ctx.store.open(artifact_id) as f:
            head = f.read(MAX_HEADER_PART + 4096)
    except FileNotFoundError:
        raise APIError(404, "artifact not found in storage") from None
    try:
        size = header_part_size(io.BytesIO(head), what="artifact", limit=MAX_HEADER_PART)
    except ArtifactError as e:  # verified at upload: only a header larger than the limit ends here
        raise APIError(413, str(e)) from None
    return Response(head[:size], media_type="application/vnd.mender-artifact",
                    headers={"Cache-Control": "no-store"})
