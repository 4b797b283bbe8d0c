"""Update server, hostile and broken input (hand-written, next to the schemathesis fuzzing in
test_server_fuzz.py): cross-device access, unaccepted devices, oversized bodies, malformed JSON, wrong
content types, unicode/NUL/lone surrogates in identity data, path traversal in ids. Every refusal is a 4xx
with a JSON ``{"error": "<message>"}`` body; the server stays up."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from .server_helpers import ADMIN_TOKEN, Device, Server, deploy, server_fixture, upload, write_artifact  # noqa: F401

DEV = "/api/devices/v1"
NEXT = "/api/devices/v2/deployments/device/deployments/next"
AUTH = f"{DEV}/authentication/auth_requests"
DEPLOYMENTS = "/api/management/v1/deployments/deployments"
DEVAUTH = "/api/management/v2/devauth/devices"
CONFIG = "/api/management/v1/deviceconfig/configurations"
ANSIBLE = "/api/management/v1/inventory/import/ansible"
ARTIFACTS = "/api/management/v1/deployments/artifacts"
#: the default --max-unauthenticated-body
UNAUTHENTICATED_BODY = 64 * 1024


def assert_error(r: httpx.Response, *statuses: int, contains: str = "") -> str:
    """A refusal: one of ``statuses``, JSON ``{"error": "<message>"}``; returns the message."""
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    doc = r.json()
    assert isinstance(doc, dict) and set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"], doc
    assert contains.lower() in doc["error"].lower(), doc
    return str(doc["error"])


@dataclass
class Fleet:
    a: Device
    b: Device
    a_id: str
    b_id: str
    artifact: str  # name
    dep_a: str
    dep_b: str


@pytest.fixture(scope="module")
def fleet(server: Server, keys: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Devices A and B, accepted, each with its own deployment of the same release."""
    import subprocess
    import sys

    from .conftest import BUILD_PY, REPO, make_payload

    out = tmp_path_factory.mktemp("bad-input")
    payload = make_payload(out / "app.bin", 20_000)
    artifact = out / "bad-input-1.mender"
    subprocess.run([sys.executable, str(BUILD_PY), "artifact", "write", "module-image", "--type", "vv-app", "--file",
                    str(payload), "--name", "bad-input-1", "-t", "qemu-virt", "--key", str(keys["ec"][0]), "-o",
                    str(artifact)], check=True, cwd=REPO, capture_output=True)
    assert upload(server, artifact).status_code == 201
    a, b = Device(server, "ec"), Device(server, "ed25519")
    a_id, b_id = a.accept(), b.accept()
    dep_a = deploy(server, name="for-a", artifact_name="bad-input-1", devices=[a_id])
    dep_b = deploy(server, name="for-b", artifact_name="bad-input-1", devices=[b_id])
    return Fleet(a, b, a_id, b_id, "bad-input-1", dep_a, dep_b)


def device_calls(deployment_id: str) -> list[tuple[str, str, Any]]:
    """One valid request to every device API operation that needs a device token."""
    provides = {"device_provides": {"device_type": "qemu-virt", "artifact_name": "old"}}
    return [
        ("POST", NEXT, provides),
        ("POST", f"{DEV}/deployments/device/deployments/next", provides),
        ("GET", f"{DEV}/deployments/device/deployments/next?artifact_name=old&device_type=qemu-virt", None),
        ("PUT", f"{DEV}/deployments/device/deployments/{deployment_id}/status", {"status": "downloading"}),
        ("PUT", f"{DEV}/deployments/device/deployments/{deployment_id}/log",
         {"messages": [{"timestamp": "2024-01-01T00:00:00Z", "level": "info", "message": "hello"}]}),
        ("PUT", f"{DEV}/inventory/device/attributes", [{"name": "k", "value": "v"}]),
        ("PATCH", f"{DEV}/inventory/device/attributes", [{"name": "k", "value": "v"}]),
        ("GET", f"{DEV}/deviceconfig/configuration", None),
    ]


def forged_token(server: Server, device_id: str, **claims: Any) -> str:
    """A token signed with the server's real key (as if it had been issued) for ``device_id``."""
    key = base64.b64decode(server.secrets()["jwt_key"])
    now = int(time.time())
    return jwt.encode({"sub": device_id, "iss": "vv-ota", "mender.device": True, "iat": now, "exp": now + 600,
                       "jti": str(uuid.uuid4()), **claims}, key, algorithm="HS256")


def call(c: httpx.Client, method: str, path: str, body: Any, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return c.request(method, path, json=body, headers=headers) if body is not None else c.request(method, path, headers=headers)


# ---------------------------------------------------------------------------------------------------------
# Cross-device access


def test_device_cannot_read_or_report_another_devices_deployment(server: Server, fleet: Fleet) -> None:
    a = fleet.a
    base = f"{DEV}/deployments/device/deployments/{fleet.dep_b}"
    for status in ("downloading", "success", "failure"):
        assert_error(a.status(fleet.dep_b, status), 404, contains="not found")
    r = a.http.put(f"{base}/log", headers=a.headers,
                   json={"messages": [{"timestamp": "t", "level": "error", "message": "injected by A"}]})
    assert_error(r, 404, contains="not found")
    # A's polls only ever hand out A's deployment
    r = a.next()
    assert r.status_code == 200 and r.json()["id"] == fleet.dep_a, r.text
    with server.admin() as adm:
        (row,) = adm.get(f"{DEPLOYMENTS}/{fleet.dep_b}/devices").json()
        assert row["id"] == fleet.b_id and row["status"] == "pending" and row["log"] is False, row
        assert adm.get(f"{DEPLOYMENTS}/{fleet.dep_b}/statistics").json()["pending"] == 1
        assert_error(adm.get(f"{DEPLOYMENTS}/{fleet.dep_b}/devices/{fleet.b_id}/log"), 404)
        assert_error(adm.get(f"{DEPLOYMENTS}/{fleet.dep_b}/devices/{fleet.a_id}/log"), 404)
        # B's secret configuration never reaches A
        r = adm.put(f"{CONFIG}/device/{fleet.b_id}", json={"B_ONLY": "b-secret-value", "_secrets": ["B_ONLY"]})
        assert r.status_code == 204, r.text
    r = a.http.get(f"{DEV}/deviceconfig/configuration", headers=a.headers)
    assert r.status_code == 200 and "B_ONLY" not in r.json() and b"b-secret-value" not in r.content
    r = fleet.b.http.get(f"{DEV}/deviceconfig/configuration", headers=fleet.b.headers)
    assert r.json()["B_ONLY"] == "b-secret-value"
    # a device token is not an admin token: B's log, deployment, devices are out of reach
    for path in (f"{DEPLOYMENTS}/{fleet.dep_b}", f"{DEPLOYMENTS}/{fleet.dep_b}/devices",
                 f"{DEPLOYMENTS}/{fleet.dep_b}/devices/{fleet.b_id}/log", f"{DEVAUTH}/{fleet.b_id}",
                 f"{CONFIG}/device/{fleet.b_id}", "/api/management/v1/inventory/devices"):
        assert_error(a.http.get(path, headers=a.headers), 401)
    # a token whose subject was changed to B's id does not verify
    header, claims, sig = a.token.split(".") if a.token else ("", "", "")
    doc = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    doc["sub"] = fleet.b_id
    tampered = ".".join([header, base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode(), sig])
    assert_error(a.http.get(f"{DEV}/deviceconfig/configuration", headers={"Authorization": f"Bearer {tampered}"}), 401)


# ---------------------------------------------------------------------------------------------------------
# Unaccepted devices


def test_unaccepted_devices_get_401_everywhere(server: Server, fleet: Fleet) -> None:
    pending = Device(server, "ec")
    assert_error(pending.auth(), 401)
    pending_id = pending.id()
    rejected = Device(server, "rsa")
    rejected_id = rejected.accept()
    rejected_token = rejected.token
    with server.admin() as adm:
        aid = adm.get(f"{DEVAUTH}/{rejected_id}").json()["auth_sets"][0]["id"]
        assert adm.put(f"{DEVAUTH}/{rejected_id}/auth/{aid}/status", json={"status": "rejected"}).status_code == 204
    gone = Device(server, "ec384")
    gone_id = gone.accept()
    gone_token = gone.token
    with server.admin() as adm:
        assert adm.delete(f"{DEVAUTH}/{gone_id}").status_code == 204
    assert_error(rejected.auth(), 401)
    tokens = {
        "pending (forged with the server key)": forged_token(server, pending_id),
        "rejected": rejected_token,
        "decommissioned": gone_token,
        "unknown device": forged_token(server, str(uuid.uuid4())),
        "expired": forged_token(server, fleet.a_id, exp=int(time.time()) - 5),
        "not a device token": forged_token(server, fleet.a_id, **{"mender.device": False}),
        "wrong issuer": forged_token(server, fleet.a_id, iss="someone"),
        "none": None,
    }
    with server.client() as c:
        for what, token in tokens.items():
            for method, path, body in device_calls(fleet.dep_a):
                r = call(c, method, path, body, token)
                assert r.status_code == 401, (what, method, path, r.status_code, r.text)
                assert_error(r, 401)
                assert r.headers.get("www-authenticate") == "Bearer", (what, path)
            # also with a broken body: credentials are checked first
            r = c.put(f"{DEV}/inventory/device/attributes", content=b"{not json",
                      headers={"Content-Type": "application/json",
                               **({"Authorization": f"Bearer {token}"} if token else {})})
            assert_error(r, 401)
    with server.admin() as adm:  # nothing was stored for them
        assert adm.get(f"{DEPLOYMENTS}/{fleet.dep_a}/devices").json()[0]["status"] in ("pending", "downloading")
        inv = adm.get(f"/api/management/v1/inventory/devices/{rejected_id}").json()
        assert not any(x["name"] == "k" for x in inv["attributes"]), inv


# ---------------------------------------------------------------------------------------------------------
# Oversized bodies


def _chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    yield b'{"messages": [{"timestamp": "t", "level": "info", "message": "'
    sent = 0
    while sent < total:
        yield b"x" * size
        sent += size
    yield b'"}]}'


def test_oversized_bodies_are_refused_and_the_server_stays_up(server: Server, fleet: Fleet) -> None:
    a = fleet.a
    big = json.dumps([{"name": "blob", "value": "x" * (50 << 20)}]).encode()
    headers = {**a.headers, "Content-Type": "application/json"}
    with server.client() as c:
        try:
            r = c.put(f"{DEV}/inventory/device/attributes", content=big, headers=headers)
            assert_error(r, 413, 400)
        except httpx.TransportError:
            pass  # the server answered 413 and closed while the client was still sending: also a refusal
    with server.client() as c:  # chunked: no Content-Length, refused while it streams
        try:
            r = c.put(f"{DEV}/deployments/device/deployments/{fleet.dep_a}/log", content=_chunks(50 << 20),
                      headers=headers)
            assert_error(r, 413, 400)
        except httpx.TransportError:
            pass
    with server.admin() as adm:
        try:
            r = adm.post(ANSIBLE, content=b"all:\n  vars:\n    X: " + b"y" * (50 << 20) + b"\n")
            assert_error(r, 413, 400)
        except httpx.TransportError:
            pass
        assert adm.get("/health").status_code == 200
        inv = adm.get(f"/api/management/v1/inventory/devices/{fleet.a_id}").json()
        assert not any(x["name"] == "blob" for x in inv["attributes"])
    # the server is up and the device carries on
    assert a.next().status_code in (200, 204)
    r = a.http.patch(f"{DEV}/inventory/device/attributes", headers=a.headers, json=[{"name": "after", "value": 1}])
    assert r.status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Malformed JSON, wrong content types


DEEP = b"[" * 100_000 + b"]" * 100_000
MALFORMED = [b"{", b"{'a': 1}", b'{"a": 1,}', b"\xff\xfe{}", b'{"a": "\xc3"}', DEEP, b"[" * 1000]


def test_malformed_json_is_a_400_with_a_message(server: Server, fleet: Fleet) -> None:
    a = fleet.a
    device_targets = [(m, p) for m, p, body in device_calls(fleet.dep_a) if body is not None]
    admin_targets = [("POST", DEVAUTH), ("PUT", f"{DEVAUTH}/{fleet.a_id}/auth/x/status"),
                     ("PUT", f"/api/management/v1/inventory/devices/{fleet.a_id}/group"),
                     ("PUT", f"{CONFIG}/device/{fleet.a_id}"), ("PUT", f"{CONFIG}/group/g1"),
                     ("POST", DEPLOYMENTS), ("PUT", f"{DEPLOYMENTS}/{fleet.dep_a}/status")]
    with server.client() as c:
        for body in MALFORMED:
            for method, path in device_targets:
                r = c.request(method, path, content=body, headers={**a.headers, "Content-Type": "application/json"})
                assert_error(r, 400)
            for method, path in admin_targets:
                r = c.request(method, path, content=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                                                    "Content-Type": "application/json"})
                assert_error(r, 400)
            r = c.post(AUTH, content=body, headers={"X-MEN-Signature": a.sign(body)})
            assert_error(r, 400 if len(body) <= UNAUTHENTICATED_BODY else 413)  # auth requests: 64 KiB at most
        r = c.put(f"{DEV}/inventory/device/attributes", content=b"{", headers={**a.headers, "Content-Type": "application/json"})
        assert "not valid JSON" in assert_error(r, 400)
        # JSON with the wrong shape
        for body in (b"null", b"[]", b"{}", b"1e999", b'"text"', b'{"device_provides": null}',
                     b'{"device_provides": {"device_type": 1, "artifact_name": "a"}}'):
            r = c.post(NEXT, content=body, headers={**a.headers, "Content-Type": "application/json"})
            assert_error(r, 400)
        r = c.put(f"{CONFIG}/group/g1", content=b'{"X": 1e999, "Y": NaN}',
                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert_error(r, 400, contains="finite")
        # YAML that is not an inventory, nested too deeply, or with a lone surrogate
        for body in (b"[" * 10_000 + b"]" * 10_000, b"a: [", b"- 1\n- 2\n", b'g1:\n  vars:\n    X: "\\ud800"\n',
                     b"\xff\xfe"):
            r = c.post(ANSIBLE, content=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert_error(r, 400)
    assert server.client().get("/health").status_code == 200


def test_wrong_content_types(server: Server, fleet: Fleet) -> None:
    a = fleet.a
    provides = json.dumps({"device_provides": {"device_type": "qemu-virt", "artifact_name": "old"}}).encode()
    with server.client() as c:
        for ctype in ("text/plain", "application/xml", "multipart/form-data; boundary=x",
                      "application/x-www-form-urlencoded"):
            r = c.post(NEXT, content=provides, headers={**a.headers, "Content-Type": ctype})
            assert_error(r, 400)
        # the artifact upload wants multipart with an 'artifact' file field
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for ctype, body in (("application/json", b'{"artifact": "x"}'), ("multipart/form-data", b"x"),
                            ("multipart/form-data; boundary=b", b"garbage"),
                            ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=\"artifact\""
                             b"; filename=\"a\"\r\n\r\nnot an artifact\r\n--b--\r\n"),
                            ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=\"other\""
                             b"\r\n\r\nx\r\n--b--\r\n"),
                            ("multipart/form-data; boundary=b", b"--b\r\n\r\n\r\n--b--\r\n")):
            r = c.post(ARTIFACTS, content=body, headers={**admin, "Content-Type": ctype})
            assert_error(r, 400)

        def garbage() -> Iterator[bytes]:  # chunked, without Content-Length
            yield b"--b\r\nContent-Disposition: form-data; name=\"artifact\"; filename=\"a.mender\"\r\n\r\n"
            for i in range(64):
                yield bytes([i]) * 4096
            yield b"\r\n--b--\r\n"

        r = c.post(ARTIFACTS, content=garbage(), headers={**admin, "Content-Type": "multipart/form-data; boundary=b"})
        assert "artifact rejected" in assert_error(r, 400)
        # the device auth request does not care about the content type, only the signed bytes
        r = c.post(AUTH, content=a.auth_body(), headers={"X-MEN-Signature": a.sign(a.auth_body()),
                                                          "Content-Type": "text/plain"})
        assert r.status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Unicode, NUL bytes and lone surrogates in identity data


@pytest.mark.parametrize("identity", [
    {"mac": "02:00:00:00:00:01", "name": "caméra-📷-\u202eevil\u202c", "empty": ""},
    {"mac": "nul\x00in\x00value", "ctrl": "\x01\x1f\x7f"},
    {"key\x00with nul": "x", "🔑": "✓"},
    {"serial": "A" * 1000, "nested": {"deep": [1, 2, {"x": None}]}, "n": 1.5, "b": True},
])
def test_unicode_and_nul_in_identity_round_trip(server: Server, identity: dict[str, Any]) -> None:
    identity = {**identity, "uid": uuid.uuid4().hex}
    dev = Device(server, "ec", identity=identity)
    device_id = dev.accept()
    with server.admin() as adm:
        doc = adm.get(f"{DEVAUTH}/{device_id}").json()
        assert doc["identity_data"] == identity
        inv = adm.get(f"/api/management/v1/inventory/devices/{device_id}")
        assert inv.status_code == 200
    assert dev.next().status_code in (200, 204)
    # preauthorizing the same identity again is a conflict, not a second device
    with server.admin() as adm:
        assert_error(adm.post(DEVAUTH, json={"identity_data": identity, "pubkey": dev.pubkey}), 409)


def test_invalid_identity_data_is_a_400(server: Server) -> None:
    dev = Device(server, "ec")
    lone = json.dumps({"mac": "x"}).replace('"x"', '"\\ud800"')
    too_big = json.dumps({"mac": "x" * (17 * 1024)})
    bodies = {
        "lone surrogate in a value": json.dumps({"id_data": lone, "pubkey": dev.pubkey}).encode(),
        "lone surrogate in a key": json.dumps({"id_data": '{"\\udfff": 1}', "pubkey": dev.pubkey}).encode(),
        "lone surrogate in the body": b'{"id_data": "{\\"mac\\": \\"\\ud800\\"}", "pubkey": ' + json.dumps(dev.pubkey).encode() + b"}",
        "id_data nested 20,000 deep": json.dumps({"id_data": "[" * 20_000 + "]" * 20_000, "pubkey": dev.pubkey}).encode(),
        "larger than 16 KiB": json.dumps({"id_data": too_big, "pubkey": dev.pubkey}).encode(),
        "not an object": json.dumps({"id_data": "[1]", "pubkey": dev.pubkey}).encode(),
        "NUL in the PEM": json.dumps({"id_data": '{"a": 1}', "pubkey": dev.pubkey.replace("\n", "\x00", 1)}).encode(),
    }
    with server.client() as c:
        for what, body in bodies.items():
            r = c.post(AUTH, content=body, headers={"X-MEN-Signature": dev.sign(body)})
            assert r.status_code == 400, (what, r.status_code, r.text)
            assert_error(r, 400)
    with server.admin() as adm:
        body = b'{"identity_data": {"\\ud800": "x"}, "pubkey": ' + json.dumps(dev.pubkey).encode() + b"}"
        assert_error(adm.post(DEVAUTH, content=body, headers={"Content-Type": "application/json"}), 400)
        r = adm.post(DEVAUTH, json={"identity_data": {"mac": "y" * (17 * 1024)}, "pubkey": dev.pubkey})
        assert_error(r, 400, contains="identity")
        # no device was created by any of this
        assert all(d["identity_data"].get("mac") not in ("x", "y" * (17 * 1024)) for d in adm.get(DEVAUTH).json())
    # lone surrogates anywhere else in a JSON body: 400, before anything is stored
    dev.identity = {"mac": f"ok-{uuid.uuid4().hex}"}
    dev.accept()
    for path, body in ((f"{DEV}/inventory/device/attributes", b'[{"name": "a", "value": "\\udc00"}]'),
                       (NEXT, b'{"device_provides": {"device_type": "qemu-virt", "artifact_name": "\\ud800"}}')):
        r = dev.http.request("PUT" if "inventory" in path else "POST", path, content=body,
                             headers={**dev.headers, "Content-Type": "application/json"})
        assert_error(r, 400, contains="unicode")
    with server.admin() as adm:
        r = adm.post(DEPLOYMENTS, content=b'{"name": "\\udc00", "artifact_name": "x", "all_devices": true}',
                     headers={"Content-Type": "application/json"})
        assert_error(r, 400, contains="unicode")
        assert adm.get(DEPLOYMENTS).status_code == 200
        assert adm.get("/api/management/v1/inventory/devices").status_code == 200
    # a surrogate *pair* (an emoji written as escapes) is fine
    r = dev.http.patch(f"{DEV}/inventory/device/attributes", content=b'[{"name": "e", "value": "\\ud83d\\udcf7"}]',
                       headers={**dev.headers, "Content-Type": "application/json"})
    assert r.status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Path traversal in ids


TRAVERSALS = ["..", "..%2F..%2Fserver-secrets.json", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "..\\..\\x",
              "a%00b", "%252e%252e%252f", "x" * 5000, "%F0%9F%93%B7", "%ff"]


def test_path_traversal_in_ids(server: Server, fleet: Fleet) -> None:
    secrets = (server.storage / "server-secrets.json").read_bytes()
    admin_paths = [f"{DEVAUTH}/{{}}", "/api/management/v1/inventory/devices/{}", f"{ARTIFACTS}/{{}}",
                   f"{DEPLOYMENTS}/{{}}", f"{DEPLOYMENTS}/{{}}/statistics", f"{DEPLOYMENTS}/{{}}/devices",
                   f"{DEPLOYMENTS}/{fleet.dep_a}/devices/{{}}/log", f"{CONFIG}/device/{{}}", f"{CONFIG}/group/{{}}"]
    with server.client() as c:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for bad in TRAVERSALS:
            for template in admin_paths:
                r = c.get(template.format(bad), headers=admin)
                assert 400 <= r.status_code < 500, (template, bad, r.status_code, r.text[:300])
                assert_error(r, r.status_code)
                assert b"jwt_key" not in r.content and secrets not in r.content
            for method in ("DELETE",):
                r = c.request(method, f"{ARTIFACTS}/{bad}", headers=admin)
                assert_error(r, 400, 404, 405)
            r = c.put(f"{CONFIG}/group/{bad}", json={"A": "b"}, headers=admin)
            assert_error(r, 400, 404, 405)
            r = c.get(f"{DEV}/download/{bad}?expires=9999999999&sig=00")
            assert_error(r, 403, 404)
            assert secrets not in r.content
            r = fleet.a.http.put(f"{DEV}/deployments/device/deployments/{bad}/status", headers=fleet.a.headers,
                                 json={"status": "downloading"})
            assert_error(r, 404, 405)
    with server.admin() as adm:  # nothing was created or deleted
        assert adm.get(f"{DEPLOYMENTS}/{fleet.dep_a}").status_code == 200
        assert len(adm.get(ARTIFACTS).json()) >= 1
        assert adm.get("/api/management/v1/inventory/groups").json() == sorted(adm.get("/api/management/v1/inventory/groups").json())


def test_unsatisfiable_range_is_a_json_error(server: Server, fleet: Fleet) -> None:
    r = fleet.a.next()
    assert r.status_code == 200, r.text
    uri = r.json()["artifact"]["source"]["uri"]
    with server.client() as c:
        size = int(c.head(uri).headers["content-length"])
        r = c.get(uri, headers={"Range": f"bytes={size + 10}-"})
        assert_error(r, 416, contains="range")
        assert r.headers["content-range"] == f"bytes */{size}"
        r = c.head(uri, headers={"Range": f"bytes={size + 10}-"})
        assert r.status_code == 416 and r.content == b""
        # a link for another artifact id, or a tampered one
        assert_error(c.get(uri.replace("sig=", "sig=0")), 403)
        assert_error(c.get(uri.split("?")[0]), 403)


# ---------------------------------------------------------------------------------------------------------
# The download link: no credentials, every query value and header from anyone


def test_hostile_download_links_are_403_never_500(server: Server, fleet: Fleet) -> None:
    """A non-ASCII ``sig`` used to reach ``hmac.compare_digest`` as a str: TypeError, 500 and a traceback."""
    r = fleet.a.next()
    assert r.status_code == 200, r.text
    uri = r.json()["artifact"]["source"]["uri"]
    path, query = uri.split("?", 1)
    params = dict(p.split("=", 1) for p in query.split("&"))
    expires, sig = params["expires"], params["sig"]
    bad_sigs = ["é", "é" * 64, "\u0663" * 64, "０" * 64, "%ff", "%ff" * 64, "%00" * 64, sig[:-1] + "g", sig + "0",
                sig[:-1], "%F0%9F%93%B7" * 16, "\\x00", "%C3%A9" + sig[1:], " " + sig, "null", "[]"]
    bad_expires = ["\u0661\u0662\u0663", "１２３", "1e9", "-1", "+" + expires, " " + expires, "9" * 5000,
                   "0x10", "%ff", "é", expires + ".0", "١" * 10]
    with server.client() as c:
        for bad in bad_sigs:
            r = c.get(f"{path}?expires={expires}&sig={bad}")
            assert_error(r, 403, contains="signature")
            r = c.head(f"{path}?expires={expires}&sig={bad}")
            assert r.status_code == 403, (bad, r.status_code)
        for bad in bad_expires:
            r = c.get(f"{path}?expires={bad}&sig={sig}")
            assert_error(r, 403)
        for bad in ("%ff", "é", "..", "x" * 5000, "%00"):  # another artifact id with this signature
            r = c.get(f"{DEV}/download/{bad}?expires={expires}&sig={sig}")
            assert_error(r, 403, 404)
        # repeated parameters, the signature in upper case (the same hex digits)
        assert c.get(f"{path}?expires={expires}&sig={sig}&sig=é").status_code == 403
        assert c.get(f"{path}?expires={expires}&sig={sig.upper()}").status_code == 200
        # hostile Range and If-Range headers on a good link: the whole file, a range, or a 416
        for rng in ("bytes=é-", "bytes=0-0,1-1", "bytes=-0", "bytes=99999999999999999999999999-", "bytes=5-1",
                    "bytes=\u0661-\u0662", "items=0-1", "bytes=" + "0-1," * 2000, "bytes=-99999999999999999999"):
            r = c.get(uri, headers={"Range": rng.encode()})
            assert r.status_code in (200, 206, 416), (rng, r.status_code, r.text[:200])
        for if_range in ('"nope"', "é", "Mon, 99 Foo 9999 99:99:99 GMT", 'W/"x"', '"' + "x" * 10_000 + '"'):
            r = c.get(uri, headers={"Range": "bytes=0-9", "If-Range": if_range.encode()})
            assert r.status_code in (200, 206), (if_range, r.status_code, r.text[:200])
        assert c.get(uri).status_code == 200
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


# ---------------------------------------------------------------------------------------------------------
# Numbers JSON does not have


NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-2E+400"]


def test_non_finite_numbers_are_a_400_and_never_stored(server: Server, fleet: Fleet) -> None:
    """Python's JSON parser takes NaN, Infinity and 1e999; JSON does not. They were stored (PostgreSQL refuses
    them: a 500 there) and came back as null."""
    a = fleet.a
    json_headers = {**a.headers, "Content-Type": "application/json"}
    dep = f"{DEV}/deployments/device/deployments/{fleet.dep_a}"
    with server.client() as c:
        for n in NON_FINITE:
            for method, path, body in (
                    ("PUT", f"{DEV}/inventory/device/attributes", b'[{"name": "nf", "value": %s}]' % n),
                    ("PATCH", f"{DEV}/inventory/device/attributes", b'[{"name": "nf", "value": [1, %s]}]' % n),
                    ("POST", NEXT, b'{"device_provides": {"device_type": "qemu-virt", "artifact_name": "old", "nf": %s}}' % n),
                    ("POST", f"{DEV}/deployments/device/deployments/next",
                     b'{"device_type": "qemu-virt", "artifact_name": "old", "nf": %s}' % n),
                    ("PUT", f"{dep}/log", b'{"messages": [{"timestamp": "t", "level": "info", "message": "m", "nf": %s}]}' % n)):
                r = c.request(method, path, content=body, headers=json_headers)
                assert_error(r, 400, contains="finite")
                r = c.request(method, path, content=body, headers={"Content-Type": "application/json"})
                assert_error(r, 401)  # credentials first
            r = c.post(DEVAUTH, content=b'{"identity_data": {"nf": %s}, "pubkey": "x"}' % n,
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
            assert_error(r, 400, contains="finite")
            r = c.post(AUTH, content=b'{"id_data": "{}", "pubkey": "x", "n": %s}' % n)
            assert_error(r, 400, contains="finite")
        # strings that spell them, and large finite numbers, are fine
        r = c.patch(f"{DEV}/inventory/device/attributes", headers=json_headers,
                    content=b'[{"name": "nf", "value": "NaN Infinity 1e999"}, {"name": "big", "value": 1.5e300}]')
        assert r.status_code == 200, r.text
    with server.admin() as adm:
        attrs = {x["name"]: x["value"] for x in adm.get(f"/api/management/v1/inventory/devices/{fleet.a_id}")
                 .json()["attributes"]}
    assert attrs["nf"] == "NaN Infinity 1e999" and attrs["big"] == 1.5e300, attrs
