"""Management API tokens: named, with a scope, stored hashed, checked on every management request.

Scopes, each including the ones before it:

- ``read``: every ``GET`` of the management API, the dashboard, ``/metrics`` and ``/docs`` (unless public);
- ``operate``: changes to the fleet: accept, reject, preauthorize and decommission devices, groups,
  configuration variables, the Ansible import, artifact upload and delete, deployments (create, abort, resume);
- ``admin``: API tokens and the audit log.

A token is ``vvota_<id>_<secret>``: ``id`` (16 hex digits) finds its row, ``secret`` is 256 random bits. Only the
token's SHA-256 is stored; it is compared in constant time. The *bootstrap* token (``OTA_ADMIN_TOKEN``,
``--admin-token-file`` or the generated ``STORAGE/admin-token``, at least 32 characters) acts as the token
named ``bootstrap`` with scope ``admin``; workers receive only its SHA-256.

Every route declares its scope with one of :data:`READ`, :data:`OPERATE`, :data:`ADMIN` (as a dependency, or
through the :data:`Reader`, :data:`Operator`, :data:`Administrator` parameter types, which hand the handler the
:class:`Caller` to write audit entries with). No or an unknown token is a 401, a token without the scope a 403
(also written to the audit log).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, Request

from . import audit
from .context import get_ctx
from .db import Database
from .errors import APIError, bad_request, conflict, unauthorized
from .models import api_tokens
from .timeutil import now, rfc3339

SCOPES = ("read", "operate", "admin")
RANK = {s: i for i, s in enumerate(SCOPES)}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
BOOTSTRAP = "bootstrap"
MIN_BOOTSTRAP_LEN = 32
PREFIX = "vvota_"
MAX_TOKEN_LEN = 512
TOKEN_SQL = "SELECT name, scope, token_hash FROM api_tokens WHERE id = ?"
NAME_SQL = "SELECT scope, token_hash FROM api_tokens WHERE name = ?"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a token is: its name and scope, and the hash of the very token (dashboard sessions are bound to it,
    so revoking the token, or replacing it under the same name, ends them)."""

    name: str
    scope: str
    token_hash: str

    def allows(self, scope: str) -> bool:
        return RANK[self.scope] >= RANK[scope]


@dataclass(frozen=True)
class Caller:
    """The principal of one management request, with the request's method and path for the audit log."""

    principal: Principal
    method: str
    path: str

    @property
    def name(self) -> str:
        return self.principal.name

    def record(self, c: sa.Connection, summary: str) -> None:
        """Write the audit entry of this request's change (inside the change's transaction)."""
        audit.record(c, self.principal.name, self.method, self.path, summary)


def check_bootstrap_token(token: str, source: str) -> str:
    """The bootstrap admin token, stripped.

    Raises:
        ValueError: it is shorter than :data:`MIN_BOOTSTRAP_LEN` characters (``source`` names where it came from).
    """
    token = token.strip()
    if len(token) < MIN_BOOTSTRAP_LEN:
        raise ValueError(f"{source} must hold at least {MIN_BOOTSTRAP_LEN} characters (it has {len(token)}): "
                         "generate one with `openssl rand -hex 24`, or use named tokens "
                         "(`build.py server token create`)")
    return token


def find_principal(db: Database, token: str, bootstrap_hash: str | None) -> Principal | None:
    """The principal of a presented token, or None (unknown, revoked or malformed)."""
    if not token or len(token) > MAX_TOKEN_LEN:
        return None
    digest = hash_token(token)
    if bootstrap_hash is not None and hmac.compare_digest(digest, bootstrap_hash):
        return Principal(BOOTSTRAP, "admin", bootstrap_hash)
    if not token.startswith(PREFIX):
        return None
    key_id, _, secret = token[len(PREFIX):].partition("_")
    if len(key_id) != 16 or not secret or any(ch not in "0123456789abcdef" for ch in key_id):
        return None
    rows = db.fetch(TOKEN_SQL, (key_id,))
    if not rows or not hmac.compare_digest(digest, rows[0][2]):
        return None
    return Principal(rows[0][0], rows[0][1], rows[0][2])


def principal_named(db: Database, name: str, bootstrap_hash: str | None) -> Principal | None:
    """The current principal of a name (for dashboard sessions), or None when no such token exists."""
    if name == BOOTSTRAP:
        return Principal(BOOTSTRAP, "admin", bootstrap_hash) if bootstrap_hash else None
    rows = db.fetch(NAME_SQL, (name,))
    return Principal(name, rows[0][0], rows[0][1]) if rows else None


def bearer_principal(request: Request) -> Principal:
    """The principal of the request's ``Authorization: Bearer`` token (remembered for the request).

    Raises:
        APIError: 401 when there is no Bearer token or it is unknown, revoked or malformed.
    """
    known = getattr(request.state, "principal", None)
    if isinstance(known, Principal):
        return known
    authorization = request.headers.get("authorization")
    if not authorization or not authorization.startswith("Bearer "):
        raise unauthorized("missing API token (Authorization: Bearer ...)")
    ctx = get_ctx(request)
    found = find_principal(ctx.db, authorization[7:].strip(), ctx.settings.admin_token_sha256)
    if found is None:
        raise unauthorized("invalid or revoked API token")
    request.state.principal = found
    return found


def authorize(request: Request, scope: str) -> Caller:
    """The caller of a request that needs ``scope``.

    Raises:
        APIError: 401 without a valid token, 403 (written to the audit log) for a token without ``scope``.
    """
    who = bearer_principal(request)
    if not who.allows(scope):
        ctx = get_ctx(request)
        with ctx.db.write() as c:
            audit.record(c, who.name, request.method, request.url.path, f"refused: needs scope {scope}")
        raise APIError(403, f"the token {who.name!r} has scope {who.scope!r}; {request.method} "
                            f"{request.url.path} needs {scope!r}")
    return Caller(who, request.method, request.url.path)


class RequireScope:
    """A dependency: the request needs a token with this scope (see the module docstring)."""

    def __init__(self, scope: str) -> None:
        if scope not in RANK:
            raise ValueError(f"unknown scope {scope!r}")
        self.scope = scope

    async def __call__(self, request: Request) -> Caller:
        return authorize(request, self.scope)

    def __repr__(self) -> str:
        return f"RequireScope({self.scope!r})"


READ = RequireScope("read")
OPERATE = RequireScope("operate")
ADMIN = RequireScope("admin")
Reader = Annotated[Caller, Depends(READ)]
Operator = Annotated[Caller, Depends(OPERATE)]
Administrator = Annotated[Caller, Depends(ADMIN)]


def route_scope(dependencies: Any) -> str | None:
    """The highest scope among a route's (FastAPI ``Dependant``) dependencies, or None if it declares none."""
    found = [d.call.scope for d in dependencies if isinstance(d.call, RequireScope)]
    return max(found, key=RANK.__getitem__) if found else None


# ---------------------------------------------------------------------------------------------------------
# Stored tokens (the CLI and the management API)


def check_name(name: str) -> str:
    """Raises: APIError 400 for a name that is not 1-64 of ``A-Z a-z 0-9 _ -`` or is ``bootstrap``."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise bad_request(f"invalid token name {name!r}: 1-64 characters A-Z a-z 0-9 _ - (not starting with _ or -)")
    if name == BOOTSTRAP:
        raise bad_request(f"{BOOTSTRAP!r} is the name of the bootstrap admin token (OTA_ADMIN_TOKEN)")
    return name


def create_token(c: sa.Connection, name: str, scope: str, created_by: str) -> str:
    """Store a new token and return it (the only time it is seen in full).

    Raises:
        APIError: 400 for a bad name or scope, 409 if a token of that name exists.
    """
    check_name(name)
    if scope not in RANK:
        raise bad_request(f"unknown scope {scope!r}: one of {', '.join(SCOPES)}")
    if c.execute(sa.select(api_tokens.c.id).where(api_tokens.c.name == name)).first() is not None:
        raise conflict(f"a token named {name!r} exists: revoke it first, or choose another name")
    key_id = secrets.token_hex(8)
    token = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    c.execute(api_tokens.insert().values(id=key_id, name=name, scope=scope, token_hash=hash_token(token),
                                         created=now(), created_by=audit.clip(created_by, 128)))
    return token


def list_tokens(c: sa.Connection) -> list[dict[str, Any]]:
    """Every stored token (never the token or its hash), by name."""
    return [{"name": r.name, "scope": r.scope, "id": r.id, "created": rfc3339(r.created), "created_by": r.created_by}
            for r in c.execute(sa.select(api_tokens).order_by(api_tokens.c.name))]


def revoke_token(c: sa.Connection, name: str) -> str:
    """Delete a token (it stops working at its next request, on every worker); returns its scope.

    Raises:
        APIError: 400 for the bootstrap token (it is not stored: change it where it is configured), 404 for an
            unknown name.
    """
    if name == BOOTSTRAP:
        raise bad_request("the bootstrap token is not stored: change OTA_ADMIN_TOKEN (or --admin-token-file) "
                          "and restart the server")
    row = c.execute(sa.select(api_tokens.c.scope).where(api_tokens.c.name == name)).first()
    if row is None:
        raise APIError(404, f"no token named {name!r}")
    c.execute(sa.delete(api_tokens).where(api_tokens.c.name == name))
    return str(row.scope)
