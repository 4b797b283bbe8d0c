"""What an operator does from the dashboard: accept or reject devices (one key, or the ticked devices of the
pending list), create a deployment, abort, resume or "roll back" one, and edit the configuration variables of a
device or a group. Plain HTML forms (``POST``, no JavaScript).

Every action calls the very function of the management API that does the same (``put_auth_status``,
``bulk_accept``, ``create_deployment``, ``put_deployment_status``, ``replace_config``) with the API's request
model, so validation, error texts and audit entries are the API's: the audit entry names the session's token as
the actor, and the dashboard path (``POST /ui/...``) as the request. An action is refused with ``403`` (and
nothing changes) unless all of these hold, in this order:

1. an ``Origin`` header, when sent, is this server's (the request's ``Host``, or ``--public-url``); without
   one, a ``Referer``, when sent, is too (``Origin: null`` is refused);
2. the viewer's token has scope ``operate`` (a refusal is written to the audit log, as the API does);
3. the form's hidden ``csrf`` field equals :func:`.dashboard.csrf_token` of the request's session (compared
   with ``hmac.compare_digest``); a refusal is written to the audit log.

The session cookie is ``SameSite=Strict`` besides, so a cross-site form post arrives without a session at all
(and is sent to the login form). After an action the answer is a ``303`` to the page it came from, with a
one-line flash message (the API's error text on failure) in a signed cookie that the next page shows once.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable
from typing import Annotated, Any, NoReturn
from urllib.parse import urlencode, urlsplit

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from ota_common.varnames import is_group_name

from . import audit
from . import dashboard_queries as q
from .apitokens import Caller, Principal
from .configvars import MAX_VARS, SECRETS_KEY
from .context import ServerContext, get_ctx
from .dashboard import FLASH_COOKIE, SECURITY_HEADERS, Viewer, csrf_token, flash_cookie, render, require_session
from .errors import APIError
from .management import AuthStatus, BulkAccept, get_group_config, put_auth_status, replace_config
from .management import bulk_accept as api_bulk_accept
from .models import auth_sets
from .models import devices as devices_t
from .releases import DeploymentStatus, NewDeployment, create_deployment, put_deployment_status
from .rollback import create_rollback

CSRF_FIELD = "csrf"
PHASE_ROWS = 4
FORM_LIMITS = {"max_fields": 4 * (MAX_VARS + 16) + 32, "max_files": 0, "max_part_size": 256 * 1024}
#: ids of the deployment form's device list: split on white space and commas
SPLIT = re.compile(r"[\s,]+")

Ctx = Annotated[ServerContext, Depends(get_ctx)]
router = APIRouter(dependencies=[Depends(require_session)], include_in_schema=False)


# ---------------------------------------------------------------------------------------------------------
# The checks every action passes, and its answer


class Refused(Exception):
    """An action refused before it did anything (403 page)."""

    def __init__(self, why: str, scope: str | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.scope = scope


def _own_origins(ctx: ServerContext, request: Request) -> set[str]:
    """``host[:port]`` under which a browser reaches this server: the request's ``Host`` and ``--public-url``."""
    own = {request.headers.get("host", "").lower()}
    if ctx.settings.public_url:
        own.add(urlsplit(ctx.settings.public_url).netloc.lower())
    own.discard("")
    return own


def _check_origin(ctx: ServerContext, request: Request) -> None:
    origin = request.headers.get("origin")
    source = origin if origin is not None else request.headers.get("referer")
    if source is None:
        return  # neither sent (old browsers, privacy tools): the CSRF token decides alone
    parts = urlsplit(source.strip())
    if parts.scheme not in ("http", "https") or parts.netloc.lower() not in _own_origins(ctx, request):
        raise Refused(f"this form was sent from another site ({'Origin' if origin is not None else 'Referer'}: "
                      f"{source[:100]})")


async def _authorize(request: Request, who: Principal) -> tuple[Caller, FormData]:
    """The audit caller of an allowed action and its form.

    Raises:
        Refused: another site's form, a token without scope ``operate``, a missing or wrong CSRF token.
    """
    ctx = get_ctx(request)
    _check_origin(ctx, request)
    if not who.allows("operate"):
        with ctx.db.write() as c:
            audit.record(c, who.name, request.method, request.url.path, "refused: needs scope operate")
        raise Refused(f"this action needs a token with scope operate; {who.name} has scope {who.scope}", "operate")
    form = await request.form(**FORM_LIMITS)
    sent = form.get(CSRF_FIELD)
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), csrf_token(ctx, request).encode()):
        with ctx.db.write() as c:
            audit.record(c, who.name, request.method, request.url.path, "refused: missing or wrong CSRF token")
        raise Refused("the form's security token is missing or wrong (the form may be from an older session): "
                      "reload the page and try again")
    return Caller(who, request.method, request.url.path), form


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _validation_text(err: ValidationError) -> str:
    """The text the API answers for an invalid body (``app._validation_message``)."""
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "body"
        parts.append(f"{loc}: {str(e.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return "invalid request: " + "; ".join(parts)


def _done(request: Request, target: str, ok: bool, message: str) -> Response:
    ctx = get_ctx(request)
    resp = RedirectResponse(target, status_code=303)
    resp.headers.update(SECURITY_HEADERS)
    secure = request.url.scheme == "https" or (ctx.settings.public_url or "").startswith("https://")
    resp.set_cookie(FLASH_COOKIE, flash_cookie(ctx, ok, message), max_age=120, path="/ui", httponly=True,
                    samesite="strict", secure=secure)
    return resp


async def _act(request: Request, who: Principal, target: str, action: Callable[[Caller, FormData], tuple[str, str]]
               ) -> Response:
    """Run ``action`` (returns the success message and where to go) after the checks; its APIError or
    validation error becomes the flash message, and the page it came from is shown again."""
    try:
        caller, form = await _authorize(request, who)
    except Refused as refused:
        return render("forbidden.html", status=403, viewer=who, scope=refused.scope, reason=refused.why)
    try:
        # the API's functions are synchronous (FastAPI runs them in its thread pool): so here
        message, target = await run_in_threadpool(action, caller, form)
    except APIError as err:
        return _done(request, target, False, err.message)
    except ValidationError as err:
        return _done(request, target, False, _validation_text(err))
    except sa.exc.IntegrityError:
        return _done(request, target, False, "conflict with a concurrent change; try again")
    return _done(request, target, True, message)


# ---------------------------------------------------------------------------------------------------------
# Devices: accept, reject


@router.post("/ui/devices/{device_id}/auth/{auth_id}/status")
async def set_auth(request: Request, device_id: str, auth_id: str, who: Viewer, ctx: Ctx) -> Response:
    """Accept or reject one key of a device (``status``: accepted | rejected | pending)."""
    def action(caller: Caller, form: FormData) -> tuple[str, str]:
        status = _field(form, "status")
        put_auth_status(device_id, auth_id, AuthStatus(status=status), ctx, caller)
        return f"key {auth_id[:8]} of device {device_id[:8]} {status}", f"/ui/devices/{device_id}"
    return await _act(request, who, f"/ui/devices/{device_id}", action)


@router.post("/ui/devices/pending")
async def decide_pending(request: Request, who: Viewer, ctx: Ctx) -> Response:
    """The ticked devices of the pending list (``ids``), accepted (the API's bulk accept) or rejected (each
    pending key through the API's auth status change) as ``decision`` says."""
    def action(caller: Caller, form: FormData) -> tuple[str, str]:
        ids = [v for v in form.getlist("ids") if isinstance(v, str) and v]
        decision = _field(form, "decision")
        if not ids:
            return _raise("tick at least one device")
        if decision == "accept":
            answer = api_bulk_accept(BulkAccept(ids=ids), ctx, caller)
            results = answer["results"]
        elif decision == "reject":
            BulkAccept(ids=ids)  # the same limits on the list
            results = [_reject_pending(ctx, caller, device_id) for device_id in dict.fromkeys(ids)]
        else:
            return _raise("choose accept or reject")
        done = "accepted" if decision == "accept" else "rejected"
        count = sum(r["result"] == done for r in results)
        others = [f"{r['id'][:8]}: {r['result']}" for r in results if r["result"] != done]
        return (f"{done} {count} of {len(results)} device(s)" + (f"; {'; '.join(others[:5])}" if others else ""),
                "/ui/")
    return await _act(request, who, "/ui/", action)


def _raise(message: str) -> NoReturn:
    raise APIError(400, message)


def _reject_pending(ctx: ServerContext, caller: Caller, device_id: str) -> dict[str, Any]:
    with ctx.db.read() as c:
        pending = [r[0] for r in c.execute(sa.select(auth_sets.c.id).where(
            auth_sets.c.device_id == device_id, auth_sets.c.status == "pending").order_by(auth_sets.c.created))]
    if not pending:
        return {"id": device_id, "result": "no pending key"}
    try:
        for auth_id in pending:
            put_auth_status(device_id, auth_id, AuthStatus(status="rejected"), ctx, caller)
    except APIError as err:
        return {"id": device_id, "result": err.message}
    return {"id": device_id, "result": "rejected"}


# ---------------------------------------------------------------------------------------------------------
# Deployments: create, abort, resume, roll back


@router.get("/ui/deploy")
def deploy_form(request: Request, ctx: Ctx, who: Viewer,
                devices: Annotated[str | None, Query(max_length=100_000)] = None,
                group: Annotated[str | None, Query(max_length=64)] = None) -> Response:
    """The form of a new deployment (``?devices=id,...`` or ``?group=`` fill in the target)."""
    if not who.allows("operate"):
        return render("forbidden.html", status=403, viewer=who, scope="operate", reason=None)
    with ctx.db.read() as c:
        artifacts, groups = q.artifact_choices(c), q.group_choices(c)
        accepted = c.execute(sa.select(sa.func.count()).select_from(devices_t)
                             .where(devices_t.c.status == "accepted")).scalar_one()
    target = "devices" if devices else "group" if group else "all"
    return render("deploy.html", request=request, viewer=who, artifacts=artifacts, groups=groups, accepted=accepted,
                  target=target, devices=devices or "", group=group or "", phase_rows=PHASE_ROWS)


def _deployment_body(form: FormData) -> dict[str, Any]:
    """The management API's deployment body from the form: only what was filled in (the API's defaults
    otherwise); phase rows left blank are left out."""
    body: dict[str, Any] = {"name": _field(form, "name"), "artifact_name": _field(form, "artifact_name")}
    target = _field(form, "target")
    if target == "devices":
        body["devices"] = [d for d in SPLIT.split(_field(form, "devices")) if d]
    elif target == "group":
        body["group"] = _field(form, "group")
    elif target == "all":
        body["all_devices"] = True
    phases = []
    for i in range(1, PHASE_ROWS + 1):
        row = {key: _field(form, f"phase{i}_{key}") for key in ("batch_size", "wait_s", "start_ts")}
        row = {k: v for k, v in row.items() if v}
        if row:
            phases.append(row)
    if phases:
        body["phases"] = phases
    for key in ("failure_threshold", "retries"):
        if _field(form, key):
            body[key] = _field(form, key)
    body["allow_downgrade"] = _field(form, "allow_downgrade") == "on"
    return body


def _created_id(resp: Response) -> str:
    return resp.headers["location"].rsplit("/", 1)[1]


@router.post("/ui/deploy")
async def deploy(request: Request, who: Viewer, ctx: Ctx) -> Response:
    def action(caller: Caller, form: FormData) -> tuple[str, str]:
        body = NewDeployment.model_validate(_deployment_body(form))
        deployment_id = _created_id(create_deployment(body, ctx, caller))
        return f"deployment {body.name!r} created", f"/ui/deployments/{deployment_id}"
    return await _act(request, who, "/ui/deploy", action)


@router.post("/ui/deployments/{deployment_id}/status")
async def deployment_status(request: Request, deployment_id: str, who: Viewer, ctx: Ctx) -> Response:
    """Abort (``status=aborted``) or resume (``status=inprogress``) a deployment."""
    def action(caller: Caller, form: FormData) -> tuple[str, str]:
        status = _field(form, "status")
        put_deployment_status(deployment_id, DeploymentStatus(status=status), ctx, caller)
        return ("deployment aborted" if status == "aborted" else "deployment resumed"), target
    target = f"/ui/deployments/{deployment_id}"
    return await _act(request, who, target, action)


@router.post("/ui/deployments/{deployment_id}/rollback")
async def rollback(request: Request, deployment_id: str, who: Viewer, ctx: Ctx) -> Response:
    """``POST .../deployments/{id}/rollback``: each device that installed it goes back to what it ran before."""
    def action(caller: Caller, form: FormData) -> tuple[str, str]:
        doc = json.loads(bytes(create_rollback(deployment_id, ctx, caller, None).body))
        skipped = f"; {len(doc['skipped'])} skipped" if doc["skipped"] else ""
        return (f"rollback deployment to {doc['device_count']} device(s) created{skipped}",
                f"/ui/deployments/{doc['id']}")
    return await _act(request, who, f"/ui/deployments/{deployment_id}", action)


# ---------------------------------------------------------------------------------------------------------
# Configuration variables


def _config_body(form: FormData) -> dict[str, Any]:
    """``{name: value, ..., "_secrets": [...]}`` from the rows ``var<i>_name``, ``var<i>_value``,
    ``var<i>_secret`` (rows with an empty name or ``var<i>_remove`` ticked are left out). A secret's value is
    shown as ``SECRET_MASK`` and sent back so: the stored secret stays."""
    body: dict[str, Any] = {}
    secrets: list[str] = []
    for i in range(MAX_VARS + 16):
        name = _field(form, f"var{i}_name")
        if not name or _field(form, f"var{i}_remove") == "on":
            continue
        if name in body or name == SECRETS_KEY:
            raise APIError(400, f"the variable {name!r} is given twice" if name in body else
                                f"{SECRETS_KEY} is not a variable name")
        value = form.get(f"var{i}_value")
        body[name] = value if isinstance(value, str) else ""
        if _field(form, f"var{i}_secret") == "on":
            secrets.append(name)
    body[SECRETS_KEY] = secrets
    return body


@router.post("/ui/devices/{device_id}/config")
async def device_config(request: Request, device_id: str, who: Viewer, ctx: Ctx) -> Response:
    def action(caller: Caller, form: FormData) -> tuple[str, str]:
        body = _config_body(form)
        replace_config(ctx, caller, "device", device_id, body)
        return f"{len(body) - 1} variable(s) of the device saved", target
    target = f"/ui/devices/{device_id}#config"
    return await _act(request, who, target, action)


@router.get("/ui/groups/{group}")
def group_page(request: Request, group: str, ctx: Ctx, who: Viewer) -> Response:
    """A group: its devices (link to the filtered list) and its configuration variables."""
    if not is_group_name(group):
        return render("not_found.html", status=404, viewer=who, what="group", ident=group)
    with ctx.db.read() as c:
        members = c.execute(sa.select(sa.func.count()).select_from(devices_t)
                            .where(devices_t.c.group_name == group)).scalar_one()
    return render("group.html", request=request, viewer=who, group=group, members=members,
                  config=get_group_config(group, ctx),
                  filter_link="/ui/?" + urlencode({"group": group}))


@router.post("/ui/groups/{group}/config")
async def group_config(request: Request, group: str, who: Viewer, ctx: Ctx) -> Response:
    def action(caller: Caller, form: FormData) -> tuple[str, str]:
        body = _config_body(form)
        replace_config(ctx, caller, "group", group, body)
        return f"{len(body) - 1} variable(s) of group {group} saved", target
    target = f"/ui/groups/{group}" if is_group_name(group) else "/ui/"
    return await _act(request, who, target, action)
