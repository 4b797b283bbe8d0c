"""Update server: every operation of its live OpenAPI schema fuzzed with schemathesis over real HTTP.

The real server runs as a subprocess (fresh SQLite, temporary storage, a release key, ``OTA_ADMIN_TOKEN``);
the schema is read from its ``/openapi.json`` and every operation is called with positive (schema-valid) and
negative (schema-violating) data three times: with the admin token, with the token of an accepted device, and
with no or garbage credentials. Path parameters are sometimes replaced by the ids of real objects (the device,
its auth set, a deployment for it, the artifact, a group), so the handlers behind the 404s are reached too.

Every answer must be:
- no 5xx (``not_a_server_error``);
- conform to the documented status codes, content types and schemas (``status_code_conformance``,
  ``content_type_conformance``, ``response_schema_conformance``);
- an error (4xx) as JSON ``{"error": "<message>"}``;
- 401 when the credentials do not fit the API: management operations (and ``/metrics``) without an API token, device
  operations without a valid token of an accepted device — whatever the body, never 400/403/5xx.

The run is bounded and reproducible: ``MAX_EXAMPLES`` per operation and generation mode, derandomized
hypothesis (a fixed seed per operation), no example database, no shrinking.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import load_all_checks, not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .server_helpers import ADMIN_TOKEN, Device, Server, deploy, server_fixture, upload, write_artifact  # noqa: F401

pytestmark = pytest.mark.slow

#: examples per operation and generation mode for the API the credentials are meant for, and for the others
#: (where the answer must be 401 whatever is sent)
MAX_EXAMPLES = 25
MAX_EXAMPLES_FOREIGN = 5
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

#: operations that need no credentials at all (``/metrics`` needs a token with scope read, like the rest of the
#: management API, unless the server runs with ``--public-metrics``)
PUBLIC = {
    "GET /health",
    "POST /api/devices/v1/authentication/auth_requests",
    "GET /api/devices/v1/download/{artifact_id}",
}


def api_of(label: str) -> str:
    """``public``, ``device`` (device token) or ``admin`` (management token)."""
    if label in PUBLIC:
        return "public"
    path = label.split(" ", 1)[1]
    return "device" if path.startswith("/api/devices/") else "admin"


@dataclass
class World:
    """Real objects whose ids the fuzzer uses as path parameters."""

    device: Device
    device_id: str
    auth_id: str
    artifact_id: str
    deployment_id: str
    group: str = "fuzz-group"

    def path_ids(self) -> dict[str, str]:
        return {"device_id": self.device_id, "auth_id": self.auth_id, "artifact_id": self.artifact_id,
                "deployment_id": self.deployment_id, "group": self.group, "name": self.group}


@pytest.fixture
def world(server: Server, run_cli: Any, keys: dict[str, tuple[Path, Path]], tmp_path: Path) -> World:
    """An accepted device in a group, a signed artifact and a deployment of it to that device."""
    dev = Device(server, "ec")
    device_id = dev.accept()
    name = f"fuzz-{uuid.uuid4().hex[:8]}"
    r = upload(server, write_artifact(run_cli, tmp_path / f"{name}.mender", name, key=keys["ec"][0]))
    assert r.status_code == 201, r.text
    artifact_id = r.headers["Location"].rsplit("/", 1)[1]
    with server.admin() as a:
        auth_id = a.get(f"/api/management/v2/devauth/devices/{device_id}").json()["auth_sets"][0]["id"]
        assert a.put(f"/api/management/v1/inventory/devices/{device_id}/group", json={"group": "fuzz-group"}).status_code == 204
    deployment_id = deploy(server, name=name, artifact_name=name, devices=[device_id])
    return World(dev, device_id, auth_id, artifact_id, deployment_id)


@pytest.fixture(scope="module")
def schema(server: Server) -> Any:
    load_all_checks()
    return schemathesis.openapi.from_url(server.url + "/openapi.json",  # scope read (no --public-docs)
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


def garbage_credentials(server: Server, world: World) -> list[dict[str, str]]:
    """Authorization headers that must not get anyone anywhere."""
    key = base64.b64decode(server.secrets()["jwt_key"])  # the real key: only the claims are wrong
    now = int(time.time())
    claims = {"sub": world.device_id, "iss": "vv-ota", "mender.device": True, "iat": now, "exp": now + 3600}
    return [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer garbage"},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Authorization": "Bearer " + jwt.encode(claims, "not the server key, but 32 bytes or more", algorithm="HS256")},
        {"Authorization": "Bearer " + jwt.encode({**claims, "exp": now - 10}, key, algorithm="HS256")},
        {"Authorization": "Bearer " + jwt.encode({**claims, "sub": str(uuid.uuid4())}, key, algorithm="HS256")},
        {"Authorization": "Bearer " + jwt.encode(claims, None, algorithm="none")},  # type: ignore[arg-type]
    ]


@dataclass
class Report:
    problems: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)

    def add(self, key: str, text: str) -> None:
        self.problems.setdefault(key, text)

    def summary(self) -> str:
        return "\n\n".join(f"### {k}\n{v}" for k, v in self.problems.items())


def error_body_problem(response: Any) -> str | None:
    """``response``: schemathesis' (headers are lists of values)."""
    try:
        doc = json.loads(response.content)
    except ValueError:
        return "the error body is not JSON"
    if not (isinstance(doc, dict) and set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"].strip()):
        return "the error body is not {\"error\": \"<message>\"}"
    if not response.headers.get("content-type", [""])[0].startswith("application/json"):
        return "the error body is not served as application/json"
    return None


def fuzz(schema: Any, server: Server, world: World, mode: str,
         credentials: Callable[[], list[dict[str, str]]]) -> Report:
    """Fuzz every operation with the given credentials (``mode``: the API they are meant for)."""
    report = Report()
    session = requests.Session()
    creds = credentials()
    ids = world.path_ids()
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) > 30, [op.label for op in operations]
    # `next` with a random device type ends the device's deployment (noartifact): report statuses first
    operations.sort(key=lambda op: op.label.endswith("/next"))
    for op in operations:
        api = api_of(op.label)
        examples = MAX_EXAMPLES if api in (mode, "public") else MAX_EXAMPLES_FOREIGN
        params = [p.name for p in op.path_parameters]
        for gen in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies = [op.as_strategy(generation_mode=gen)]
            if params and all(p in ids for p in params):
                strategies.append(op.as_strategy(generation_mode=gen, path_parameters={p: ids[p] for p in params}))
            run = _fuzz_operation(server, session, report, f"{op.label} {gen.value}", mode, api,
                                  st.one_of(strategies), st.sampled_from(creds))
            with contextlib.suppress(Unsatisfiable):  # nothing schema-violating to generate (plain string ids)
                settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))(run)()
    # the server is still there and healthy
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    return report


def _fuzz_operation(server: Server, session: requests.Session, report: Report, label: str, mode: str, api: str,
                    cases: st.SearchStrategy[Any], headers: st.SearchStrategy[dict[str, str]]) -> Callable[[], None]:
    statuses = report.statuses.setdefault(label, {})
    where = f"{label} [{mode} credentials]"

    @given(case=cases, headers=headers)
    def run(case: Any, headers: dict[str, str]) -> None:
        try:
            response = case.call(base_url=server.url, session=session, headers=headers, timeout=60)
        except requests.RequestException as e:
            report.add(f"{where}: no answer", f"{e!r}\n{case.as_curl_command(headers=headers, base_url=server.url)}")
            return
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        answer = (f"-> {response.status_code} {response.content[:500]!r}\n"
                  f"{case.as_curl_command(headers=headers, base_url=server.url)}")
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                report.add(f"{where}: {failure.title}", f"{failure.message}\n{answer}")
        except AssertionError as e:
            report.add(f"{where}: {type(e).__name__}", f"{e}\n{answer}")
        if response.status_code >= 400 and (problem := error_body_problem(response)):
            report.add(f"{where}: {problem}", answer)
        if api not in (mode, "public") and response.status_code != 401:
            report.add(f"{where}: not 401 for {mode} credentials", answer)

    return run  # type: ignore[no-any-return]


def check(report: Report) -> None:
    seen = {k: v for k, v in report.statuses.items() if v}
    print("\n".join(f"{k}: {dict(sorted(v.items()))}" for k, v in seen.items()))
    assert not report.problems, f"{len(report.problems)} problem(s):\n\n{report.summary()}"


def test_fuzz_with_device_token(schema: Any, server: Server, world: World) -> None:
    report = fuzz(schema, server, world, "device", lambda: [world.device.headers])
    check(report)
    # the device API was really exercised: valid requests reached the handlers and succeeded
    for label, status in (("POST /api/devices/v2/deployments/device/deployments/next", 204),
                          ("PUT /api/devices/v1/deployments/device/deployments/{deployment_id}/status", 204),
                          ("PUT /api/devices/v1/deployments/device/deployments/{deployment_id}/log", 204),
                          ("PATCH /api/devices/v1/inventory/device/attributes", 200),
                          ("GET /api/devices/v1/deviceconfig/configuration", 200)):
        assert report.statuses[f"{label} positive"].get(status, 0) > 0, (label, report.statuses[f"{label} positive"])


def test_fuzz_without_valid_credentials(schema: Any, server: Server, world: World) -> None:
    report = fuzz(schema, server, world, "none", lambda: garbage_credentials(server, world))
    check(report)


def test_fuzz_with_admin_token(schema: Any, server: Server, world: World) -> None:
    report = fuzz(schema, server, world, "admin", lambda: [{"Authorization": f"Bearer {ADMIN_TOKEN}"}])
    check(report)
    assert report.statuses["GET /api/management/v2/devauth/devices positive"].get(200, 0) > 0
