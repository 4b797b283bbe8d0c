"""Strict grammars for everything the server and the network hand the agent that no signature covers.

The update server is not trusted (DESIGN.md section 6). Before an unsigned value reaches a path, a shell, an
environment or a boot decision it is checked here: deployment ids, artifact names, download URLs (scheme,
host, redirects) and paths derived from them. Each check raises :class:`UntrustedInput` naming the field and
why, so the refusal can be reported.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from pathlib import Path

from ota_common.errors import OTAError

#: Mender's deployment ids are UUIDs
DEPLOYMENT_ID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
#: ids the agent makes itself for ``ota-agent install`` (never accepted from the server)
LOCAL_ID = re.compile(r"^local-[0-9]{1,20}$")
#: an artifact name: printable, no path separators, at most 256 characters
ARTIFACT_NAME = re.compile(r"^[^\x00-\x1f\x7f/\\]{1,256}$")
MAX_URL = 8192


class UntrustedInput(OTAError):
    """A value from the server or the network does not match its grammar; nothing was done with it."""


def deployment_id(value: object, *, local_ok: bool = False) -> str:
    """A deployment id from the server (a UUID), or with ``local_ok`` one of the agent's own local ids."""
    if not isinstance(value, str):
        raise UntrustedInput(f"deployment id must be a string, got {type(value).__name__}")
    if DEPLOYMENT_ID.match(value) or (local_ok and LOCAL_ID.match(value)):
        return value
    raise UntrustedInput(f"deployment id {value[:80]!r} is not a UUID")


def artifact_name(value: object) -> str:
    if not isinstance(value, str) or not ARTIFACT_NAME.match(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise UntrustedInput(f"artifact name {shown!r} is not printable text of 1 to 256 characters without '/'")
    return value


def host_class(host: str) -> str:
    """``loopback``, ``private`` (RFC 1918, ULA, link-local, CGNAT) or ``public``; names count as ``public``
    except ``localhost``."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return "loopback"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        # a name; but numbers the resolver takes as addresses in other forms (127.1, 2130706433, 0x7f.1) are
        # not names: refused rather than classed public
        if re.fullmatch(r"[0-9.]+|0[xX][0-9a-fA-F.]+|[0-9a-fA-FxX.]*\.[0-9]+", host):
            return "invalid"
        return "public"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved or (ip.version == 4 and ip.packed[0] == 0):
        return "invalid"
    if ip.is_loopback:
        return "loopback"
    if ip.is_private or ip.is_link_local or (ip.version == 4 and ip in ipaddress.ip_network("100.64.0.0/10")):
        return "private"
    return "public"


def url(value: object, *, what: str, allow_http: bool) -> str:
    """An ``https`` URL (``http`` too with ``allow_http``) with a host, no user info, no control characters."""
    if not isinstance(value, str):
        raise UntrustedInput(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > MAX_URL or re.search(r"[\x00-\x20\x7f]", value):
        raise UntrustedInput(f"{what} is too long or contains spaces or control characters")
    parts = urllib.parse.urlsplit(value)
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        allowed = " or ".join(schemes)
        raise UntrustedInput(f"{what} {value[:80]!r}: scheme {parts.scheme or '(none)'!r} refused (only {allowed})")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise UntrustedInput(f"{what} {value[:80]!r}: needs a host and no user info")
    if host_class(parts.hostname) == "invalid":
        raise UntrustedInput(f"{what} {value[:80]!r}: host {parts.hostname} is not a usable address")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise UntrustedInput(f"{what} {value[:80]!r}: bad port") from None
    return value


def redirect(origin: str, target: str, *, allow_http: bool) -> str:
    """A redirect from ``origin`` to ``target`` is followed only to a valid URL of the same scheme and the same
    host class (a public server cannot send the agent to a loopback or private address, nor from https to
    http)."""
    url(target, what="redirect target", allow_http=allow_http)
    a, b = urllib.parse.urlsplit(origin), urllib.parse.urlsplit(target)
    if a.scheme != b.scheme:
        raise UntrustedInput(f"redirect from {a.scheme} to {b.scheme} refused ({target[:80]!r})")
    if host_class(a.hostname or "") != host_class(b.hostname or ""):
        raise UntrustedInput(f"redirect from a {host_class(a.hostname or '')} host to a "
                             f"{host_class(b.hostname or '')} host refused ({target[:80]!r})")
    return target


def under(base: Path, *parts: str) -> Path:
    """``base/parts...``, checked to stay inside ``base`` (each part one plain name: no separators, no
    ``..``, not empty), also after symlinks are resolved."""
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
            raise UntrustedInput(f"path component {part[:80]!r} is not a plain name")
    path = base.joinpath(*parts)
    root = base.resolve()
    if not path.resolve().is_relative_to(root):
        raise UntrustedInput(f"{path} resolves outside {base}")
    return path


__all__ = ["UntrustedInput", "artifact_name", "deployment_id", "host_class", "redirect", "under", "url"]
