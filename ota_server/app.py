"""The FastAPI application: routers, JSON errors, body limits, health and metrics."""

from __future__ import annotations

import json
import logging
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

from . import admin_api, dashboard, device_api, management, metrics, releases
from .apitokens import READ, RequireScope, route_scope
from .context import ServerContext
from .errors import ERROR_RESPONSES, APIError
from .settings import Settings, load_or_create_secrets

log = logging.getLogger("ota_server")

#: paths whose bodies are streamed and limited by their handler instead
STREAMED = frozenset({releases.ARTIFACTS})


class BodyLimit:
    """Refuse request bodies (Content-Length or chunked) larger than ``limit`` with 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in STREAMED:
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _json(413, f"request body larger than {self.limit} bytes")(scope, receive, send)
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
                if seen > self.limit:
                    # answer now; the handler sees a disconnected client and whatever it sends is dropped
                    refused = True
                    await _json(413, f"request body larger than {self.limit} bytes")(scope, receive, send)
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


class UnicodeCheck:
    """Refuse (400) request bodies whose JSON strings are not valid Unicode, before any handler stores them
    (SQLite and PostgreSQL refuse them, a JSON or text answer cannot encode them: a 500 later)."""

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
        if _not_unicode(body):
            await _json(400, "the body is not valid Unicode text: a string holds a lone surrogate escape "
                        "(\\uD800-\\uDFFF)")(scope, receive, send)
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
        if isinstance(dep.call, RequireScope) or dep.call is device_api.current_device:
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
    for sub in ("artifacts", "tmp"):
        (settings.storage / sub).mkdir(parents=True, exist_ok=True)
    ctx = ServerContext.create(settings, load_or_create_secrets(settings.storage))
    app = FastAPI(
        title="vv-ota update server",
        version="1",
        description="Mender-compatible device API and management API. Management endpoints need "
        "`Authorization: Bearer <API token>` with the scope each operation names (read < operate < admin); "
        "device endpoints a device token from auth_requests. "
        'Errors are `{"error": "message"}`.',
        responses=ERROR_RESPONSES,
        docs_url=None, redoc_url=None, openapi_url=None,  # served below, behind a token unless --public-docs
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

    app.include_router(device_api.router)
    app.include_router(management.router)
    app.include_router(releases.router)
    app.include_router(admin_api.router)
    app.include_router(dashboard.router)
    _document_scopes(app)
    app.add_middleware(device_api.FastPoll)  # innermost: the checks below wrap it as they wrap routes
    app.add_middleware(UnicodeCheck)  # inside BodyLimit: never buffers more than max_body
    app.add_middleware(BodyLimit, limit=settings.max_body)
    app.add_middleware(metrics.MetricsMiddleware)
    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn worker processes (``OTA_SERVER_SETTINGS`` carries the settings)."""
    return create_app(Settings.from_env())
