"""The FastAPI application: routers, JSON errors, body limits, health and metrics."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import (
    admin_api,
    dashboard,
    dashboard_actions,
    dashboard_releases,
    devauth,
    device_api,
    device_deployments,
    device_logs,
    http_protocol,
    lastseen,
    management,
    metrics,
    openapi_links,
    provisioning,
    release_sbom,
    releases,
    rollback,
)
from .apitokens import READ, RequireScope, find_principal, route_scope
from .context import ServerContext
from .downloads import DOWNLOAD_PATH
from .errors import ERROR_RESPONSES, APIError
from .fastpoll import FastPoll
from .fastreport import FastReport
from .settings import Settings, load_server_secrets

log = logging.getLogger("ota_server")

#: paths whose bodies are streamed and limited by their handler instead
STREAMED = frozenset({releases.ARTIFACTS})


def needs_credentials(path: str) -> bool:
    """Whether the routes at ``path`` answer 401 to a request without valid credentials."""
    if path.startswith("/api/management/"):
        return True
    return (path.startswith("/api/devices/") and path != devauth.AUTH_REQUESTS
            and not path.startswith(DOWNLOAD_PATH))


def has_credentials(ctx: ServerContext, scope: Scope) -> bool:
    """The request carries a valid API token (management API, dashboard) or the current token of an accepted
    device (device API: its auth set and epoch still the device's). Costs a token check and one primary-key
    read."""
    auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
    path: str = scope["path"]
    try:
        if path.startswith(("/api/management/", "/ui/")):
            token = auth[7:].strip() if auth and auth.startswith("Bearer ") else ""
            return find_principal(ctx.db, token, ctx.settings.admin_token_sha256) is not None
        if path.startswith("/api/devices/"):
            claims = ctx.tokens.verify(auth)
            rows = ctx.db.fetch(devauth.DEVICE_SQL, (claims.device_id,))
            return bool(rows) and devauth.token_problem(claims, rows[0][0], rows[0][3], rows[0][4]) is None
    except APIError:
        return False
    return False


class BodyLimit:
    """Bound request bodies before they are read. With valid credentials (:func:`has_credentials`) a body may
    have ``limit`` bytes; without them, and always for device auth requests, ``unauthenticated`` bytes. A
    ``Content-Length`` past the limit is refused before any of the body is read, a chunked body as soon as it
    passes the limit; the credentials are looked at only then (small bodies, polls included, pay nothing).
    The refusal is 401 where the route needs credentials (it would be 401 anyway), else 413, and it closes the
    connection (the rest of the body is never read). Streamed uploads (:data:`STREAMED`) are bounded by their
    handler once the credentials are known good."""

    def __init__(self, app: ASGIApp, ctx: ServerContext, limit: int, unauthenticated: int) -> None:
        self.app = app
        self.ctx = ctx
        self.limit = limit
        self.unauthenticated = unauthenticated

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        small = self.unauthenticated
        large: int | None = None if path in STREAMED else self.limit  # None: not bounded here
        if path == devauth.AUTH_REQUESTS:
            large = small
        authorized: bool | None = None

        def allowed() -> int | None:
            nonlocal authorized
            if authorized is None:
                authorized = has_credentials(self.ctx, scope)
            return large if authorized else small

        def refusal(limit: int) -> Response:
            if not authorized and needs_credentials(path):
                return _json(401, f"a body larger than {small} bytes needs valid credentials",
                             {"WWW-Authenticate": "Bearer", "Connection": "close"})
            return _json(413, f"request body larger than {limit} bytes", {"Connection": "close"})

        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > small:
                limit = allowed()
                if limit is not None and int(value) > limit:
                    await refusal(limit)(scope, receive, send)
                    return
        seen = 0
        refused = False

        async def limited() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > small and (limit := allowed()) is not None and seen > limit:
                    # answer now; the handler sees a disconnected client and whatever it sends is dropped
                    refused = True
                    await refusal(limit)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, limited, guarded_send)


#: a UTF-16 surrogate escape in JSON text: fine in a pair (an emoji), not alone
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _not_unicode(body: bytes) -> bool:
    """A JSON body holding a string with a lone surrogate (``"\\ud800"``): valid JSON, but not text that
    can be stored or sent back as UTF-8. Only bodies with such an escape are decoded here."""
    if not SURROGATE_ESCAPE.search(body):
        return False
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        return False  # not JSON: the handler says so
    return False


#: what a JSON number that is not finite looks like: Python's NaN/Infinity tokens, a number with an exponent of
#: 3 digits (not inside a word: a hex checksum such as "ab1e234f" in every poll does not match)
NON_FINITE = re.compile(rb"NaN|Infinity|(?<![0-9A-Za-z_.-])-?[0-9]+(?:\.[0-9]+)?[eE]\+?[0-9]{3}")


class _NonFinite(Exception):
    pass


def _reject_constant(_: str) -> float:
    raise _NonFinite


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite
    return value


def _not_finite(body: bytes) -> bool:
    """A JSON body holding ``NaN``, ``Infinity`` or a number too large for a double (``1e999``): Python's
    parser takes them, JSON does not (PostgreSQL refuses to store them, answers turn them into null). Only
    bodies that look like they may hold one are decoded here."""
    if not NON_FINITE.search(body):
        return False
    try:
        json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except _NonFinite:
        return True
    except (ValueError, RecursionError):
        return False  # not JSON: the handler says so
    return False


class UnicodeCheck:
    """Refuse (400) request bodies whose JSON strings are not valid Unicode, or whose numbers are not finite,
    before any handler stores them (SQLite and PostgreSQL refuse lone surrogates, PostgreSQL NaN and Infinity;
    a JSON or text answer cannot encode them: a 500 later)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in STREAMED:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:  # the handlers read the whole body anyway; BodyLimit (outside) bounds it
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left, or BodyLimit refused the body with 413
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = None
        if _not_unicode(body):
            problem = "the body is not valid Unicode text: a string holds a lone surrogate escape (\\uD800-\\uDFFF)"
        elif _not_finite(body):
            problem = ("the body is not valid JSON: it holds a number that is not finite (NaN, Infinity, or too "
                       "large for a double)")
        if problem is not None:
            ctx: ServerContext = scope["app"].state.ctx
            if needs_credentials(scope["path"]) and not has_credentials(ctx, scope):  # credentials come first
                await _json(401, "missing or invalid credentials", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            else:
                await _json(400, problem)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _json(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        if e.get("type") == "json_invalid":
            pos = e.get("loc", ("body", "?"))[-1]
            return f"the body is not valid JSON: {e.get('ctx', {}).get('error', 'decode error')} at character {pos}"
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid request: " + "; ".join(parts)


async def _credentials_error(request: Request) -> Response | None:
    """FastAPI reports an unparsable body before it runs the route's dependencies: check the route's
    credentials first (API token and its scope, or the token of an accepted device), so that a request without
    them gets 401 (403: a token without the scope) whatever its body, and learns nothing."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    for dep in getattr(dependant, "dependencies", ()):
        if isinstance(dep.call, RequireScope) or dep.call is devauth.current_device:
            try:
                await dep.call(request)
            except APIError as e:
                return _json(e.status, e.message, e.headers)
    return None


def api_routes(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    """Every API route, also inside included routers (FastAPI >= 0.16x keeps those as one entry that points
    to the original router; older versions copy the routes)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (inner := getattr(route, "original_router", None)) is not None:
            yield from api_routes(inner.routes)


def route_scopes(app: FastAPI) -> dict[tuple[str, str], str | None]:
    """``(method, path)`` -> the token scope the route declares (None: no API token)."""
    return {(m, r.path): route_scope(r.dependant.dependencies) for r in api_routes(app.routes)
            for m in r.methods or ()}


def _document_scopes(app: FastAPI) -> None:
    """Say in the OpenAPI description of every operation which token scope it needs (``x-required-scope``)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        first = app.openapi_schema is None
        schema = generate()
        if first:
            scopes = route_scopes(app)
            for path, operations in schema.get("paths", {}).items():
                for method, op in operations.items():
                    if scope := scopes.get((method.upper(), path)):
                        note = f"Needs an API token with scope `{scope}` (or a higher one)."
                        op["description"] = f"{op['description']}\n\n{note}" if op.get("description") else note
                        op["x-required-scope"] = scope
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings) -> FastAPI:
    for sub in ("tmp",) if settings.artifact_store else ("artifacts", "tmp"):
        (settings.storage / sub).mkdir(parents=True, exist_ok=True)
    ctx = ServerContext.create(settings, load_server_secrets(settings.storage, settings.secrets_file))
    http_protocol.configure(http_protocol.ConnectionLimits.from_settings(settings))
    app = FastAPI(
        title="vv-ota update server",
        version="1",
        description="Mender-compatible device API and management API. Management endpoints need "
        "`Authorization: Bearer <API token>` with the scope each operation names (read < operate < admin); "
        "device endpoints a device token from auth_requests. "
        'Errors are `{"error": "message"}`.',
        responses=ERROR_RESPONSES,
        docs_url=None, redoc_url=None, openapi_url=None,  # served below, behind a token unless --public-docs
        lifespan=lastseen.lifespan(ctx.db, ctx.last_seen, settings.last_seen_flush_seconds),
    )
    app.state.ctx = ctx

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return _json(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return await _credentials_error(request) or _json(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and (denied := await _credentials_error(request)):
            return denied  # "There was an error parsing the body" (e.g. not UTF-8), raised before the auth check
        return _json(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(sa.exc.IntegrityError)
    async def _integrity(request: Request, exc: sa.exc.IntegrityError) -> Response:
        # a unique index refused a row another request inserted at the same moment (the check before the insert
        # saw nothing yet): a conflict, not a server error
        log.warning("conflict on %s %s: %s", request.method, request.url.path, str(exc.orig).splitlines()[0])
        return _json(409, "conflict with a concurrent change; try again")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _json(500, "internal server error")

    @app.get("/health", tags=["service"])
    def health() -> dict[str, Any]:
        with ctx.db.read() as c:
            c.execute(sa.text("SELECT 1"))
        return {"status": "ok"}

    @app.get("/metrics", tags=["service"], response_class=Response,
             dependencies=[] if settings.public_metrics else [Depends(READ)],
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    def prometheus() -> Response:
        """Prometheus metrics (an API token with scope ``read``, unless the server runs with
        ``--public-metrics``)."""
        data, ctype = metrics.render(ctx.db)
        return Response(data, media_type=ctype)

    docs = [] if settings.public_docs else [Depends(READ)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=docs)
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=docs)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    @app.get("/redoc", include_in_schema=False, dependencies=docs)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    app.include_router(devauth.router)
    app.include_router(device_deployments.router)
    app.include_router(device_api.router)
    app.include_router(device_logs.router)
    app.include_router(management.router)
    app.include_router(releases.router)
    app.include_router(release_sbom.router)
    app.include_router(rollback.router)
    app.include_router(admin_api.router)
    app.include_router(dashboard.router)
    app.include_router(dashboard_actions.router)
    app.include_router(dashboard_releases.router)
    app.include_router(provisioning.router)
    _document_scopes(app)
    generate_openapi = app.openapi

    def openapi_with_links() -> dict[str, Any]:
        if app.openapi_schema is None:
            openapi_links.add_links(generate_openapi())  # FastAPI keeps the document it generated
        return app.openapi_schema or generate_openapi()

    app.openapi = openapi_with_links  # type: ignore[method-assign]
    app.add_middleware(FastPoll)  # innermost: the checks below wrap it as they wrap routes
    app.add_middleware(FastReport)  # the same for status reports
    app.add_middleware(UnicodeCheck)  # inside BodyLimit: never buffers more than max_body
    app.add_middleware(BodyLimit, ctx=ctx, limit=settings.max_body, unauthenticated=settings.max_unauthenticated_body)
    app.add_middleware(metrics.MetricsMiddleware)
    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn worker processes (``OTA_SERVER_SETTINGS`` carries the settings)."""
    return create_app(Settings.from_env())
