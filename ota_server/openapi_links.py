"""OpenAPI links: how the answer of one operation feeds the next (the id in a ``Location`` header or in a body,
the signed query of a download link). They document how the API is walked, and stateful fuzzing
(tests/test_server_fuzz.py) follows them: create a device, then read, group, configure and decommission it;
poll ``next``, then report on the deployment and download its artifact.

Runtime expressions are OpenAPI's, plus the ``#regex:`` extractor (one capture group) that schemathesis reads on
headers and body values.
"""

from __future__ import annotations

import re
from typing import Any

DEVAUTH = "/api/management/v2/devauth/devices"
INVENTORY = "/api/management/v1/inventory"
CONFIG = "/api/management/v1/deviceconfig/configurations"
ARTIFACTS = "/api/management/v1/deployments/artifacts"
DEPLOYMENTS = "/api/management/v1/deployments/deployments"
DEPLOYMENT = "/api/devices/v1/deployments/device/deployments"
DOWNLOAD = "/api/devices/v1/download/{artifact_id}"

#: the last segment of a ``Location`` header (the created object's id)
LOCATION_ID = "$response.header.Location#regex:/([^/?]+)$"


def _device(device_id: str) -> list[tuple[str, str, dict[str, str]]]:
    """What can be done with a device whose id ``device_id`` (an expression) gives."""
    p = {"device_id": device_id}
    return [("get", DEVAUTH + "/{device_id}", p), ("get", INVENTORY + "/devices/{device_id}", p),
            ("put", INVENTORY + "/devices/{device_id}/group", p), ("put", CONFIG + "/device/{device_id}", p),
            ("get", CONFIG + "/device/{device_id}", p), ("delete", DEVAUTH + "/{device_id}", p)]


def _deployment(deployment_id: str) -> list[tuple[str, str, dict[str, str]]]:
    p = {"deployment_id": deployment_id}
    return [("get", DEPLOYMENTS + "/{deployment_id}", p), ("get", DEPLOYMENTS + "/{deployment_id}/statistics", p),
            ("get", DEPLOYMENTS + "/{deployment_id}/devices", p), ("put", DEPLOYMENTS + "/{deployment_id}/status", p)]


def _artifact(artifact_id: str) -> list[tuple[str, str, dict[str, str]]]:
    p = {"artifact_id": artifact_id}
    return [("get", ARTIFACTS + "/{artifact_id}", p), ("delete", ARTIFACTS + "/{artifact_id}", p)]


def _next_answer() -> list[tuple[str, str, dict[str, str]]]:
    """A deployment handed to the device: report on it, upload its log, download its artifact."""
    dep = {"deployment_id": "$response.body#/id"}
    uri = "$response.body#/artifact/source/uri"
    return [("put", DEPLOYMENT + "/{deployment_id}/status", dep), ("put", DEPLOYMENT + "/{deployment_id}/log", dep),
            ("get", DOWNLOAD, {"artifact_id": "$response.body#/artifact/id",
                               "expires": uri + "#regex:[?&]expires=([0-9]+)", "sig": uri + "#regex:[?&]sig=([0-9a-f]+)"})]


#: (method, path, status) of the answer → what it links to: (method, path, parameters)
LINKS: dict[tuple[str, str, str], list[tuple[str, str, dict[str, str]]]] = {
    ("post", DEVAUTH, "201"): _device(LOCATION_ID),
    ("get", DEVAUTH, "200"): _device("$response.body#/0/id") + [
        ("put", DEVAUTH + "/{device_id}/auth/{auth_id}/status",
         {"device_id": "$response.body#/0/id", "auth_id": "$response.body#/0/auth_sets/0/id"})],
    ("get", DEVAUTH + "/{device_id}", "200"): [
        ("put", DEVAUTH + "/{device_id}/auth/{auth_id}/status",
         {"device_id": "$response.body#/id", "auth_id": "$response.body#/auth_sets/0/id"})],
    ("get", INVENTORY + "/devices", "200"): _device("$response.body#/0/id"),
    ("put", INVENTORY + "/devices/{device_id}/group", "204"): [
        ("delete", INVENTORY + "/devices/{device_id}/group/{name}",
         {"device_id": "$request.path.device_id", "name": "$request.body#/group"}),
        ("get", CONFIG + "/group/{group}", {"group": "$request.body#/group"}),
        ("put", CONFIG + "/group/{group}", {"group": "$request.body#/group"})],
    ("get", INVENTORY + "/groups", "200"): [
        ("get", CONFIG + "/group/{group}", {"group": "$response.body#/0"}),
        ("put", CONFIG + "/group/{group}", {"group": "$response.body#/0"})],
    ("post", ARTIFACTS, "201"): _artifact(LOCATION_ID),
    ("get", ARTIFACTS, "200"): _artifact("$response.body#/0/id"),
    ("post", DEPLOYMENTS, "201"): _deployment(LOCATION_ID),
    ("get", DEPLOYMENTS, "200"): _deployment("$response.body#/0/id"),
    ("get", DEPLOYMENTS + "/{deployment_id}/devices", "200"): [
        ("get", DEPLOYMENTS + "/{deployment_id}/devices/{device_id}/log",
         {"deployment_id": "$request.path.deployment_id", "device_id": "$response.body#/0/id"})],
    ("post", "/api/devices/v2/deployments/device/deployments/next", "200"): _next_answer(),
    ("post", "/api/devices/v1/deployments/device/deployments/next", "200"): _next_answer(),
    ("get", "/api/devices/v1/deployments/device/deployments/next", "200"): _next_answer(),
}


def add_links(schema: dict[str, Any]) -> None:
    """Add :data:`LINKS` to an OpenAPI document (in place): each target as an ``operationRef``.

    Raises:
        KeyError: a link names an operation or an answer the document does not have (a route was renamed).
    """
    paths = schema["paths"]
    for (method, path, status), targets in LINKS.items():
        response = paths[path][method]["responses"][status]
        links = response.setdefault("links", {})
        for target_method, target_path, parameters in targets:
            paths[target_path][target_method]  # noqa: B018 - KeyError when the target does not exist
            pointer = target_path.replace("~", "~0").replace("/", "~1")
            name = re.sub(r"[^A-Za-z0-9]+", "_", f"{target_method}{target_path.removeprefix('/api')}").strip("_")
            links[name] = {"operationRef": f"#/paths/{pointer}/{target_method}", "parameters": dict(parameters)}
