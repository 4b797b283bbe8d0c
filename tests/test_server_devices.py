"""Update server, device side: signed auth requests (RSA, ECDSA, ed25519), acceptance, preauthorization,
decommissioning, tokens, inventory, chunked bodies, restart. The tests on the ``server`` fixture run on SQLite and
on PostgreSQL (tests/conftest.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest

from .server_helpers import Device, Server

NEXT = "/api/devices/v2/deployments/device/deployments/next"
DEVAUTH = "/api/management/v2/devauth/devices"


@pytest.mark.parametrize("kind", ["rsa", "ec", "ec384", "ed25519"])
def test_unknown_device_is_pending_until_accepted(server: Server, kind: str) -> None:
    dev = Device(server, kind)
    r = dev.auth()
    assert r.status_code == 401 and "error" in r.json()
    device_id = dev.id()
    with server.admin() as a:
        d = a.get(f"{DEVAUTH}/{device_id}").json()
        assert d["status"] == "pending" and d["identity_data"] == dev.identity
        (aset,) = d["auth_sets"]
        assert aset["status"] == "pending" and aset["identity_data"] == dev.identity and "BEGIN PUBLIC KEY" in aset["pubkey"]
        assert {"created_ts", "updated_ts"} <= set(d)
        assert any(x["id"] == device_id for x in a.get(DEVAUTH, params={"status": "pending"}).json())
    assert dev.auth().status_code == 401  # asking again changes nothing
    with server.admin() as a:
        assert len(a.get(f"{DEVAUTH}/{device_id}").json()["auth_sets"]) == 1
        assert a.put(f"{DEVAUTH}/{device_id}/auth/{aset['id']}/status", json={"status": "accepted"}).status_code == 204
    r = dev.auth()
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/jwt")
    claims = jwt.decode(r.text, options={"verify_signature": False})
    assert claims["sub"] == device_id and claims["exp"] > time.time()
    assert dev.next().status_code == 204


def test_bad_signatures_and_malformed_requests(server: Server) -> None:
    dev, other = Device(server, "ec"), Device(server, "rsa")
    body = dev.auth_body()
    url = "/api/devices/v1/authentication/auth_requests"
    c = server.client()
    assert c.post(url, content=body, headers={"X-MEN-Signature": other.sign(body)}).status_code == 401
    assert c.post(url, content=body).status_code == 401
    assert c.post(url, content=body, headers={"X-MEN-Signature": "%%%"}).status_code == 401
    tampered = body.replace(b"whatever", b"whatevex")
    assert c.post(url, content=tampered, headers={"X-MEN-Signature": dev.sign(body)}).status_code == 401
    # a raw r||s ECDSA signature is not what the Mender client sends: DER only
    import base64

    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    r_, s_ = decode_dss_signature(base64.b64decode(dev.sign(body)))
    raw = base64.b64encode(r_.to_bytes(32, "big") + s_.to_bytes(32, "big")).decode()
    assert c.post(url, content=body, headers={"X-MEN-Signature": raw}).status_code == 401
    for bad, msg in ((b"{", "JSON"), (b"[]", "object"), (json.dumps({"id_data": {"a": 1}, "pubkey": dev.pubkey}).encode(), "id_data"),
                     (json.dumps({"id_data": "{}", "pubkey": dev.pubkey}).encode(), "id_data"),
                     (json.dumps({"id_data": '{"a":1}', "pubkey": "nope"}).encode(), "pubkey")):
        r = c.post(url, content=bad, headers={"X-MEN-Signature": dev.sign(bad)})
        assert r.status_code == 400 and msg in r.json()["error"], (bad, r.text)
    with server.admin() as a:  # none of these created a device
        assert all(d["identity_data"] != dev.identity for d in a.get(DEVAUTH).json())


def test_preauthorized_device_is_accepted_at_first_request(server: Server) -> None:
    dev = Device(server, "ed25519")
    with server.admin() as a:
        r = a.post(DEVAUTH, json={"identity_data": dev.identity, "pubkey": dev.pubkey})
        assert r.status_code == 201 and r.headers["Location"].startswith(DEVAUTH + "/")
        device_id = r.headers["Location"].rsplit("/", 1)[1]
        assert a.get(f"{DEVAUTH}/{device_id}").json()["status"] == "preauthorized"
        assert a.post(DEVAUTH, json={"identity_data": dev.identity, "pubkey": dev.pubkey}).status_code == 409
        assert a.post(DEVAUTH, json={"identity_data": {"x": 1}, "pubkey": "junk"}).status_code == 400
        assert a.post(DEVAUTH, json={"identity_data": {}, "pubkey": dev.pubkey}).status_code == 400
    # another key with the same identity is not the preauthorized one
    impostor = Device(server, "ec", identity=dev.identity)
    assert impostor.auth().status_code == 401
    assert dev.auth().status_code == 200
    with server.admin() as a:
        d = a.get(f"{DEVAUTH}/{device_id}").json()
        assert d["status"] == "accepted"
        assert sorted(s["status"] for s in d["auth_sets"]) == ["accepted", "pending"]


def test_tokens_refused_when_missing_bad_expired_rejected_or_decommissioned(server: Server) -> None:
    dev = Device(server, "ec")
    device_id = dev.accept()
    c = server.client()
    body = {"device_provides": {"device_type": "qemu-virt", "artifact_name": "a"}}
    assert c.post(NEXT, json=body).status_code == 401
    assert c.post(NEXT, json=body, headers={"Authorization": "Bearer junk"}).status_code == 401
    forged = jwt.encode({"sub": device_id, "exp": int(time.time()) + 60, "iss": "vv-ota", "mender.device": True},
                        "not-the-key-but-32-bytes-long-xxxxxx", algorithm="HS256")
    assert c.post(NEXT, json=body, headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    import base64
    key = base64.b64decode(server.secrets()["jwt_key"])
    expired = jwt.encode({"sub": device_id, "exp": int(time.time()) - 5, "iss": "vv-ota", "mender.device": True},
                         key, algorithm="HS256")
    r = c.post(NEXT, json=body, headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401 and "expired" in r.json()["error"]
    assert dev.next().status_code == 204
    with server.admin() as a:
        aid = a.get(f"{DEVAUTH}/{device_id}").json()["auth_sets"][0]["id"]
        assert a.put(f"{DEVAUTH}/{device_id}/auth/{aid}/status", json={"status": "rejected"}).status_code == 204
        assert dev.next().status_code == 401
        assert dev.auth().status_code == 401
        assert a.put(f"{DEVAUTH}/{device_id}/auth/{aid}/status", json={"status": "accepted"}).status_code == 204
        assert dev.next().status_code == 401  # accepted again: the token of before stays revoked
        assert dev.auth().status_code == 200 and dev.next().status_code == 204  # a new one works
        assert a.put(f"{DEVAUTH}/{device_id}/auth/{aid}/status", json={"status": "bogus"}).status_code == 400
        assert a.put(f"{DEVAUTH}/{device_id}/auth/nope/status", json={"status": "accepted"}).status_code == 404
        assert a.delete(f"{DEVAUTH}/{device_id}").status_code == 204
        assert a.get(f"{DEVAUTH}/{device_id}").status_code == 404
        assert a.delete(f"{DEVAUTH}/{device_id}").status_code == 404
    assert dev.next().status_code == 401
    assert dev.status("x", "downloading").status_code == 401
    r = c.get("/api/devices/v1/deviceconfig/configuration", headers=dev.headers)
    assert r.status_code == 401
    # it may ask again: it is a new, pending device
    assert dev.auth().status_code == 401
    assert dev.id() != device_id


def device_requests(dev: Device) -> dict[str, int]:
    """The status of every authenticated device request with the device's current token (no deployment:
    a valid token gets 204 on next, 404 on status and log, 200 on inventory and configuration)."""
    c, h = dev.http, dev.headers
    dep = "/api/devices/v1/deployments/device/deployments/00000000-0000-0000-0000-000000000000"
    return {
        "next v2": dev.next().status_code,
        "next v1": c.post("/api/devices/v1/deployments/device/deployments/next", headers=h,
                          json={"device_provides": {"device_type": "qemu-virt", "artifact_name": "old"}}).status_code,
        "next v1 GET": c.get("/api/devices/v1/deployments/device/deployments/next", headers=h,
                             params={"artifact_name": "old", "device_type": "qemu-virt"}).status_code,
        "status": c.put(f"{dep}/status", headers=h, json={"status": "downloading"}).status_code,
        "log": c.put(f"{dep}/log", headers=h, json={"messages": [
            {"timestamp": "2026-01-01T00:00:00Z", "level": "info", "message": "x"}]}).status_code,
        "inventory PUT": c.put("/api/devices/v1/inventory/device/attributes", headers=h,
                               json=[{"name": "k", "value": "v"}]).status_code,
        "inventory PATCH": c.patch("/api/devices/v1/inventory/device/attributes", headers=h,
                                   json=[{"name": "k", "value": "v"}]).status_code,
        "deviceconfig": c.get("/api/devices/v1/deviceconfig/configuration", headers=h).status_code,
    }


VALID = {"next v2": 204, "next v1": 204, "next v1 GET": 204, "status": 404, "log": 404, "inventory PUT": 200,
         "inventory PATCH": 200, "deviceconfig": 200}
REVOKED = dict.fromkeys(VALID, 401)


def test_device_tokens_bound_to_their_auth_set(server: Server) -> None:
    """A token is valid only while the auth set it was issued for is the device's accepted one, and only until
    that set is accepted again: rejecting, replacing (accepting another key) and decommissioning end it at the
    very next request, on every device route (the FastPoll shortcut included)."""
    old = Device(server, "ec")
    device_id = old.accept()
    assert device_requests(old) == VALID
    assert device_requests(old) == VALID  # the second idle poll goes through FastPoll
    # a new key for the same identity is only pending: the accepted key's token keeps working
    new = Device(server, "ed25519", identity=old.identity)
    assert new.auth().status_code == 401
    assert device_requests(old) == VALID
    # replaced: accepting the new key rejects the old one, and its token is refused at once
    with server.admin() as a:
        sets = {s["pubkey"]: s["id"] for s in a.get(f"{DEVAUTH}/{device_id}").json()["auth_sets"]}
        new_set = sets[new.pubkey]
        r = a.put(f"{DEVAUTH}/{device_id}/auth/{new_set}/status", json={"status": "accepted"})
        assert r.status_code == 204
    r = old.next()
    assert r.status_code == 401 and "revoked" in r.json()["error"]
    assert device_requests(old) == REVOKED
    assert new.auth().status_code == 200 and device_requests(new) == VALID
    assert old.auth().status_code == 401  # its set is rejected: no new token either
    # rejected: the new key's token ends at once; accepting it again does not revive that token
    kept = new.token
    with server.admin() as a:
        assert a.put(f"{DEVAUTH}/{device_id}/auth/{new_set}/status", json={"status": "rejected"}).status_code == 204
    assert device_requests(new) == REVOKED
    with server.admin() as a:
        assert a.put(f"{DEVAUTH}/{device_id}/auth/{new_set}/status", json={"status": "accepted"}).status_code == 204
    assert device_requests(new) == REVOKED
    assert new.auth().status_code == 200 and new.token != kept and device_requests(new) == VALID
    # back to pending: refused too
    with server.admin() as a:
        assert a.put(f"{DEVAUTH}/{device_id}/auth/{new_set}/status", json={"status": "pending"}).status_code == 204
    assert device_requests(new) == REVOKED
    with server.admin() as a:
        assert a.put(f"{DEVAUTH}/{device_id}/auth/{new_set}/status", json={"status": "accepted"}).status_code == 204
    assert new.auth().status_code == 200 and device_requests(new) == VALID
    # decommissioned: refused at once
    with server.admin() as a:
        assert a.delete(f"{DEVAUTH}/{device_id}").status_code == 204
    assert device_requests(new) == REVOKED


def test_device_token_lifetime_is_configurable(tmp_path: Path) -> None:
    s = Server(tmp_path, "--device-token-ttl", "2").start()
    try:
        dev = Device(s, "ec")
        dev.accept()
        claims = jwt.decode(dev.token or "", options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 2
        assert dev.next().status_code == 204
        time.sleep(3.1)
        r = dev.next()
        assert r.status_code == 401 and "expired" in r.json()["error"]
        assert dev.auth().status_code == 200 and dev.next().status_code == 204
    finally:
        s.stop()


def test_admin_token_required(server: Server) -> None:
    c = server.client()
    for path in (DEVAUTH, "/api/management/v1/inventory/devices", "/api/management/v1/deployments/deployments",
                 "/api/management/v1/deployments/artifacts"):
        r = c.get(path)
        assert r.status_code == 401 and r.json()["error"]
        assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    dev = Device(server)
    dev.accept()
    assert c.get(DEVAUTH, headers=dev.headers).status_code == 401  # a device token is not an admin token


def test_inventory_put_patch_and_provides(server: Server) -> None:
    dev = Device(server)
    device_id = dev.accept()
    url = "/api/devices/v1/inventory/device/attributes"
    c = dev.http
    r = c.put(url, headers=dev.headers, json=[{"name": "kernel", "value": "6.1"}, {"name": "ips", "value": ["10.0.0.2", "fe80::1"]}])
    assert r.status_code == 200
    assert c.patch(url, headers=dev.headers, json=[{"name": "mem_total_kB", "value": 1024}]).status_code == 200
    with server.admin() as a:
        doc = a.get(f"/api/management/v1/inventory/devices/{device_id}").json()
    inv = {x["name"]: x["value"] for x in doc["attributes"] if x["scope"] == "inventory"}
    assert inv == {"kernel": "6.1", "ips": ["10.0.0.2", "fe80::1"], "mem_total_kB": 1024}
    ident = {x["name"]: x["value"] for x in doc["attributes"] if x["scope"] == "identity"}
    assert ident["mac"] == dev.identity["mac"] and ident["status"] == "accepted"
    assert c.put(url, headers=dev.headers, json=[{"name": "kernel", "value": "6.6"}]).status_code == 200
    assert dev.next(artifact_name="vv-1.0", device_type="rpi4", **{"rootfs-image.version": "1.0"}).status_code == 204
    with server.admin() as a:
        doc = a.get(f"/api/management/v1/inventory/devices/{device_id}").json()
        listed = a.get("/api/management/v1/inventory/devices").json()
    inv = {x["name"]: x["value"] for x in doc["attributes"] if x["scope"] == "inventory"}
    assert inv == {"kernel": "6.6", "artifact_name": "vv-1.0", "device_type": "rpi4", "rootfs-image.version": "1.0"}
    assert any(d["id"] == device_id for d in listed)
    for bad in ({"name": "x"}, [{"name": "", "value": 1}], [{"name": "x", "value": {"a": 1}}], "nope"):
        r = c.put(url, headers=dev.headers, json=bad)
        assert r.status_code == 400 and r.json()["error"].startswith("invalid request"), r.text
    assert c.put(url, headers={"Authorization": "Bearer x"}, json=[]).status_code == 401


def test_chunked_request_bodies_are_accepted(server: Server) -> None:
    dev = Device(server, "rsa")
    body = dev.auth_body()

    def chunks():  # httpx sends an iterator with Transfer-Encoding: chunked
        for i in range(0, len(body), 100):
            yield body[i:i + 100]

    r = dev.http.post("/api/devices/v1/authentication/auth_requests", content=chunks(),
                      headers={"X-MEN-Signature": dev.sign(body), "Content-Type": "application/json"})
    assert r.status_code == 401  # now pending
    dev.accept()
    payload = json.dumps({"device_provides": {"device_type": "qemu-virt", "artifact_name": "a"}}).encode()
    r = dev.http.post(NEXT, content=iter([payload[:10], payload[10:]]),
                      headers={**dev.headers, "Content-Type": "application/json"})
    assert r.status_code == 204
    r = dev.http.patch("/api/devices/v1/inventory/device/attributes", headers={**dev.headers, "Content-Type": "application/json"},
                       content=iter([b'[{"name": "chunked", ', b'"value": "yes"}]']))
    assert r.status_code == 200


def test_oversized_body_refused(server: Server) -> None:
    dev = Device(server)
    dev.accept()
    big = b"[" + b'{"name": "x", "value": "' + b"a" * (17 * 1024 * 1024) + b'"}]'
    r = dev.http.put("/api/devices/v1/inventory/device/attributes", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                     headers={**dev.headers, "Content-Type": "application/json"})
    assert r.status_code == 413 and "larger" in r.json()["error"]


def test_restart_keeps_state(tmp_path: Path) -> None:
    s = Server(tmp_path).start()
    try:
        dev = Device(s, "ec")
        device_id = dev.accept()
        token = dev.token
    finally:
        assert s.stop() == 0  # SIGTERM is a clean exit
    s2 = Server(tmp_path)
    s2.port, s2.url = s.port, s.url
    s2.start()
    try:
        dev.server = s2
        assert dev.token == token and dev.next().status_code == 204  # same JWT key after restart
        with s2.admin() as a:
            assert a.get(f"{DEVAUTH}/{device_id}").json()["status"] == "accepted"
    finally:
        s2.stop()


def test_an_accepted_device_whose_new_image_adds_an_identity_attribute_stays_the_same_device(server: Server) -> None:
    """Images from issue 15 on send ``device_id`` besides ``mac``: an accepted device that updates to one must stay
    the same, accepted device (else its trial boot meets a 401 and rolls back). Only its accepted key can grow its
    identity, and only by adding attributes."""
    dev = Device(server, "ed25519", identity={"mac": f"02:00:{time.time_ns() % 10**8:08d}"[:17]})
    dev.auth()
    device_id = dev.id()
    with server.admin() as a:
        (aset,) = a.get(f"{DEVAUTH}/{device_id}").json()["auth_sets"]
        assert a.put(f"{DEVAUTH}/{device_id}/auth/{aset['id']}/status", json={"status": "accepted"}).status_code == 204
    old = dict(dev.identity)
    grown = {**old, "device_id": "mac-" + old["mac"].replace(":", "")}

    # attack: another key claims the grown identity: a new pending device, the accepted one untouched
    thief = Device(server, "ed25519", identity=grown)
    assert thief.auth().status_code == 401
    # attack: the accepted key, but an attribute changed (not grown): a new pending device
    changed = Device(server, "ed25519", identity={"mac": "02:00:00:00:00:99", "device_id": "x"})
    changed.key, changed.pubkey = dev.key, dev.pubkey
    assert changed.auth().status_code == 401
    with server.admin() as a:
        assert a.get(f"{DEVAUTH}/{device_id}").json()["identity_data"] == old
        thief_id, changed_id = thief.id(), changed.id()
        assert a.get(f"{DEVAUTH}/{thief_id}").json()["status"] == "pending" and thief_id != device_id
        assert changed_id != device_id
        assert a.delete(f"{DEVAUTH}/{thief_id}").status_code == 204  # the grown identity is free again

    dev.identity = grown
    r = dev.auth()
    assert r.status_code == 200, r.text
    assert jwt.decode(r.text, options={"verify_signature": False})["sub"] == device_id
    assert dev.next().status_code == 204
    with server.admin() as a:
        d = a.get(f"{DEVAUTH}/{device_id}").json()
        assert d["status"] == "accepted" and d["identity_data"] == grown
        entries = a.get("/api/management/v1/audit").json()
    assert any(f"identity of device {device_id} extended with device_id" in e["summary"] for e in entries)
