"""Signed, expiring download links and the Range-capable file response that serves artifacts.

A link is ``/api/devices/v1/download/{artifact_id}?expires=<epoch>&sig=<hex HMAC-SHA256>``; the HMAC covers
the artifact id and the expiry, keyed with the server's link key (shared by every worker through the storage
directory). The link needs no Authorization header, so any HTTP cache or CDN can serve it.

A rollback deployment (ota_server/rollback.py) also hands our agent a link to the artifact's signed header part
alone, ``/api/devices/v1/download/{artifact_id}/header?expires=...&sig=...``: its HMAC covers ``header``, the id
and the expiry, so neither kind of link can be turned into the other.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Mapping
from urllib.parse import urlencode

from starlette.responses import FileResponse, MalformedRangeHeader
from starlette.types import Message, Receive, Scope, Send

from .errors import APIError

DOWNLOAD_PATH = "/api/devices/v1/download/"
HEADER_SUFFIX = "/header"
#: ``deployments.kind`` of a rollback deployment, and the field of ``next`` that carries its hint
ROLLBACK = "rollback"
HINT = "vv_rollback"
#: what a link's query values look like (``str.isdigit`` and ``int`` also take other scripts' digits; hex
#: digits compared as bytes: ``hmac.compare_digest`` raises TypeError on a non-ASCII str)
EXPIRES_RE = re.compile(r"[0-9]{1,15}")
SIG_RE = re.compile(r"[0-9a-fA-F]{64}")


class LinkSigner:
    def __init__(self, key: bytes, ttl: int) -> None:
        self._key = key
        self.ttl = ttl

    def _mac(self, artifact_id: str, expires: int, part: str = "") -> str:
        message = f"{part}\n{artifact_id}\n{expires}" if part else f"{artifact_id}\n{expires}"
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def link(self, base_url: str, artifact_id: str, now: float | None = None, *, part: str = "") -> tuple[str, int]:
        """A link to the artifact, or with ``part="header"`` to its signed header part only."""
        expires = int(now if now is not None else time.time()) + self.ttl
        return self.url(base_url, artifact_id, expires, part=part), expires

    def url(self, base_url: str, artifact_id: str, expires: int, *, part: str = "") -> str:
        """The signed link to the artifact (or, with ``part="header"``, to its signed header part only), valid
        until ``expires`` (epoch seconds)."""
        query = urlencode({"expires": expires, "sig": self._mac(artifact_id, expires, part)})
        suffix = f"/{part}" if part else ""
        return f"{base_url.rstrip('/')}{DOWNLOAD_PATH}{artifact_id}{suffix}?{query}"

    def check(self, artifact_id: str, expires: str | None, sig: str | None, *, part: str = "") -> None:
        """Accept a link made by :meth:`link` that has not expired. The query values come from anyone: they
        are checked for shape (ASCII digits, 64 hex digits) before anything is computed with them.

        Raises:
            APIError: 403 for a missing, malformed, wrong or expired signature.
        """
        if not expires or not sig:
            raise APIError(403, "download link is not signed (expires and sig are required)")
        if not EXPIRES_RE.fullmatch(expires):
            raise APIError(403, "download link has an invalid expiry")
        if not SIG_RE.fullmatch(sig):
            raise APIError(403, "download link signature is invalid")
        exp = int(expires)
        if not hmac.compare_digest(self._mac(artifact_id, exp, part).encode(), sig.lower().encode()):
            raise APIError(403, "download link signature is invalid")
        if exp < time.time():
            raise APIError(403, "download link expired; ask for the deployment again to get a fresh one")


def rollback_hint(links: LinkSigner, base_url: str, artifact_id: str, now: float) -> dict[str, str]:
    """The extra field of ``next`` in a rollback deployment: where our agent gets the artifact's signed header,
    to check the inactive slot it kept against it instead of downloading the artifact again."""
    uri, _ = links.link(base_url, artifact_id, now, part="header")
    return {"header_uri": uri}


class ArtifactFileResponse(FileResponse):
    """Starlette's file response (streams from disk, single and multiple ranges, 416 with ``bytes */size``,
    ``If-Range``), made lenient the way RFC 9110 asks: a malformed Range header is ignored (200, whole
    file) instead of answered with 400, and several ranges are served as the whole file."""

    def __init__(self, path: str | os.PathLike[str], sha256: str, filename: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(path, media_type="application/vnd.mender-artifact", filename=filename, headers=headers)
        self.headers["etag"] = f'"{sha256}"'

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Starlette answers an unsatisfiable range with an empty text/plain 416: send our JSON error."""
        replaced = False

        async def json_416(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 416:
                replaced = True
                size = dict(message["headers"]).get(b"content-range", b"bytes */?").decode("latin-1")[8:]
                body = json.dumps({"error": f"range not satisfiable: the artifact has {size} bytes"}).encode()
                headers = [(k, v) for k, v in message["headers"] if k not in (b"content-type", b"content-length")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({**message, "headers": headers})
                await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
            elif not replaced:
                await send(message)

        await super().__call__(scope, receive, json_416)

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            ranges = super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []
        return ranges if len(ranges) == 1 else []
