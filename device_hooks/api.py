"""The Mender device API subset our server speaks (DESIGN.md section 4), with ``requests``, over TLS.

The server is verified against ``ca_file`` (the CA baked into the image) or the system trust store; plain
``http://`` only when the configuration says ``insecure_http``. Redirects are followed only to the same scheme
and host class (:func:`device_hooks.validate.redirect`). What the server answers is not trusted: a deployment
is parsed with types and grammars (:meth:`Deployment.from_json`).

Every call returns a plain value or raises one of: :class:`Unauthorized` (401: authenticate again),
:class:`Aborted` (409 on a status report: the deployment was aborted), :class:`Rejected` (another 4xx on a
report: it will never be taken, drop it), :class:`BadDeployment` (the deployment the server sent does not
parse), :class:`ServerError` (anything else, including network failures; the caller retries with back-off).
Each is a :class:`ota_common.errors.DownloadError`; ``transient`` is set for network failures
(:func:`.transport.transport_errors`: not for a certificate that fails verification) and 5xx/429 answers.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from ota_common.errors import DownloadError
from ota_common.varnames import CONFIG_HASH_HEADER, is_config_hash

from . import validate
from .identity import PrivateKey, public_pem, sign
from .transport import transport_errors

log = logging.getLogger(__name__)

AUTH = "/api/devices/v1/authentication/auth_requests"
NEXT_V2 = "/api/devices/v2/deployments/device/deployments/next"
DEPLOYMENTS_V1 = "/api/devices/v1/deployments/device/deployments"
INVENTORY = "/api/devices/v1/inventory/device/attributes"
CONFIGURATION = "/api/devices/v1/deviceconfig/configuration"


class ServerError(DownloadError):
    """A call of the device API failed: the server could not be reached or answered unexpectedly. Unlike a
    plain :class:`DownloadError` of the artifact's bytes (which fails the deployment), the agent's poll loop
    takes it as "offline" and tries again with back-off."""


class Unauthorized(ServerError):
    """401: the device is not (or no longer) authorised, or the token expired."""


class Aborted(ServerError):
    """409 on a status report: the deployment was aborted for this device."""


class Rejected(ServerError):
    """A 4xx answer to a report that will never change (unknown deployment, invalid status, gone): the report
    is dropped instead of blocking the ones behind it."""


class BadDeployment(ServerError):
    """The deployment the server sent does not parse; ``deployment_id`` is set when its id was valid (then the
    refusal can be reported to it)."""

    def __init__(self, message: str, deployment_id: str | None = None) -> None:
        super().__init__(message)
        self.deployment_id = deployment_id


PERMANENT = frozenset({400, 403, 404, 405, 410, 413, 422})
_DEVICE_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


@dataclass(frozen=True)
class Deployment:
    id: str
    artifact_name: str  # empty for a local install: no name to compare the signed one with
    uri: str
    device_types: tuple[str, ...]
    allow_downgrade: bool
    local_path: Path | None = None  # ota-agent install of a file on the device
    #: a rollback deployment's link to the artifact's signed header part (``vv_rollback``, our server's
    #: extension): the inactive slot may still hold the artifact (:mod:`.slot_rollback`)
    rollback_header_uri: str = ""

    @classmethod
    def from_json(cls, doc: Any, *, allow_http: bool = False) -> Deployment:
        """Parse ``next``'s answer with types and grammars. Raises :class:`BadDeployment`."""
        if not isinstance(doc, dict):
            raise BadDeployment("the deployment is not a JSON object")
        try:
            dep_id = validate.deployment_id(doc.get("id"))
        except validate.UntrustedInput as e:
            raise BadDeployment(f"deployment refused: {e}") from None
        try:
            art = doc.get("artifact")
            if not isinstance(art, dict):
                raise validate.UntrustedInput("artifact must be an object")
            source = art.get("source")
            if not isinstance(source, dict):
                raise validate.UntrustedInput("artifact.source must be an object")
            types = art.get("device_types_compatible", [])
            if not isinstance(types, list) or len(types) > 64 or not all(
                    isinstance(t, str) and _DEVICE_TYPE.match(t) for t in types):
                raise validate.UntrustedInput("device_types_compatible must be a list of device type names")
            allow_downgrade = doc.get("allow_downgrade", False)
            if not isinstance(allow_downgrade, bool):
                raise validate.UntrustedInput(f"allow_downgrade must be true or false, got {allow_downgrade!r:.40}")
            hint = doc.get("vv_rollback")
            if hint is not None and not isinstance(hint, dict):
                raise validate.UntrustedInput("vv_rollback must be an object")
            header_uri = "" if hint is None else validate.url(hint.get("header_uri"), what="rollback header link",
                                                              allow_http=allow_http)
            return cls(id=dep_id, artifact_name=validate.artifact_name(art.get("artifact_name")),
                       uri=validate.url(source.get("uri"), what="download link", allow_http=allow_http),
                       device_types=tuple(types), allow_downgrade=allow_downgrade, rollback_header_uri=header_uri)
        except validate.UntrustedInput as e:
            raise BadDeployment(f"deployment {dep_id} refused: {e}", dep_id) from None


class StrictSession(requests.Session):
    """A session that verifies TLS against ``verify`` on every request (also when the environment names
    another bundle) and follows a redirect only to the same scheme and host class."""

    def __init__(self, *, verify: str | bool = True, allow_http: bool = False) -> None:
        super().__init__()
        self.verify = verify
        self.allow_http = allow_http
        self.headers["User-Agent"] = "vv-ota-agent/1"
        self.headers["Accept-Encoding"] = "identity"

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("verify", self.verify)
        return super().request(method, url, *args, **kwargs)

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if target is not None:
            validate.redirect(resp.url, urllib.parse.urljoin(resp.url, target), allow_http=self.allow_http)
        return target


class DeviceAPI:
    def __init__(self, url: str, key: PrivateKey, identity: str, tenant_token: str = "", timeout: float = 30.0,
                 *, ca_file: str = "", allow_http: bool = False, device_cert: str | None = None):
        self.url = validate.url(url, what="server url", allow_http=allow_http).rstrip("/")
        self.key = key
        self.identity = identity
        self.tenant_token = tenant_token
        self.timeout = timeout
        self.allow_http = allow_http
        self.token: str | None = None
        #: the device certificate from the fleet CA (PEM), sent with each auth request when provisioned
        self.device_cert = device_cert
        self.session = StrictSession(verify=ca_file or True, allow_http=allow_http)
        #: the configuration hash of the last ``next`` answer (None: none, or not 64 hex digits) ...
        self.config_hash: str | None = None
        #: ... and of the last configuration GET (the hash of exactly the values it returned)
        self.served_config_hash: str | None = None
        self._bad_hash_logged = False

    def close(self) -> None:
        self.session.close()

    # -- plumbing
    def _request(self, method: str, path: str, *, auth: bool = True, **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {})
        if auth:
            if self.token is None:
                self.authenticate()
            headers["Authorization"] = f"Bearer {self.token}"
        kw.setdefault("stream", True)  # bodies are read bounded (_bounded_json, _message, the token)
        with transport_errors(f"{method} {path}", ServerError):
            resp = self.session.request(method, self.url + path, headers=headers, timeout=self.timeout,
                                        allow_redirects=False, **kw)
        if resp.status_code == 401:
            self.token = None
            raise _refused(f"{method} {path}", resp, Unauthorized)
        return resp

    # -- calls
    def authenticate(self) -> str:
        doc = {"id_data": self.identity, "pubkey": public_pem(self.key), "tenant_token": self.tenant_token}
        if self.device_cert:
            doc["device_cert"] = self.device_cert
        body = json.dumps(doc).encode()
        sig = base64.b64encode(sign(self.key, body)).decode()
        resp = self._request("POST", AUTH, auth=False, data=body,
                             headers={"Content-Type": "application/json", "X-MEN-Signature": sig})
        if resp.status_code != 200:
            raise _refused("authentication", resp)
        token = _bounded_text(resp, 16 * 1024).strip()
        if not token:
            raise ServerError("authentication: the server answered with an empty token")
        self.token = token
        return token

    def next_deployment(self, provides: dict[str, str]) -> Deployment | None:
        resp = self._request("POST", NEXT_V2, json={"device_provides": provides, "update_control_map": False},
                             stream=True)
        self.config_hash = self._config_hash(resp) if resp.status_code in (200, 204) else None
        if resp.status_code == 204:
            resp.close()
            return None
        if resp.status_code != 200:
            raise _refused("next deployment", resp)
        try:
            doc = _bounded_json(resp, "next deployment")
        except ServerError as e:
            raise BadDeployment(str(e)) from None
        return Deployment.from_json(doc, allow_http=self.allow_http)

    def report_status(self, deployment_id: str, status: str, substate: str = "") -> None:
        body: dict[str, str] = {"status": status}
        if substate:
            body["substate"] = substate[:1000]
        resp = self._request("PUT", f"{DEPLOYMENTS_V1}/{validate.deployment_id(deployment_id)}/status", json=body)
        if resp.status_code == 409:
            raise Aborted(f"deployment {deployment_id} was aborted")
        if resp.status_code in PERMANENT:
            raise _refused(f"status {status!r}", resp, Rejected)
        if resp.status_code not in (200, 204):
            raise _refused(f"status {status!r}", resp)
        resp.close()

    def upload_log(self, deployment_id: str, messages: list[dict[str, str]]) -> None:
        resp = self._request("PUT", f"{DEPLOYMENTS_V1}/{validate.deployment_id(deployment_id)}/log",
                             json={"messages": messages})
        if resp.status_code in PERMANENT:
            raise _refused("log upload", resp, Rejected)
        if resp.status_code not in (200, 204):
            raise _refused("log upload", resp)
        resp.close()

    def _config_hash(self, resp: requests.Response) -> str | None:
        """The answer's ``X-VV-Config-Hash``: 64 lower-case hex digits, else None (an other value is logged,
        once per process: a server that sends it on every poll must not flood the journal)."""
        value = resp.headers.get(CONFIG_HASH_HEADER)
        if value is None or is_config_hash(value):
            return value
        if not self._bad_hash_logged:
            log.warning("%s ignored: not 64 hex digits (%r)", CONFIG_HASH_HEADER, value[:80])
            self._bad_hash_logged = True
        return None

    def send_inventory(self, attributes: dict[str, Any]) -> None:
        body = [{"name": k, "value": v} for k, v in sorted(attributes.items())]
        resp = self._request("PUT", INVENTORY, json=body)
        if resp.status_code not in (200, 204):
            raise _refused("inventory", resp)
        resp.close()

    def configuration(self) -> dict[str, str]:
        resp = self._request("GET", CONFIGURATION, stream=True)
        self.served_config_hash = None
        if resp.status_code == 404:
            resp.close()
            return {}
        if resp.status_code != 200:
            raise _refused("configuration", resp)
        self.served_config_hash = self._config_hash(resp)
        doc = _bounded_json(resp, "configuration")
        if not isinstance(doc, dict):
            raise ServerError("configuration: expected a JSON object")
        out: dict[str, str] = {}
        for k, v in doc.items():
            if v is not None and not isinstance(v, str | int | float | bool):
                raise ServerError(f"configuration: the value of {str(k)[:64]!r} is not a scalar")
            out[str(k)] = "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
        return out


MAX_JSON = 1 << 20  # a deployment or a configuration is a few kB; a hostile server must not fill the memory


def _bounded_json(resp: requests.Response, what: str) -> Any:
    """The JSON body of a streamed response, refused past :data:`MAX_JSON` bytes."""
    try:
        with transport_errors(what, ServerError):
            body = resp.raw.read(MAX_JSON + 1, decode_content=False)  # asked for identity: no decompression bombs
    finally:
        resp.close()
    if len(body) > MAX_JSON:
        raise ServerError(f"{what}: the answer is larger than {MAX_JSON} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise ServerError(f"{what}: the answer is not JSON (or nested too deeply)") from None


def _bounded_text(resp: requests.Response, limit: int) -> str:
    """At most ``limit`` bytes of a streamed body, as text (never decompressed: asked for identity)."""
    try:
        body = resp.raw.read(limit, decode_content=False)
    except (requests.RequestException, OSError):
        body = b""
    finally:
        resp.close()
    return body.decode("utf-8", errors="replace")


def _refused(what: str, resp: requests.Response, error: type[ServerError] = ServerError) -> ServerError:
    """``error`` for an answer the call does not expect: ``<what>: <status> <message>``, transient for a 5xx
    or 429 (the server may take the same request later)."""
    return error(f"{what}: {resp.status_code} {_message(resp)}",
                 transient=resp.status_code >= 500 or resp.status_code == 429)


def _message(resp: requests.Response) -> str:
    """The error of a failed answer: its ``error`` field, else the start of its body (4 KiB read at most)."""
    text = _bounded_text(resp, 4096)
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and "error" in doc:
            return str(doc["error"])[:300]
    except (ValueError, RecursionError):
        pass
    return text[:200].strip()
