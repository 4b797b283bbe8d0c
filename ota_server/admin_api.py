"""Management API for administrators (scope ``admin``): API tokens and the audit log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from . import audit
from .apitokens import ADMIN, SCOPES, Administrator, create_token, list_tokens, revoke_token
from .context import ServerContext, get_ctx

router = APIRouter(dependencies=[Depends(ADMIN)])
Ctx = Annotated[ServerContext, Depends(get_ctx)]
TOKENS = "/api/management/v1/tokens"
AUDIT = "/api/management/v1/audit"


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", examples=["ci-publisher"])
    scope: str = Field(pattern="^(" + "|".join(SCOPES) + ")$", examples=["operate"])


@router.get(TOKENS, tags=["tokens"])
def get_tokens(ctx: Ctx) -> list[dict[str, Any]]:
    """The stored API tokens: name, scope, id (the public part of the token), creation time and creator. The
    tokens themselves are never shown again after creation (only their SHA-256 is stored)."""
    with ctx.db.read() as c:
        return list_tokens(c)


@router.post(TOKENS, status_code=201, tags=["tokens"],
             responses={201: {"description": "the new token (shown this once)"}})
def post_token(body: NewToken, ctx: Ctx, who: Administrator) -> JSONResponse:
    """Create a named token with a scope (``read``, ``operate`` or ``admin``); the answer holds the token, shown
    this once. 409 if the name is taken."""
    with ctx.db.write() as c:
        token = create_token(c, body.name, body.scope, f"token:{who.name}")
        who.record(c, f"created API token {body.name!r} with scope {body.scope}")
    return JSONResponse({"name": body.name, "scope": body.scope, "token": token}, status_code=201,
                        headers={"Location": f"{TOKENS}/{body.name}", "Cache-Control": "no-store"})


@router.delete(TOKENS + "/{name}", status_code=204, tags=["tokens"])
def delete_token(name: str, ctx: Ctx, who: Administrator) -> Response:
    """Revoke a token: it stops working at its next request (dashboard sessions made with it too)."""
    with ctx.db.write() as c:
        scope = revoke_token(c, name)
        who.record(c, f"revoked API token {name!r} (scope {scope})")
    return Response(status_code=204)


@router.get(AUDIT, tags=["audit"])
def get_audit(ctx: Ctx, limit: Annotated[int, Query(ge=1, le=audit.MAX_LIMIT)] = 100,
              before: Annotated[int | None, Query(ge=1, le=2**62)] = None) -> list[dict[str, Any]]:
    """Management changes, newest first: ``{id, time, ts, actor, method, path, summary}`` (``actor``: the token's
    name, ``cli:<user>`` for the command line). Page with ``before`` = the last ``id`` seen."""
    with ctx.db.read() as c:
        return audit.entries(c, limit, before)
