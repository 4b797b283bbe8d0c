"""Bulk provisioning against the real server (SQLite and PostgreSQL): the cards' devices are preauthorized with their
keys, groups and variables in one call, so a card's first auth request is accepted at once with its configuration;
a re-provisioned device (new card, new key) retires the old card, an accepted one included; a bad item is refused
with its index and nothing is written."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .server_helpers import Device, Server

PROVISION = "/api/management/v2/devauth/devices/provision"
DEVAUTH = "/api/management/v2/devauth/devices"
DEVICE_CONFIG = "/api/devices/v1/deviceconfig/configuration"
CONFIG = "/api/management/v1/deviceconfig/configurations"
AUDIT = "/api/management/v1/audit"


def card(server: Server, device_id: str) -> Device:
    """A provisioned card's device: an ed25519 key made on the host, identity ``{"device_id": ID}``."""
    return Device(server, "ed25519", identity={"device_id": device_id})


def item(dev: Device, group: str | None = None, variables: dict[str, Any] | None = None,
         secrets: list[str] | None = None) -> dict[str, Any]:
    return {"identity_data": dev.identity, "pubkey": dev.pubkey, "group": group, "variables": variables or {},
            "secrets": secrets or []}


def provision(server: Server, *items: dict[str, Any]) -> Any:
    with server.admin() as a:
        return a.post(PROVISION, json={"devices": list(items)})


def count_devices(server: Server) -> int:
    return int(server.query("SELECT count(*) FROM devices")[0][0])


def test_provisioned_cards_are_accepted_at_first_boot_with_their_configuration(server: Server) -> None:
    north1, north2, loner = card(server, "prov-north-01"), card(server, "prov-north-02"), card(server, "prov-loner")
    r = provision(server,
                  item(north1, "prov_north", {"DEVICE_ID": "prov-north-01", "DVR_IP": "10.1.0.1",
                                              "DVR_PASSWORD": "pw-north-1", "PORT": 554, "DEBUG": False},
                       ["DVR_PASSWORD"]),
                  item(north2, "prov_north", {"DEVICE_ID": "prov-north-02", "DVR_IP": "10.1.0.2"}),
                  item(loner))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["provisioned"] == 3 and len(answer["ids"]) == 3
    assert [d["result"] for d in answer["devices"]] == ["new", "new", "new"]
    assert [d["device_id"] for d in answer["devices"]] == ["prov-north-01", "prov-north-02", "prov-loner"]
    assert north1.id() == answer["ids"][0]

    # no administrator step: the first auth request is accepted
    for dev in (north1, north2, loner):
        assert dev.auth().status_code == 200
    assert north1.http.get(DEVICE_CONFIG, headers=north1.headers).json() == {
        "DEVICE_ID": "prov-north-01", "DVR_IP": "10.1.0.1", "DVR_PASSWORD": "pw-north-1", "PORT": "554",
        "DEBUG": "false"}
    assert loner.http.get(DEVICE_CONFIG, headers=loner.headers).json() == {}
    assert b"pw-north-1" not in server.stored_bytes()  # the secret is stored encrypted
    with server.admin() as a:
        doc = a.get(f"{CONFIG}/device/{answer['ids'][0]}").json()
        assert doc["group"] == "prov_north" and doc["secrets"] == ["DVR_PASSWORD"]
        assert a.get(f"{DEVAUTH}/{answer['ids'][2]}").json()["status"] == "accepted"
        summaries = [e["summary"] for e in a.get(AUDIT, params={"limit": 20}).json()]
    assert any(f"provisioned device {answer['ids'][0]} (device_id prov-north-01; new; group prov_north; variables: "
               "DEBUG, DEVICE_ID, DVR_IP, DVR_PASSWORD, PORT; secret: DVR_PASSWORD)" in s for s in summaries)
    assert not any("pw-north-1" in s for s in summaries)


def test_reprovisioning_retires_the_old_card_even_an_accepted_one(server: Server) -> None:
    old = card(server, "prov-replaced")
    assert provision(server, item(old, "prov_a", {"DVR_IP": "10.2.0.1"})).status_code == 200
    assert old.auth().status_code == 200
    device_id = old.id()

    # the same key again (a batch sent twice): nothing changes, the card stays accepted
    again = provision(server, item(old, "prov_a", {"DVR_IP": "10.2.0.1"}))
    assert again.json()["devices"][0]["result"] == "key unchanged"
    assert old.http.get(DEVICE_CONFIG, headers=old.headers).status_code == 200

    # a new card for the same device: the old card's token and key stop working at once
    new = card(server, "prov-replaced")
    r = provision(server, item(new, "prov_b", {"DVR_IP": "10.2.0.2"}))
    assert r.status_code == 200, r.text
    assert r.json()["devices"][0] == {"id": device_id, "device_id": "prov-replaced", "result": "key replaced",
                                      "group": "prov_b"}
    assert old.http.get(DEVICE_CONFIG, headers=old.headers).status_code == 401
    assert old.auth().status_code == 401
    assert new.auth().status_code == 200
    assert new.http.get(DEVICE_CONFIG, headers=new.headers).json() == {"DVR_IP": "10.2.0.2"}
    with server.admin() as a:
        doc = a.get(f"{DEVAUTH}/{device_id}").json()
    assert doc["status"] == "accepted"
    assert sorted(s["status"] for s in doc["auth_sets"]) == ["accepted", "rejected"]
    assert old.auth().status_code == 401  # and it stays out


def test_a_key_pending_before_provisioning_is_rejected(server: Server) -> None:
    squatter = card(server, "prov-squatted")  # someone asked first with this identity
    assert squatter.auth().status_code == 401
    real = card(server, "prov-squatted")
    assert provision(server, item(real)).status_code == 200
    assert real.auth().status_code == 200
    assert squatter.auth().status_code == 401


def _pem() -> str:
    return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.mark.parametrize(("bad", "message"), [
    ({"pubkey": "not a key"}, "item 1 (prov-bad-1): pubkey is not a PEM public key"),
    ({"identity_data": {"device_id": "-bad"}}, "item 1: identity_data.device_id must be a DEVICE_ID"),
    ({"identity_data": {"mac": "02:00:00:00:00:01"}}, "item 1: identity_data.device_id must be a DEVICE_ID"),
    ({"variables": {"DVR IP": "x"}}, "item 1 (prov-bad-1): invalid variable name 'DVR IP'"),
    ({"variables": {"A": [1]}}, "item 1 (prov-bad-1): value of A must be a string, number or boolean"),
    ({"variables": {"A": "1"}, "secrets": ["B"]}, "item 1 (prov-bad-1): _secrets names variables that are not set: B"),
    ({"group": "../north"}, "item 1 (prov-bad-1): invalid group name"),
    ({"extra": 1}, "item 1: extra: Extra inputs are not permitted"),
    ({"identity_data": {"device_id": "prov-bad-0"}}, "item 1 (prov-bad-0): the same identity as item 0"),
])
def test_a_bad_item_is_refused_with_its_index_and_nothing_is_written(server: Server, bad: dict[str, Any],
                                                                     message: str) -> None:
    good = {"identity_data": {"device_id": "prov-bad-0"}, "pubkey": _pem(), "group": "g", "variables": {"X": "1"},
            "secrets": []}
    second = {**good, "identity_data": {"device_id": "prov-bad-1"}, "pubkey": _pem(), **bad}
    before = count_devices(server)
    r = provision(server, good, second)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(message), r.json()["error"]
    assert count_devices(server) == before


def test_refusals_of_the_whole_call(server: Server) -> None:
    before = count_devices(server)
    one = {"identity_data": {"device_id": "prov-x"}, "pubkey": _pem()}
    with server.admin() as a:
        for body, message in (([], 'the body must be {"devices": [...]}'),
                              ({"devices": []}, "give 1 to 1000 devices per call, not 0"),
                              ({"devices": [one] * 1001}, "give 1 to 1000 devices per call, not 1001"),
                              ({"devices": [one], "more": 1}, 'the body must be')):
            r = a.post(PROVISION, json=body)
            assert r.status_code == 400 and r.json()["error"].startswith(message), r.text
        r = a.post(PROVISION, content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        # a key that belongs to another device: refused (a key is one device's)
        taken = card(server, "prov-key-owner")
        assert a.post(PROVISION, json={"devices": [item(taken)]}).status_code == 200
        thief = {"identity_data": {"device_id": "prov-key-thief"}, "pubkey": taken.pubkey}
        r = a.post(PROVISION, json={"devices": [{**one, "identity_data": {"device_id": "prov-ok"}}, thief]})
        assert r.status_code == 400 and r.json()["error"].startswith(
            "item 1 (prov-key-thief): this public key belongs to another device"), r.text
    assert count_devices(server) == before + 1  # only prov-key-owner
    with server.client() as c:
        assert c.post(PROVISION, json={"devices": [one]}).status_code == 401
