"""The Mender device API subset our server speaks (DESIGN.md section 4), with ``requests``.

Every call returns a plain value or raises one of: :class:`Unauthorized` (401: authenticate again),
:class:`Aborted` (409 on a status report: the deployment was aborted), :class:`ServerError` (anything else,
including network failures; the caller retries with back-off).
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import Any

import requests

from ota_common.errors import OTAError

from .identity import PrivateKey, public_pem, sign

log = logging.getLogger(__name__)

AUTH = "/api/devices/v1/authentication/auth_requests"
NEXT_V2 = "/api/devices/v2/deployments/device/deployments/next"
DEPLOYMENTS_V1 = "/api/devices/v1/deployments/device/deployments"
INVENTORY = "/api/devices/v1/inventory/device/attributes"
CONFIGURATION = "/api/devices/v1/deviceconfig/configuration"


class ServerError(OTAError):
    """The server could not be reached or answered unexpectedly."""

    exit_code = 4


class Unauthorized(ServerError):
    """401: the device is not (or no longer) authorised, or the token expired."""


class Aborted(ServerError):
    """409 on a status report: the deployment was aborted for this device."""


@dataclass(frozen=True)
class Deployment:
    id: str
    artifact_name: str
    uri: str
    device_types: tuple[str, ...]
    allow_downgrade: bool

    @classmethod
    def from_json(cls, doc: Any) -> Deployment:
        try:
            art = doc["artifact"]
            return cls(id=str(doc["id"]), artifact_name=str(art["artifact_name"]), uri=str(art["source"]["uri"]),
                       device_types=tuple(str(t) for t in art.get("device_types_compatible") or ()),
                       allow_downgrade=bool(doc.get("allow_downgrade", False)))
        except (KeyError, TypeError) as e:
            raise ServerError(f"malformed deployment from the server: missing {e}") from None


class DeviceAPI:
    def __init__(self, url: str, key: PrivateKey, identity: str, tenant_token: str = "", timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.key = key
        self.identity = identity
        self.tenant_token = tenant_token
        self.timeout = timeout
        self.token: str | None = None
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "vv-ota-agent/1"

    def close(self) -> None:
        self.session.close()

    # -- plumbing
    def _request(self, method: str, path: str, *, auth: bool = True, **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {})
        if auth:
            if self.token is None:
                self.authenticate()
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            resp = self.session.request(method, self.url + path, headers=headers, timeout=self.timeout, **kw)
        except requests.RequestException as e:
            raise ServerError(f"{method} {path}: {type(e).__name__}: {e}") from None
        if resp.status_code == 401:
            self.token = None
            raise Unauthorized(f"{method} {path}: 401 {_message(resp)}")
        return resp

    # -- calls
    def authenticate(self) -> str:
        body = json.dumps({"id_data": self.identity, "pubkey": public_pem(self.key),
                           "tenant_token": self.tenant_token}).encode()
        sig = base64.b64encode(sign(self.key, body)).decode()
        resp = self._request("POST", AUTH, auth=False, data=body,
                             headers={"Content-Type": "application/json", "X-MEN-Signature": sig})
        if resp.status_code != 200:
            raise ServerError(f"authentication: {resp.status_code} {_message(resp)}")
        token = str(resp.text).strip()
        if not token:
            raise ServerError("authentication: the server answered with an empty token")
        self.token = token
        return token

    def next_deployment(self, provides: dict[str, str]) -> Deployment | None:
        resp = self._request("POST", NEXT_V2, json={"device_provides": provides, "update_control_map": False})
        if resp.status_code == 204:
            return None
        if resp.status_code != 200:
            raise ServerError(f"next deployment: {resp.status_code} {_message(resp)}")
        try:
            return Deployment.from_json(resp.json())
        except ValueError:
            raise ServerError("next deployment: the answer is not JSON") from None

    def report_status(self, deployment_id: str, status: str, substate: str = "") -> None:
        body: dict[str, str] = {"status": status}
        if substate:
            body["substate"] = substate[:1000]
        resp = self._request("PUT", f"{DEPLOYMENTS_V1}/{deployment_id}/status", json=body)
        if resp.status_code == 409:
            raise Aborted(f"deployment {deployment_id} was aborted")
        if resp.status_code not in (200, 204):
            raise ServerError(f"status {status!r}: {resp.status_code} {_message(resp)}")

    def upload_log(self, deployment_id: str, messages: list[dict[str, str]]) -> None:
        resp = self._request("PUT", f"{DEPLOYMENTS_V1}/{deployment_id}/log", json={"messages": messages})
        if resp.status_code not in (200, 204):
            raise ServerError(f"log upload: {resp.status_code} {_message(resp)}")

    def send_inventory(self, attributes: dict[str, Any]) -> None:
        body = [{"name": k, "value": v} for k, v in sorted(attributes.items())]
        resp = self._request("PUT", INVENTORY, json=body)
        if resp.status_code not in (200, 204):
            raise ServerError(f"inventory: {resp.status_code} {_message(resp)}")

    def configuration(self) -> dict[str, str]:
        resp = self._request("GET", CONFIGURATION)
        if resp.status_code == 404:
            return {}
        if resp.status_code != 200:
            raise ServerError(f"configuration: {resp.status_code} {_message(resp)}")
        try:
            doc = resp.json()
        except ValueError:
            raise ServerError("configuration: the answer is not JSON") from None
        if not isinstance(doc, dict):
            raise ServerError("configuration: expected a JSON object")
        return {str(k): "" if v is None else str(v) for k, v in doc.items()}


def _message(resp: requests.Response) -> str:
    try:
        doc = resp.json()
        if isinstance(doc, dict) and "error" in doc:
            return str(doc["error"])
    except ValueError:
        pass
    return str(resp.text)[:200].strip()
