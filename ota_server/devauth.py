"""Device authentication: auth requests (signed with the device's key), the administrator's decisions on auth
sets, and the device behind a token, checked on every device API request.

Zero-touch enrolment: with fleet CAs configured, an auth request may carry ``device_cert`` (checked by
:func:`ota_common.fleetca.verify_device_cert` against the request's key and identity ``device_id``, and the
revocation list): a valid one accepts a pending (or new) auth set at once; an invalid one leaves it pending, with
the reason kept on the auth set (``cert_refused``) for the operator.

Hot path (every authenticated device request): one HS256 check and one primary-key read of the device's status,
accepted auth set and token epoch, so that a decommission, a rejection or another key accepted is honoured at
the very next request, by every worker: a token is valid only for the auth set and epoch it was issued for
(:func:`token_problem`, the one rule the route dependency, the body limit and the poll shortcut all apply).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from ota_common.deviceid import IDENTITY_KEY
from ota_common.fleetca import CertificateRefused, DeviceCert, verify_device_cert

from . import audit
from .ansible_import import apply_staged
from .auth import AuthRequest, DeviceClaims, parse_auth_request
from .context import ServerContext, get_ctx
from .errors import APIError, error_doc, unauthorized
from .models import auth_sets, devices, revoked_certificates
from .timeutil import now

log = logging.getLogger("ota_server")

router = APIRouter(tags=["device API"])
AUTH_REQUESTS = "/api/devices/v1/authentication/auth_requests"


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
    device_cert: str | None = Field(None, description="zero-touch enrolment: the device certificate (PEM) the fleet "
                                    "CA issued for this key and the identity's device_id")


@router.post(
    AUTH_REQUESTS, response_class=Response,
    responses={200: {"content": {"application/jwt": {"schema": {"type": "string"}}}, "description": "the device token"},
               401: error_doc("unknown (now pending), rejected, badly signed, or its device certificate refused "
                              "(the message names the reason)"),
               429: error_doc("too many auth requests (per address, per identity) or too many pending devices")},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": AuthRequestBody.model_json_schema()}}}},
)
async def auth_request(request: Request) -> Response:
    """Signed with the device key (``X-MEN-Signature``: RSA PKCS#1 v1.5, ECDSA DER or ed25519 over the body).
    An unknown device is recorded as pending; a preauthorized one is accepted; one with a valid device
    certificate of the fleet CA (``device_cert``, when the server has ``--fleet-ca``) is accepted at once.

    Raises:
        APIError: 400 malformed; 401 badly signed, pending or rejected, or its device certificate refused; 429
            too many auth requests from this address or for this identity, or too many devices (or keys of this
            device) already pending.
    """
    ctx = get_ctx(request)
    ctx.auth_limits.check_address(request.client.host if request.client else "")
    body = await request.body()
    req = parse_auth_request(body, request.headers.get("x-men-signature"))
    ctx.auth_limits.check_identity(req.identity_hash)
    cert = check_device_cert(ctx, req)  # X.509 work only past the rate limits
    try:
        token = _authenticate(ctx, req, cert)
    except sa.exc.IntegrityError:  # the same new device asked twice at once: the other request created it
        token = _authenticate(ctx, req, cert)
    if isinstance(token, CertificateRefused):
        raise unauthorized(f"{token}; the device stays pending: an administrator may still accept it")
    if token is None:
        raise unauthorized("device is not authorized (pending or rejected); an administrator must accept it")
    return Response(token, media_type="application/jwt")


def check_device_cert(ctx: ServerContext, req: AuthRequest) -> DeviceCert | CertificateRefused | None:
    """The verdict on the request's device certificate (revocation aside: that needs the database); None when
    there is none or no fleet CA is configured (then it is ignored)."""
    if req.device_cert is None or not ctx.fleet_cas:
        return None
    spki = serialization.load_pem_public_key(req.pubkey_pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    device_id = req.identity.get(IDENTITY_KEY)
    try:
        return verify_device_cert(req.device_cert.encode(), ctx.fleet_cas, spki,
                                  device_id if isinstance(device_id, str) else "", datetime.now(UTC))
    except CertificateRefused as e:
        return e


def revocation(c: sa.Connection, serial: str, pubkey_hash: str) -> str | None:
    """Why a certificate (its serial) or any certificate for a key (``pubkey_hash``) may not enrol; None when
    neither is revoked."""
    row = c.execute(sa.select(revoked_certificates.c.serial).where(
        (revoked_certificates.c.serial == serial) | (revoked_certificates.c.pubkey_hash == pubkey_hash)).limit(1)
    ).first()
    if row is None:
        return None
    return f"certificate {row.serial} is revoked" if row.serial == serial else \
        f"the key was revoked with certificate {row.serial}"


Token = str | CertificateRefused | None


def _authenticate(ctx: ServerContext, req: AuthRequest, cert: DeviceCert | CertificateRefused | None) -> Token:
    """Record the auth request; the token when its auth set is accepted (or preauthorized), or is pending (or
    new) and ``cert`` is a valid, unrevoked device certificate; the refusal when ``cert`` is refused (the set
    stays pending). The device's row is locked while its auth sets are looked at, so that its status follows
    them (an administrator may accept or reject at the same moment). Raises IntegrityError when another request
    created the same device or auth set meanwhile (the caller tries again), APIError 429 past the pending caps
    (a device with a valid certificate does not wait: the caps do not apply to it)."""
    settings = ctx.settings
    t = now()
    with ctx.db.write() as c:
        if isinstance(cert, DeviceCert) and (why := revocation(c, cert.serial, req.pubkey_hash)):
            cert = CertificateRefused("revoked", why, cert.serial)
        enrols = isinstance(cert, DeviceCert)
        device = c.execute(sa.select(devices.c.id).where(devices.c.identity_hash == req.identity_hash)
                           .with_for_update()).first()
        if device is None:
            device = _grown_identity(c, req)
        if device is None:
            if not enrols:
                _check_room(c, devices.c.status == "pending", settings.max_pending_devices,
                            "too many devices are waiting for an administrator")
            device_id = str(uuid.uuid4())
            c.execute(devices.insert().values(
                id=device_id, identity_json=req.identity_json, identity_hash=req.identity_hash, status="pending",
                inventory={}, created=t, updated=t))
        else:
            device_id = device.id
        recorded: tuple[str | None, str | None]  # the certificate serial and refusal last recorded for the set
        aset = c.execute(sa.select(auth_sets.c.id, auth_sets.c.status, auth_sets.c.cert_serial,
                                   auth_sets.c.cert_refused).where(
            auth_sets.c.device_id == device_id, auth_sets.c.pubkey_hash == req.pubkey_hash)).first()
        if aset is None:
            if not enrols:
                _check_room(c, (auth_sets.c.device_id == device_id) & (auth_sets.c.status == "pending"),
                            settings.max_pending_auth_sets,
                            "too many keys of this device are waiting for an administrator", auth_sets)
            aset_id = str(uuid.uuid4())
            c.execute(auth_sets.insert().values(id=aset_id, device_id=device_id, pubkey=req.pubkey_pem,
                                                pubkey_hash=req.pubkey_hash, status="pending", created=t))
            _refresh_status(c, device_id)
            status, recorded = "pending", (None, None)
        else:
            aset_id, status, recorded = aset.id, aset.status, (aset.cert_serial, aset.cert_refused)
        if status in ("accepted", "preauthorized"):  # a certificate, good or bad, changes nothing here
            bound = c.execute(sa.select(devices.c.auth_set_id).where(devices.c.id == device_id)).scalar()
            if status == "preauthorized" or bound != aset_id:  # (not bound: a row written by hand)
                accept_auth_set(c, device_id, aset_id)
        elif status == "pending" and isinstance(cert, DeviceCert):
            _accept_by_certificate(ctx, c, device_id, aset_id, cert)
        elif status == "pending" and isinstance(cert, CertificateRefused):
            if recorded != (cert.serial, cert.reason):
                c.execute(auth_sets.update().where(auth_sets.c.id == aset_id).values(
                    cert_serial=cert.serial, cert_refused=cert.reason))
                log.warning("auth set %s of device %s (%s): %s%s", aset_id, device_id, req.identity_json[:200], cert,
                            f" ({cert.detail})" if cert.detail else "")
            return cert
        else:
            return None
        epoch = c.execute(sa.select(devices.c.token_epoch).where(devices.c.id == device_id)).scalar_one()
        # seen: signed by its accepted key (a request signed by any other key, for the same identity, is not the
        # device and must not hide that it went silent)
        ctx.last_seen.seen(device_id)
        return ctx.tokens.issue(device_id, aset_id, int(epoch))


def _grown_identity(c: sa.Connection, req: AuthRequest) -> Any:
    """The accepted device whose accepted key signed ``req`` and whose identity ``req``'s identity extends (every
    attribute it had, with the same value, plus new ones), with its identity updated; None when there is none.

    An image that adds an identity attribute (``device_id``, from issue 15 on) must not turn every accepted device
    it updates into a new pending one, whose trial boot then cannot reach the server and rolls back. Only the
    holder of the accepted private key can sign the request, and attributes are only ever added, never changed."""
    row = c.execute(sa.select(devices.c.id, devices.c.identity_json).join(
        auth_sets, auth_sets.c.id == devices.c.auth_set_id).where(
        auth_sets.c.pubkey_hash == req.pubkey_hash, auth_sets.c.status == "accepted",
        devices.c.status == "accepted").with_for_update()).first()
    if row is None:
        return None
    try:
        old = json.loads(row.identity_json)
    except ValueError:
        return None
    if not isinstance(old, dict) or not old or len(old) >= len(req.identity) or \
            any(req.identity.get(k) != v for k, v in old.items()):
        return None
    c.execute(devices.update().where(devices.c.id == row.id).values(
        identity_json=req.identity_json, identity_hash=req.identity_hash, updated=now()))
    added = ", ".join(sorted(set(req.identity) - set(old)))
    audit.record(c, "device", "POST", AUTH_REQUESTS, f"identity of device {row.id} extended with {added} (the "
                 "same accepted key)")
    log.info("identity of device %s extended with %s (signed by its accepted key)", row.id, added)
    return row


def _accept_by_certificate(ctx: ServerContext, c: sa.Connection, device_id: str, aset_id: str,
                           cert: DeviceCert) -> None:
    """Accept a pending auth set on a valid fleet certificate, as an administrator's accept would (one key at a
    time, the staged configuration applied), with its audit entry."""
    accept_auth_set(c, device_id, aset_id)
    c.execute(auth_sets.update().where(auth_sets.c.id == aset_id).values(cert_serial=cert.serial,
                                                                         cert_refused=None))
    staged = apply_staged(c, ctx.config, device_id)
    audit.record(c, "fleet-ca", "POST", AUTH_REQUESTS,
                 f"accepted by fleet certificate {cert.serial} ({cert.device_id}): auth set {aset_id} of device "
                 f"{device_id}" + (f"; {staged}" if staged else ""))


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
    #: ``devices.config_hash``, sent with the ``next`` answer (:func:`.confighash.poll_hash`)
    config_hash: str | None = None


#: hot-path statements, run through the driver (see Database.fetch)
#: the device's row as the token check reads it, through the driver on the hot path (see Database.fetch)
DEVICE_SQL = ("SELECT status, provides_hash, group_name, auth_set_id, token_epoch, config_hash FROM devices "
              "WHERE id = ?")


def token_problem(claims: DeviceClaims, status: str, auth_set_id: str | None, epoch: int) -> str | None:
    """Why a verified token does not (or no longer) stand for the device whose row holds ``status``, the
    accepted ``auth_set_id`` and ``epoch``; None when it does."""
    if status != "accepted":
        return f"device is {status}, not accepted"
    if auth_set_id != claims.auth_set_id or epoch != claims.epoch:
        return "device token revoked (its key was rejected, replaced or accepted again): authenticate again"
    return None


def device_of(ctx: ServerContext, authorization: str | None) -> CurrentDevice:
    """The device of a valid token (the ``Authorization`` header's value), read from the database.

    Raises:
        APIError: 401 for a bad or expired token, an unknown (decommissioned) device, a device that is not
            accepted, or a token issued for an auth set or epoch that is no longer the device's (its key was
            rejected or replaced, or accepted again since).
    """
    claims = ctx.tokens.verify(authorization)
    rows = ctx.db.fetch(DEVICE_SQL, (claims.device_id,))
    if not rows:
        raise unauthorized("unknown or decommissioned device")
    status, provides_hash, group, auth_set_id, epoch, config_hash = rows[0]
    if problem := token_problem(claims, status, auth_set_id, epoch):
        raise unauthorized(problem)
    return CurrentDevice(claims.device_id, provides_hash, group, config_hash)


async def current_device(request: Request) -> CurrentDevice:
    """The device of a valid token, read on every request (:func:`device_of`).

    Raises:
        APIError: 401 as :func:`device_of` says.
    """
    return device_of(get_ctx(request), request.headers.get("authorization"))


async def _ctx(request: Request) -> ServerContext:
    # async on purpose: FastAPI runs a plain ``def`` dependency in the thread pool, a hop per request
    return get_ctx(request)


Device = Annotated[CurrentDevice, Depends(current_device)]
Ctx = Annotated[ServerContext, Depends(_ctx)]

