"""The fleet dashboard: server-rendered HTML pages under ``/ui/`` (jinja2, autoescaped, no JavaScript).

Authentication uses the API tokens of the management API (any scope: every token can read; the audit page needs
``admin``; the bootstrap admin token is the token named ``bootstrap``), in one of three ways:

- ``Authorization: Bearer <token>`` on any page (for scripts and proxies);
- the login form (``POST /ui/login``): the token's hash is compared in constant time and the browser receives a
  session cookie ``ota_session`` (HttpOnly, SameSite=Strict, Path=/ui, Secure when served over https,
  12 hours). Its value is ``s2.<token name>.<expiry>.<HMAC-SHA256>``, keyed with a key derived from the server
  secrets and bound to the SHA-256 of the very token that logged in: the server keeps no session state, every
  worker process accepts it, and revoking the token (or changing the bootstrap token) ends its sessions at their
  next page. Logging out deletes the cookie in the browser (a copied cookie stays valid until it expires or
  the token is revoked);
- a short-lived login link (reusable for its 60 seconds, not single-use): ``POST /ui/login-link`` (Bearer
  token) answers a URL ``/ui/login/ticket?t=...`` valid for 60 seconds that sets a session cookie of the same
  token and redirects. It lets a tool hand a browser a session without putting the token itself into a URL
  (history, proxy logs); the Chromium test uses it.

Without credentials a page answers ``303`` to ``/ui/login?next=<page>``; a wrong Bearer token is a ``401``.
Every page is sent with a strict Content-Security-Policy (no scripts at all, styles only from ``/ui/static``),
``X-Frame-Options: DENY``, ``Referrer-Policy: same-origin`` and ``Cache-Control: no-store``: device-supplied
strings (identity, inventory, substates, logs) are escaped by jinja2's autoescape, and even a bug there could
not run a script. (``same-origin``, not ``no-referrer``: under ``no-referrer`` browsers send ``Origin: null``
with a form POST, and the actions of :mod:`.dashboard_actions` check the ``Origin``; other sites still get no
referrer.)

Tokens with scope ``operate`` also get the forms of :mod:`.dashboard_actions`: each carries a CSRF token
(:func:`csrf_token`), and the page after the action shows a one-line flash message (:func:`flash_cookie`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from . import audit
from . import dashboard_queries as q
from .apitokens import READ, Principal, Reader, bearer_principal, find_principal, principal_named
from .configvars import SECRET_MASK
from .context import ServerContext, get_ctx
from .deployments import OPEN
from .errors import APIError
from .management import get_device_config
from .models import artifacts as art_t
from .models import deployment_devices as dd
from .models import deployments as dep
from .models import devices

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
SESSION_COOKIE = "ota_session"
FLASH_COOKIE = "ota_flash"
FLASH_MAX = 400
SESSION_TTL = 12 * 3600
TICKET_TTL = 60
LOGIN = "/ui/login"
DEPLOYMENTS_PER_PAGE = 50
AUDIT_PER_PAGE = 100
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Ctx = Annotated[ServerContext, Depends(get_ctx)]
PageNo = Annotated[int, Query(ge=1, le=1_000_000)]


# ---------------------------------------------------------------------------------------------------------
# Sessions


def _mac(key: bytes, kind: str, name: str, expires: int, token_hash: str) -> str:
    digest = hmac.new(key, f"{kind}.{name}.{expires}.{token_hash}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def issue(key: bytes, kind: str, who: Principal, ttl: int, now: float | None = None) -> str:
    """A signed value ``<kind>.<token name>.<expiry>.<mac>`` bound to the token's hash: ``s2`` for session
    cookies, ``t2`` for login tickets."""
    expires = int(now if now is not None else time.time()) + ttl
    return f"{kind}.{who.name}.{expires}.{_mac(key, kind, who.name, expires, who.token_hash)}"


def verify(ctx: ServerContext, kind: str, value: str | None, now: float | None = None) -> Principal | None:
    """The principal of a valid, unexpired session or ticket whose token still exists unchanged, else None."""
    if not value or len(value) > 160:
        return None
    parts = value.split(".")
    if len(parts) != 4 or parts[0] != kind or not parts[2].isdigit() or len(parts[2]) > 12:
        return None
    expires = int(parts[2])
    if expires < (now if now is not None else time.time()):
        return None
    who = principal_named(ctx.db, parts[1], ctx.settings.admin_token_sha256)
    if who is None:
        return None
    good = _mac(ctx.session_key, kind, who.name, expires, who.token_hash)
    return who if hmac.compare_digest(parts[3].encode(), good.encode()) else None


def viewer(request: Request) -> Principal | None:
    """Who is looking: a valid Bearer token or session cookie, else None.

    Raises:
        APIError: 401 for a *wrong* Bearer token.
    """
    if request.headers.get("authorization"):
        return bearer_principal(request)
    return verify(get_ctx(request), "s2", request.cookies.get(SESSION_COOKIE))


def safe_next(value: str | None) -> str:
    """Only a dashboard path of this server is a redirect target (no open redirect)."""
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value \
            and all(32 < ord(ch) < 127 for ch in value):
        return value
    return "/ui/"


async def require_session(request: Request) -> Principal:
    """The viewer of a page (every token may read the dashboard).

    Raises:
        APIError: 303 to the login form without credentials, 401 for a wrong Bearer token.
    """
    who = viewer(request)
    if who is None:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise APIError(303, "login required", {"Location": f"{LOGIN}?{urlencode({'next': here})}"})
    return who


Viewer = Annotated[Principal, Depends(require_session)]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def csrf_token(ctx: ServerContext, request: Request) -> str:
    """The CSRF token of the request's credentials: an HMAC (the session key, domain-separated) over the session
    cookie's value, or over the hash of the Bearer token when one is used. Per session (a new login, or another
    token, gets another one), stateless like the session itself, and unknown to other sites: they can neither
    read the page that holds it nor compute it."""
    if request.headers.get("authorization"):
        basis = "bearer." + bearer_principal(request).token_hash
    else:
        basis = "session." + (request.cookies.get(SESSION_COOKIE) or "")
    return _b64(hmac.new(ctx.session_key, f"csrf1.{basis}".encode(), hashlib.sha256).digest())


def flash_cookie(ctx: ServerContext, ok: bool, message: str) -> str:
    """The value of the flash cookie that the page after an action shows once: ``f1.<base64 JSON>.<HMAC>``,
    signed so that nothing but the server puts text on its pages."""
    text = " ".join(message.split())
    text = text if len(text) <= FLASH_MAX else text[:FLASH_MAX - 1] + "…"
    payload = _b64(json.dumps([bool(ok), text]).encode())
    return f"f1.{payload}.{_b64(hmac.new(ctx.session_key, f'f1.{payload}'.encode(), hashlib.sha256).digest())}"


def read_flash(ctx: ServerContext, request: Request) -> dict[str, Any] | None:
    """The flash message of the request's cookie (``{"ok": bool, "text": str}``), or None (none, or not ours)."""
    value = request.cookies.get(FLASH_COOKIE)
    if not value or len(value) > 4 * FLASH_MAX:
        return None
    parts = value.split(".")
    if len(parts) != 3 or parts[0] != "f1":
        return None
    good = _b64(hmac.new(ctx.session_key, f"f1.{parts[1]}".encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(parts[2].encode(), good.encode()):
        return None
    try:
        ok, text = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return None
    return {"ok": bool(ok), "text": str(text)}


def _session_response(request: Request, ctx: ServerContext, who: Principal, target: str, how: str) -> Response:
    resp = RedirectResponse(safe_next(target), status_code=303)
    secure = request.url.scheme == "https" or (ctx.settings.public_url or "").startswith("https://")
    resp.set_cookie(SESSION_COOKIE, issue(ctx.session_key, "s2", who, SESSION_TTL), max_age=SESSION_TTL,
                    path="/ui", httponly=True, samesite="strict", secure=secure)
    resp.headers.update(SECURITY_HEADERS)
    with ctx.db.write() as c:
        audit.record(c, who.name, request.method, request.url.path, f"dashboard login ({how})")
    return resp


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    delta = now - float(ts)
    future = delta < 0
    delta = abs(delta)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= size:
            text = f"{int(delta // size)} {unit}"
            break
    else:
        text = f"{int(delta)} s"
    return f"in {text}" if future else f"{text} ago"


def _duration(seconds: float) -> str:
    """``3 h``, ``90 min``, ``45 s``: the largest unit that divides the duration."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _identity(identity: dict[str, Any], limit: int = 90) -> str:
    text = ", ".join(f"{k}={v}" for k, v in sorted(identity.items()))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _query(**params: Any) -> str:
    """``?a=1&b=2`` from the non-None parameters (values are URL-encoded; jinja2 escapes the result)."""
    kept = {k: v for k, v in params.items() if v is not None}
    return "?" + urlencode(kept) if kept else "?"


def _page_link(params: dict[str, Any], key: str, n: int) -> str:
    return _query(**{**params, key: n})


def _inconsistent(name: Any) -> bool:
    return isinstance(name, str) and name.endswith(q.INCONSISTENT)


def _value(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                         undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
ENV.filters.update(when=_when, size=_size, identity=_identity, value=_value)
ENV.globals.update(query=_query, page_link=_page_link, inconsistent=_inconsistent, INCONSISTENT=q.INCONSISTENT,
                   SECRET_MASK=SECRET_MASK)
ENV.tests["inconsistent"] = _inconsistent


def render(template: str, status: int = 200, request: Request | None = None, **context: Any) -> HTMLResponse:
    """The page; with ``request``, also the flash message of the last action (shown once: the cookie is
    deleted) and, for a viewer who may act (scope ``operate``), the CSRF token of the forms."""
    now = time.time()
    context.setdefault("refresh", None)
    context.setdefault("logged_in", True)
    context.setdefault("viewer", None)
    flash = None
    if request is not None:
        ctx = get_ctx(request)
        flash = read_flash(ctx, request)
        who = context["viewer"]
        if isinstance(who, Principal) and who.allows("operate"):
            context.setdefault("csrf", csrf_token(ctx, request))
    context.setdefault("csrf", None)
    html = ENV.get_template(template).render(now=now, ago=lambda ts: _ago(ts, now), flash=flash, **context)
    resp = HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
    if request is not None and FLASH_COOKIE in request.cookies:
        resp.delete_cookie(FLASH_COOKIE, path="/ui", httponly=True, samesite="strict")
    return resp


# ---------------------------------------------------------------------------------------------------------
# Public routes: redirects, login, logout, static files

public = APIRouter(include_in_schema=False)


@public.get("/")
def root() -> Response:
    return RedirectResponse("/ui/", status_code=302)


@public.get("/ui")
def ui_root() -> Response:
    return RedirectResponse("/ui/", status_code=302)


@public.get("/ui/static/dashboard.css")
def stylesheet() -> Response:
    return Response((STATIC / "dashboard.css").read_bytes(), media_type="text/css",
                    headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})


@public.get(LOGIN)
def login_form(request: Request, next: str | None = None) -> Response:
    target = safe_next(next)
    try:
        if viewer(request) is not None:
            return RedirectResponse(target, status_code=303)
    except APIError:
        pass
    return render("login.html", next=target, error=None, logged_in=False)


@public.post(LOGIN)
async def login(request: Request) -> Response:
    ctx = get_ctx(request)
    form = await request.form()
    token, target = form.get("token"), form.get("next")
    target = safe_next(target if isinstance(target, str) else None)
    who = find_principal(ctx.db, token.strip(), ctx.settings.admin_token_sha256) if isinstance(token, str) else None
    if who is None:
        return render("login.html", status=401, next=target, logged_in=False,
                      error="Wrong token: neither the admin token nor a valid API token.")
    return _session_response(request, ctx, who, target, "form")


@public.post("/ui/logout")
def logout() -> Response:
    resp = RedirectResponse(LOGIN, status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/ui", httponly=True, samesite="strict")
    resp.headers.update(SECURITY_HEADERS)
    return resp


@public.get("/ui/login/ticket")
def login_ticket(request: Request, ctx: Ctx, t: str | None = None, next: str | None = None) -> Response:
    who = verify(ctx, "t2", t)
    if who is None:
        return render("login.html", status=401, next=safe_next(next), logged_in=False,
                      error="This login link is invalid or has expired: log in with a token.")
    return _session_response(request, ctx, who, safe_next(next), "login link")


api = APIRouter(dependencies=[Depends(READ)], tags=["dashboard"])


@api.post("/ui/login-link")
def login_link(ctx: Ctx, who: Reader, next: Annotated[str | None, Query(max_length=2048)] = None) -> dict[str, Any]:
    """A dashboard login link valid for 60 seconds (``url`` is relative to the server): it sets a session
    cookie (of the token that asked) in the browser that opens it and redirects to ``next`` (a ``/ui/`` path), so
    that the token itself never travels in a URL."""
    params = {"t": issue(ctx.session_key, "t2", who.principal, TICKET_TTL), "next": safe_next(next)}
    return {"url": f"/ui/login/ticket?{urlencode(params)}", "expires_in": TICKET_TTL}


# ---------------------------------------------------------------------------------------------------------
# Pages (session or Bearer token required)

pages = APIRouter(dependencies=[Depends(require_session)], include_in_schema=False)


@pages.get("/ui/")
def overview(request: Request, ctx: Ctx, who: Viewer, page: PageNo = 1,
             status: Annotated[str | None, Query(pattern="^(pending|accepted|rejected|preauthorized)$")] = None,
             group: Annotated[str | None, Query(max_length=64)] = None,
             artifact: Annotated[str | None, Query(max_length=256)] = None,
             stale: bool | None = None) -> Response:
    cutoff = time.time() - ctx.settings.stale_after
    flt = q.DeviceFilter(status=status, group=group, artifact=artifact, stale=stale, cutoff=cutoff)
    with ctx.db.read() as c:
        counts = q.fleet_counts(c, cutoff)
        total, rows = q.device_rows(c, flt, page)
        deployments_total, recent = q.deployment_rows(c)
    # the pending list has ticks for an operator: no refresh that would drop them
    ticks = status == "pending" and who.allows("operate")
    return render("overview.html", request=request, viewer=who, refresh=None if ticks else 30, counts=counts, devices=rows, filter=flt, page=page,
                  stale_after=_duration(ctx.settings.stale_after),
                  pages=max(1, math.ceil(total / q.PER_PAGE)), matching=total, per_page=q.PER_PAGE,
                  deployments=recent, deployments_total=deployments_total)


@pages.get("/ui/deployments")
def deployment_list(request: Request, ctx: Ctx, who: Viewer, page: PageNo = 1) -> Response:
    with ctx.db.read() as c:
        total, rows = q.deployment_rows(c, page, DEPLOYMENTS_PER_PAGE)
    return render("deployments.html", request=request, viewer=who, deployments=rows, page=page,
                  pages=max(1, math.ceil(total / DEPLOYMENTS_PER_PAGE)), total=total)


@pages.get("/ui/devices/{device_id}")
def device_page(request: Request, device_id: str, ctx: Ctx, who: Viewer) -> Response:
    with ctx.db.read() as c:
        d = q.device_detail(c, device_id, time.time() - ctx.settings.stale_after)
    if d is None:
        return render("not_found.html", status=404, request=request, viewer=who, what="device", ident=device_id)
    return render("device.html", request=request, viewer=who, d=d, stale_after=_duration(ctx.settings.stale_after),
                  config=get_device_config(device_id, ctx))


def rollback_preview(c: Any, deployment_id: str) -> dict[str, Any]:
    """What "roll back" would do, in one aggregate (a page must not read a row per device of a big deployment):
    how many devices go back to which artifact; the exact plan, with each skipped device's reason, is made by
    ``POST .../rollback`` (:func:`ota_server.rollback.plan`)."""
    went = sa.func.coalesce(dd.c.target_artifact, dep.c.artifact_name)
    rows = c.execute(
        sa.select(dd.c.from_artifact, went.label("went"), sa.func.count().label("n"))
        .select_from(dd.join(dep, dep.c.id == dd.c.deployment_id).join(devices, devices.c.id == dd.c.device_id))
        .where(dd.c.deployment_id == deployment_id, dd.c.status == "success", devices.c.status == "accepted")
        .group_by(dd.c.from_artifact, went)).all()
    names = sorted({r.from_artifact for r in rows if r.from_artifact})
    uploaded = set(c.execute(sa.select(art_t.c.name).where(art_t.c.name.in_(names))).scalars()) if names else set()
    counts: dict[str, int] = {}
    skipped = 0
    for r in rows:
        if r.from_artifact and r.from_artifact != r.went and r.from_artifact in uploaded:
            counts[r.from_artifact] = counts.get(r.from_artifact, 0) + int(r.n)
        else:
            skipped += int(r.n)
    return {"count": sum(counts.values()), "targets": sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])),
            "skipped": skipped}


@pages.get("/ui/deployments/{deployment_id}")
def deployment_page(request: Request, deployment_id: str, ctx: Ctx, who: Viewer, failures_page: PageNo = 1
                    ) -> Response:
    with ctx.db.read() as c:
        d = q.deployment_detail(c, deployment_id, failures_page, time.time())
        rollback = rollback_preview(c, deployment_id) if who.allows("operate") else None
    if d is None:
        return render("not_found.html", status=404, request=request, viewer=who, what="deployment",
                      ident=deployment_id)
    open_ = d["row"].status in OPEN
    return render("deployment.html", request=request, viewer=who, d=d, refresh=15 if open_ else None, rollback=rollback,
                  failures_page=failures_page,
                  failures_pages=max(1, math.ceil(d["failures_total"] / q.FAILURES_PER_PAGE)))


@pages.get("/ui/deployments/{deployment_id}/devices/{device_id}/log")
def log_page(deployment_id: str, device_id: str, ctx: Ctx, who: Viewer) -> Response:
    with ctx.db.read() as c:
        row = q.deployment_device(c, deployment_id, device_id)
        messages, dropped = q.log_messages(c, deployment_id, device_id) if row is not None else ([], 0)
    if row is None:
        return render("not_found.html", status=404, viewer=who, what="device in this deployment", ident=device_id)
    return render("log.html", viewer=who, row=row, identity=q.identity_of(row.identity_json), messages=messages, dropped=dropped)


@pages.get("/ui/audit")
def audit_page(ctx: Ctx, who: Viewer, before: Annotated[int | None, Query(ge=1, le=2**62)] = None) -> Response:
    """The audit log, newest first, ``AUDIT_PER_PAGE`` entries a page (``before``: older than that entry)."""
    if not who.allows("admin"):
        return render("forbidden.html", status=403, viewer=who, scope="admin")
    with ctx.db.read() as c:
        entries = audit.entries(c, AUDIT_PER_PAGE + 1, before)
    more = len(entries) > AUDIT_PER_PAGE
    entries = entries[:AUDIT_PER_PAGE]
    return render("audit.html", viewer=who, entries=entries, before=before,
                  older=entries[-1]["id"] if more and entries else None)


router = APIRouter()
router.include_router(public)
router.include_router(api)
router.include_router(pages)
