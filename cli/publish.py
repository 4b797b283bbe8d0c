"""Upload artifacts to the update server's management API (``build.py publish``, ``release --publish``).

The artifact is streamed (never read into memory) as the ``artifact`` field of a multipart/form-data POST to
``/api/management/v1/deployments/artifacts``, authenticated with ``OTA_ADMIN_TOKEN``."""

from __future__ import annotations

import http.client
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import click

from ota_common.errors import DownloadError, OTAError, UserError

ARTIFACTS_PATH = "/api/management/v1/deployments/artifacts"
TOKEN_ENV = "OTA_ADMIN_TOKEN"
CHUNK = 1 << 20


class PublishError(OTAError):
    """The server refused an artifact (its message says why)."""

    exit_code = 1


def admin_token() -> str:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UserError(f"publishing needs the server's admin token in ${TOKEN_ENV}")
    return token


def check_url(url: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"the publish URL must be http(s)://HOST[:PORT][/PREFIX], not {url!r}")
    return parts.scheme, parts.hostname, parts.port, parts.path.rstrip("/")


def _connection(scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
    if scheme == "https":
        return http.client.HTTPSConnection(host, port, timeout=600)
    return http.client.HTTPConnection(host, port, timeout=600)


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()[:300] or "no details"


def _request(url: str, method: str, path: str, token: str, body_parts: Sequence[bytes | Path] = (),
             content_type: str | None = None) -> tuple[int, dict[str, str], bytes]:
    scheme, host, port, prefix = check_url(url)
    conn = _connection(scheme, host, port)
    try:
        length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in body_parts)
        conn.putrequest(method, prefix + path)
        conn.putheader("Authorization", f"Bearer {token}")
        if body_parts:
            conn.putheader("Content-Type", content_type or "application/octet-stream")
            conn.putheader("Content-Length", str(length))
        conn.endheaders()
        try:
            for part in body_parts:
                if isinstance(part, Path):
                    with open(part, "rb") as f:
                        while chunk := f.read(CHUNK):
                            conn.send(chunk)
                else:
                    conn.send(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (and closed); its answer says why
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"cannot reach the update server at {url}: {e}") from None
    finally:
        conn.close()


def check_server(url: str, token: str) -> None:
    """The server answers and takes the token (checked before a long build or upload)."""
    status, _, body = _request(url, "GET", ARTIFACTS_PATH + "?name=-", token)
    if status == 401:
        raise UserError(f"the update server at {url} refused the admin token (${TOKEN_ENV})")
    if status != 200:
        raise PublishError(f"{url} does not look like the update server (HTTP {status}: {_error_message(body)})")


def publish(url: str, artifacts: Sequence[Path], token: str | None = None,
            progress: Callable[[str], None] | None = None) -> list[str]:
    """Upload each artifact; returns the server's artifact URLs (``Location``). Raises on the first refusal."""
    token = token or admin_token()
    check_server(url, token)
    locations = []
    for path in artifacts:
        boundary = uuid.uuid4().hex
        name = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        pre = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"artifact\"; filename=\"{name}\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        post = f"\r\n--{boundary}--\r\n".encode()
        status, headers, body = _request(url, "POST", ARTIFACTS_PATH, token, [pre, path, post],
                                         f"multipart/form-data; boundary={boundary}")
        if status != 201:
            raise PublishError(f"the server refused {path.name} (HTTP {status}): {_error_message(body)}")
        location = headers.get("location", "")
        locations.append(location)
        if progress:
            progress(f"published {path.name} → {location}")
    return locations


def collect(paths: Sequence[Path]) -> list[Path]:
    """Artifact files named directly, plus every ``*.mender`` in named directories."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.mender"))
            if not found:
                raise UserError(f"no .mender artifacts in {p}")
            out += found
        else:
            out.append(p)
    return out


@click.command("publish")
@click.argument("url")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def publish_command(url: str, paths: Sequence[Path]) -> None:
    """Upload artifacts (files, or the *.mender in a release directory) to the update server at URL.
    The admin token comes from $OTA_ADMIN_TOKEN."""
    check_url(url)
    token = admin_token()
    for loc in publish(url, collect(paths), token):
        click.echo(loc)
