"""The status-report shortcut: a device's ``PUT .../deployments/{id}/status`` stored before FastAPI's routing.

During a rollout every device reports several times (downloading, installing, rebooting, a final status), so
reports arrive at poll rates. Through FastAPI each one paid its routing, dependency solving and body validation,
several times what storing the report costs in a group commit (:mod:`.groupcommit`). :class:`FastReport`
takes a report whose token is good (:func:`.devauth.device_of`, the route's own check) and whose body follows
the route's rules (:class:`.device_deployments.StatusBody`: a JSON object whose ``status`` is one of
:data:`.deployments.REPORTABLE` and whose ``substate`` is absent, null or a string of at most
:data:`.device_deployments.SUBSTATE_MAX` characters; other members are ignored), stores it with the route's own
function (:func:`.device_deployments.store_status`: answered once committed) and answers as the route would:
204, or the error the report raised (404, 409, 400) as ``{"error": ...}``. Every other request — another path or
method, a bad token, a body the route would refuse or might read otherwise — goes on, body replayed, to the route,
which gives the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .asgibody import json_authorization, read_body, replaying
from .context import ServerContext
from .deployments import REPORTABLE
from .devauth import device_of
from .device_deployments import NO_CONTENT, STATUS_PATH, SUBSTATE_MAX, store_status
from .errors import APIError

PREFIX = STATUS_PATH.split("{", 1)[0]
SUFFIX = STATUS_PATH.rsplit("}", 1)[1]


@dataclass(frozen=True)
class _RouteLabel:
    path: str


#: labels the shortcut's requests in the metrics as the route's (:class:`.metrics.MetricsMiddleware`)
_ROUTE = _RouteLabel(STATUS_PATH)


def deployment_in_path(path: str) -> str | None:
    """The deployment id of a status report's path (the route's ``{deployment_id}``: one non-empty segment),
    else None."""
    if not (path.startswith(PREFIX) and path.endswith(SUFFIX)):
        return None
    deployment_id = path[len(PREFIX):len(path) - len(SUFFIX)]
    return deployment_id if deployment_id and "/" not in deployment_id else None


def parse_report(body: bytes) -> tuple[str, str | None] | None:
    """(status, substate) of a body the route's :class:`.device_deployments.StatusBody` accepts as is, else
    None (the route says what is wrong)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    status, substate = doc.get("status"), doc.get("substate")
    if type(status) is not str or status not in REPORTABLE:
        return None
    if substate is not None and (type(substate) is not str or len(substate) > SUBSTATE_MAX):
        return None
    return status, substate


class FastReport:
    """ASGI shortcut for device status reports (see the module's docstring). Installed next to
    :class:`.fastpoll.FastPoll`, inside the metrics, body limits and body checks, which wrap it as they wrap
    the routes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deployment_id = None
        if scope["type"] == "http" and scope["method"] == "PUT":
            deployment_id = deployment_in_path(scope["path"])
        if deployment_id is None:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return  # the client went away (or a body limit answered already)
        taken = _taken(scope, body)
        if taken is not None:
            ctx, device_id, (status, substate) = taken
            scope["route"] = _ROUTE
            try:
                await store_status(ctx, deployment_id, device_id, status, substate)
            except APIError as e:  # as the app's handler answers it
                await JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)(scope, receive, send)
                return
            await send({"type": "http.response.start", "status": NO_CONTENT, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, replaying(body, receive), send)


def _taken(scope: Scope, body: bytes) -> tuple[ServerContext, str, tuple[str, str | None]] | None:
    """(context, device id, (status, substate)) when the route would take this report as it is: a JSON body it
    accepts and a good device token. Else None."""
    auth = json_authorization(scope)
    if auth is None:
        return None
    report = parse_report(body)
    if report is None:
        return None
    ctx: ServerContext = scope["app"].state.ctx
    try:
        device = device_of(ctx, auth.decode("latin-1"))
    except APIError:
        return None  # the route answers 401
    return ctx, device.id, report
