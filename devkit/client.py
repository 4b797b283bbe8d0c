"""The one client of the update server's management API: ``build.py publish`` and ``release --publish``, the
demo, the tests, the QEMU harness and the benchmark.

Standard library HTTP (``http.client``), one connection per request. A request body is bytes or a list of
parts, each bytes or a file streamed from disk (never read into memory): an artifact is uploaded as the
``artifact`` field of a multipart/form-data POST to ``/api/management/v1/deployments/artifacts``. Every HTTP
status is an answer (:class:`Response`); not reaching the server is a :class:`DownloadError`."""

from __future__ import annotations

import http.client
import json
import ssl
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ota_common.errors import DownloadError, OTAError, UserError

MGMT = "/api/management"
ARTIFACTS_PATH = f"{MGMT}/v1/deployments/artifacts"
#: where ``build.py server`` and ``build.py publish`` take the bootstrap admin token from
TOKEN_ENV = "OTA_ADMIN_TOKEN"
CHUNK = 1 << 20
#: the documents of a release stored with each artifact (``PUT .../artifacts/{id}/<kind>``), by kind: media type
DOCUMENTS = {"sbom": "application/vnd.cyclonedx+json", "provenance": "application/vnd.dsse.envelope.v1+json"}
#: seconds an upload may wait on one socket operation (the server verifies a large artifact before it answers)
UPLOAD_TIMEOUT = 600.0


class ManagementError(OTAError):
    """The server answered a management request with an unexpected status (the message has its answer)."""

    exit_code = 1


class PublishError(ManagementError):
    """The server refused an artifact (its message says why)."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> str:
        """The server's ``{"error": ...}`` message, else the start of the body."""
        try:
            return str(json.loads(self.body)["error"])
        except (ValueError, KeyError, TypeError):
            return self.body.decode("utf-8", "replace").strip()[:300] or "no details"

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.headers} {self.body[:2000]!r}"


def check_url(url: str) -> tuple[str, str, int | None, str]:
    """``(scheme, host, port, path prefix)`` of a server URL. Raises :class:`UserError` unless http(s)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"the publish URL must be http(s)://HOST[:PORT][/PREFIX], not {url!r}")
    return parts.scheme, parts.hostname, parts.port, parts.path.rstrip("/")


class ManagementClient:
    """The management API at ``url`` (a path prefix is kept), authenticated with ``admin_token``.

    ``context`` verifies an https server (default: the system's CAs); ``timeout`` is per request unless a
    request gives its own. ``url`` and ``context`` may be changed between requests."""

    def __init__(self, url: str, admin_token: str, *, context: ssl.SSLContext | None = None,
                 timeout: float = 30.0) -> None:
        self.url = url
        self.admin_token = admin_token
        self.context = context
        self.timeout = timeout

    def request(self, method: str, path: str, body: bytes | Sequence[bytes | Path] | None = None,
                content_type: str | None = None, headers: dict[str, str] | None = None,
                timeout: float | None = None) -> Response:
        """One request; files among the body parts are streamed. Raises :class:`DownloadError` when the server
        cannot be reached or drops the connection before answering."""
        scheme, host, port, prefix = check_url(self.url)
        parts: list[bytes | Path] = [body] if isinstance(body, bytes) else list(body or ())
        wait = self.timeout if timeout is None else timeout
        conn = (http.client.HTTPSConnection(host, port, timeout=wait, context=self.context) if scheme == "https"
                else http.client.HTTPConnection(host, port, timeout=wait))
        try:
            conn.putrequest(method, prefix + path)
            conn.putheader("Authorization", f"Bearer {self.admin_token}")
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if parts or content_type:
                conn.putheader("Content-Type", content_type or "application/octet-stream")
            if parts or method in ("POST", "PUT", "PATCH"):
                length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in parts)
                conn.putheader("Content-Length", str(length))
            conn.endheaders()
            try:
                for part in parts:
                    if isinstance(part, Path):
                        with open(part, "rb") as f:
                            while chunk := f.read(CHUNK):
                                conn.send(chunk)
                    else:
                        conn.send(part)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered early (and closed); its answer says why
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(f"cannot reach the update server at {self.url}: {e}", transient=True) from None
        finally:
            conn.close()

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def send_json(self, method: str, path: str, payload: Any) -> Response:
        return self.request(method, path, json.dumps(payload).encode(), "application/json")

    def upload_artifact(self, artifact: Path, timeout: float = UPLOAD_TIMEOUT) -> Response:
        """POST the artifact file (streamed) as a release; the answer is the server's (201: stored)."""
        boundary = uuid.uuid4().hex
        name = artifact.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"artifact\"; filename=\"{name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        return self.request("POST", ARTIFACTS_PATH, [head, artifact, tail],
                            f"multipart/form-data; boundary={boundary}", timeout=timeout)

    # --- publishing ---------------------------------------------------------------------------------------

    def check(self) -> None:
        """The server answers and takes the token (checked before a long build or upload).

        Raises :class:`UserError` for a refused token, :class:`PublishError` for a server that is not an update
        server, :class:`DownloadError` when there is none."""
        resp = self.get(ARTIFACTS_PATH + "?name=-")
        if resp.status == 401:
            raise UserError(f"the update server at {self.url} refused the admin token (${TOKEN_ENV})")
        if resp.status != 200:
            raise PublishError(f"{self.url} does not look like the update server (HTTP {resp.status}: "
                               f"{resp.error()})")

    def put_document(self, artifact_id: str, kind: str, path: Path) -> Response:
        """PUT a release document of an uploaded artifact: ``kind`` is ``sbom`` (``sbom.cdx.json``) or
        ``provenance`` (``provenance.intoto.json``); the answer is the server's (204: stored)."""
        if kind not in DOCUMENTS:
            raise ValueError(f"unknown release document {kind!r}")
        return self.request("PUT", f"{ARTIFACTS_PATH}/{artifact_id}/{kind}", [path], DOCUMENTS[kind])

    def publish(self, artifacts: Sequence[Path], progress: Callable[[str], None] | None = None,
                documents: Mapping[Path, Sequence[tuple[str, Path]]] | None = None) -> list[str]:
        """Check the server, then upload each artifact and, after it, its release documents (``documents``:
        artifact → ``[(kind, file), ...]``, see :meth:`put_document`); returns the server's artifact URLs
        (``Location``).

        Raises :class:`PublishError` on the first refusal, and what :meth:`check` raises."""
        self.check()
        locations = []
        for path in artifacts:
            resp = self.upload_artifact(path)
            if resp.status != 201:
                raise PublishError(f"the server refused {path.name} (HTTP {resp.status}): {resp.error()}")
            location = resp.headers.get("location", "")
            locations.append(location)
            if progress:
                progress(f"published {path.name} → {location}")
            artifact_id = location.rstrip("/").rsplit("/", 1)[-1]
            for kind, doc in (documents or {}).get(path, ()):
                resp = self.put_document(artifact_id, kind, doc)
                if resp.status != 204:
                    raise PublishError(f"the server refused the {kind} {doc.name} of {path.name} (HTTP "
                                       f"{resp.status}): {resp.error()}")
                if progress:
                    progress(f"published {doc.name} with {path.name}")
        return locations

    # --- devices and deployments (the demo and the end-to-end harness) --------------------------------------

    def _expect(self, resp: Response, statuses: tuple[int, ...], doing: str) -> Response:
        if resp.status not in statuses:
            raise ManagementError(f"{doing}: {resp}")
        return resp

    def devices(self) -> list[dict[str, Any]]:
        devices: list[dict[str, Any]] = self._expect(self.get(f"{MGMT}/v2/devauth/devices"), (200,),
                                                     "listing devices").json()
        return devices

    def accept(self, device: dict[str, Any]) -> None:
        aid = device["auth_sets"][0]["id"]
        self._expect(self.send_json("PUT", f"{MGMT}/v2/devauth/devices/{device['id']}/auth/{aid}/status",
                                    {"status": "accepted"}), (200, 204), f"accepting {device['id']}")

    def attributes(self, device_id: str) -> dict[str, Any]:
        """The device's inventory as ``{name: value}`` (empty while the server has none)."""
        resp = self.get(f"{MGMT}/v1/inventory/devices/{device_id}")
        if resp.status != 200:
            return {}
        return {a["name"]: a["value"] for a in resp.json().get("attributes", [])}

    def deploy(self, name: str, artifact_name: str, devices: list[str], **extra: Any) -> str:
        """Create a deployment; returns its id."""
        resp = self._expect(self.send_json("POST", f"{MGMT}/v1/deployments/deployments",
                                           {"name": name, "artifact_name": artifact_name, "devices": devices,
                                            **extra}), (201,), f"creating deployment {name}")
        return resp.headers["location"].rstrip("/").rsplit("/", 1)[-1]

    def statistics(self, deployment_id: str) -> dict[str, int]:
        """The deployment's non-zero status counts."""
        resp = self._expect(self.get(f"{MGMT}/v1/deployments/deployments/{deployment_id}/statistics"), (200,),
                            f"statistics of {deployment_id}")
        return {k: int(v) for k, v in resp.json().items() if v}

    def device_log(self, deployment_id: str, device_id: str) -> str:
        resp = self.get(f"{MGMT}/v1/deployments/deployments/{deployment_id}/devices/{device_id}/log")
        return resp.body.decode(errors="replace") if resp.status == 200 else ""
