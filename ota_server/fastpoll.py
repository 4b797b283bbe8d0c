"""The poll shortcut: the idle ``next`` polls of a fleet answered before FastAPI's routing.

The most frequent request of a fleet is a ``next`` POST of an accepted device whose provides did not change and
that has nothing to do. :class:`FastPoll` answers those 204 with the route's own rules — the token check
(:func:`.devauth.token_problem`), the body's (:func:`.device_deployments.check_provides`) and a device that
waits (:func:`.deployments.is_waiting`) — and hands every other request, body replayed, to the route. Each
answer it gives counts in the ``ota_fast_polls_total`` metric and notes the device as seen (:mod:`.lastseen`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ota_common.varnames import CONFIG_HASH_HEADER

from .asgibody import json_authorization, read_body, replaying
from .auth import canonical_json, sha256_hex
from .confighash import poll_hash
from .context import ServerContext
from .deployments import ALL_GROUPS, JOINABLE_SQL, is_waiting
from .deployments import joinable as joinable_ids
from .devauth import token_problem
from .device_deployments import ACTIVE_SQL, NEXT_V1, NEXT_V2, NO_CONTENT, ProvidesError, check_provides
from .errors import APIError
from .metrics import FAST_POLLS
from .timeutil import now


class FastPoll:
    """ASGI shortcut for the most frequent request of a fleet: a ``next`` POST (v2 or v1) of an accepted
    device whose provides did not change and that has nothing to do. It runs the same checks as the route
    (token, the device's status read from the database, :func:`check_provides`, the same two reads)
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
        body = await read_body(receive)
        if body is None:
            return  # the client went away (or a body limit answered already)
        config_hash = _idle_poll(scope, body)
        if config_hash is not None:
            scope["route"] = _FAST_ROUTES[scope["path"]]  # labels the request's metrics like the route's
            FAST_POLLS.inc()
            await send({"type": "http.response.start", "status": NO_CONTENT,
                        "headers": [(_HASH_HEADER, config_hash.encode())]})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, replaying(body, receive), send)


@dataclass(frozen=True)
class _RouteLabel:
    path: str


_FAST_ROUTES = {p: _RouteLabel(p) for p in FastPoll.PATHS}


#: the idle-poll question in one statement: the device row, how many unfinished deployments it has (the
#: ``deployment_devices(device_id, active)`` index answers the count; only a device with some reads them), and
#: how many open dynamic deployments of its group (or of all devices) would take it and do not have it yet
#: (the ``deployments(join_group)`` index, usually no row): a device one would take is not idle. A deployment
#: to an inventory filter is counted for every device of its group (all devices: every device) until it is
#: closed; for those the shortcut reads :data:`.deployments.JOINABLE_SQL` too and checks the filter, one more
#: indexed read per poll while such a deployment is open, and still answers the devices that do not match
POLL_SQL = ("SELECT d.status, d.provides_hash, d.auth_set_id, d.token_epoch, (SELECT count(*) FROM "
            "deployment_devices dd WHERE dd.device_id = d.id AND dd.active = ?), (SELECT count(*) FROM deployments "
            "dp WHERE dp.join_group IN (d.group_name, ?) AND NOT EXISTS (SELECT 1 FROM deployment_devices x WHERE "
            "x.deployment_id = dp.id AND x.device_id = d.id)), d.config_hash FROM devices d WHERE d.id = ?")
#: ``next`` bodies already checked -> the hash of their provides (None: not a body the shortcut takes). A
#: fleet sends few distinct bodies (one per running version and device type), so this stays small.
_HASH_HEADER = CONFIG_HASH_HEADER.lower().encode()
_BODIES: dict[tuple[bool, bytes], str | None] = {}
BODY_CACHE_SIZE = 10_000
BODY_CACHE_MAX_LEN = 4096


def _provides_hash(body: bytes, flat_allowed: bool) -> str | None:
    """The hash of a ``next`` body's provides if the body follows the route's rules (the v2 shape, or with
    ``flat_allowed`` — v1 POST — the flat provides map; :func:`check_provides`), else None. Bodies are
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
    if isinstance(provides, dict):
        try:
            check_provides(provides)
            found = sha256_hex(canonical_json(provides))
        except ProvidesError:
            pass  # the route says what is wrong
    if len(body) <= BODY_CACHE_MAX_LEN:
        if len(_BODIES) >= BODY_CACHE_SIZE:
            _BODIES.clear()
        _BODIES[key] = found
    return found


def _idle_poll(scope: Scope, body: bytes) -> str | None:
    """The device's configuration hash (the answer's header) when the regular ``next`` route would answer this
    request with 204 and change nothing, else None."""
    auth = json_authorization(scope)
    if auth is None:
        return None
    ctx: ServerContext = scope["app"].state.ctx
    try:
        claims = ctx.tokens.verify(auth.decode("latin-1"))
    except APIError:
        return None
    provides_hash = _provides_hash(body, scope["path"] == NEXT_V1)
    if provides_hash is None:
        return None
    rows = ctx.db.fetch(POLL_SQL, (True, ALL_GROUPS, claims.device_id))
    if not rows:
        return None
    status, known_hash, auth_set_id, epoch, active, joinable, config_hash = rows[0]
    if token_problem(claims, status, auth_set_id, epoch) is not None or known_hash != provides_hash:
        return None
    if joinable and joinable_ids(ctx.db.fetch(JOINABLE_SQL, (ALL_GROUPS, claims.device_id))):
        return None  # a dynamic deployment takes the device (its filter, if any, matches): the route adds it
    t = now()
    if active:
        for _, dstatus, not_before, status, *_ in ctx.db.fetch(ACTIVE_SQL, (claims.device_id, True)):
            if not is_waiting(dstatus, not_before, status, t):
                return None  # something to hand out or to record: the route does it (and notes the device)
    ctx.last_seen.seen(claims.device_id, t)  # in memory; written in a batch (see .lastseen)
    return poll_hash(config_hash)

