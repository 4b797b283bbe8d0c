"""Zero-touch enrolment against the real server (SQLite and PostgreSQL): a device whose auth request carries a
device certificate of the fleet CA is accepted at once, with its staged configuration; every wrong certificate
is refused with its reason and leaves the device pending; revoking a certificate cuts the token of the device it
accepted. The attack stories are named as such."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ota_common.fleetca import FleetCA, cert_pem, make_fleet_ca

from .server_helpers import Device, Server
from .test_fleet_server import IMPORT, audit, fleet_cli

DEVICES = "/api/management/v2/devauth/devices"
REVOKED = "/api/management/v2/devauth/certificates/revoked"
DEVICE_CONFIG = "/api/devices/v1/deviceconfig/configuration"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FleetCA]:
    """The fleet CA the server trusts, and a look-alike (same name, its own key) it does not."""
    cas = {}
    for name in ("fleet", "other"):
        d = tmp_path_factory.mktemp(f"{name}-ca")
        make_fleet_ca(d)
        cas[name] = FleetCA(d)
    return cas


@pytest.fixture(scope="module")
def server(db_url: str | None, tmp_path_factory: pytest.TempPathFactory, fleet: dict[str, FleetCA]
           ) -> Iterator[Server]:
    ca_file = tmp_path_factory.mktemp("ca-file") / "fleet-ca.pem"
    ca_file.write_bytes(fleet["fleet"].cert_pem)
    s = Server(tmp_path_factory.mktemp("server"), "--fleet-ca", str(ca_file), db_url=db_url).start()
    yield s
    s.stop()


class CertDevice(Device):
    """A provisioned card: its identity carries its DEVICE_ID and its auth request the certificate."""

    def __init__(self, server: Server, device_id: str | None = None, cert: bytes | str | None = None) -> None:
        self.device_id = device_id or f"zt-{uuid.uuid4().hex[:8]}"
        super().__init__(server, identity={"device_id": self.device_id, "mac": f"02:00:{uuid.uuid4().hex[:8]}"})
        self.cert: bytes | str | None = cert

    def issue(self, ca: FleetCA, device_id: str | None = None, key: Any = None, **kw: Any) -> bytes:
        self.cert = cert_pem(ca.issue((key or self.key).public_key(), device_id or self.device_id, **kw))
        return self.cert

    def auth_body(self) -> bytes:
        doc = json.loads(super().auth_body())
        if self.cert is not None:
            doc["device_cert"] = self.cert.decode() if isinstance(self.cert, bytes) else self.cert
        return json.dumps(doc).encode()

    def record(self) -> dict[str, Any]:
        with self.server.admin() as a:
            found: dict[str, Any] = a.get(f"{DEVICES}/{self.id()}").json()
        return found


def refused(dev: CertDevice, reason: str) -> None:
    r = dev.auth()
    assert r.status_code == 401 and f"device certificate refused: {reason}" in r.json()["error"], r.text
    record = dev.record()
    assert record["status"] == "pending"
    assert [s["device_cert"]["refused"] for s in record["auth_sets"]] == [reason]
    with dev.server.admin() as a:  # the pending list says why
        pending = {d["id"]: d for d in a.get(DEVICES, params={"status": "pending"}).json()}
        page = a.get(f"/ui/devices/{record['id']}")
    assert pending[record["id"]]["auth_sets"][0]["device_cert"]["refused"] == reason
    assert page.status_code == 200 and f"refused: {reason}" in page.text  # and the dashboard's device page


def test_a_provisioned_device_is_accepted_at_once_with_its_staged_configuration(
        server: Server, fleet: dict[str, FleetCA]) -> None:
    dev = CertDevice(server)
    with server.admin() as a:
        r = a.post(IMPORT, json={"hosts": {dev.device_id: {"vars": {"DVR_IP": "10.20.0.1"}}}})
        assert [s["host"] for s in r.json()["staged"]] == [dev.device_id], r.text
    serial = format(x509.load_pem_x509_certificate(dev.issue(fleet["fleet"])).serial_number, "x")
    r = dev.auth()
    assert r.status_code == 200, r.text  # the token in the same request
    assert dev.http.get(DEVICE_CONFIG, headers=dev.headers).json() == {"DVR_IP": "10.20.0.1"}
    record = dev.record()
    assert record["status"] == "accepted"
    assert record["auth_sets"][0]["device_cert"] == {"serial": serial, "refused": None}
    assert dev.auth().status_code == 200 and dev.next().status_code == 204
    entries = [e for e in audit(server) if "accepted by fleet certificate" in e]
    assert len(entries) == 1, entries  # accepted once, not at every authentication
    assert entries[0].startswith(f"accepted by fleet certificate {serial} ({dev.device_id})")
    assert f"staged host {dev.device_id} applied" in entries[0]


def test_a_device_without_certificate_waits_for_an_administrator(server: Server) -> None:
    dev = CertDevice(server)
    r = dev.auth()
    assert r.status_code == 401 and "certificate" not in r.json()["error"]
    record = dev.record()
    assert record["status"] == "pending" and "device_cert" not in record["auth_sets"][0]


def test_an_expired_or_not_yet_valid_certificate_is_refused(server: Server, fleet: dict[str, FleetCA]) -> None:
    dev = CertDevice(server)
    dev.issue(fleet["fleet"], days=30, not_before=datetime.now(UTC) - timedelta(days=40))
    refused(dev, "expired")
    dev.issue(fleet["fleet"], days=30, not_before=datetime.now(UTC) + timedelta(days=1))
    refused(dev, "not yet valid")
    dev.issue(fleet["fleet"])  # a good one later: accepted then
    assert dev.auth().status_code == 200 and dev.record()["auth_sets"][0]["device_cert"]["refused"] is None


def test_attack_a_certificate_from_a_look_alike_ca_is_refused(server: Server, fleet: dict[str, FleetCA]) -> None:
    """Attack: a CA with the fleet CA's very name, made by someone else, vouches for their device."""
    dev = CertDevice(server)
    dev.issue(fleet["other"])
    refused(dev, "unknown issuer")


def test_attack_a_certificate_copied_from_a_card_is_refused(server: Server, fleet: dict[str, FleetCA]) -> None:
    """Attack: the certificate of a real card (not secret) sent with the attacker's own key and the card's id."""
    card = CertDevice(server)
    attacker = CertDevice(server, card.device_id, card.issue(fleet["fleet"]))
    attacker.identity = {"device_id": card.device_id, "mac": "02:00:de:ad:be:ef"}
    refused(attacker, "key mismatch")


def test_attack_a_certificate_of_another_device_id_is_refused(server: Server, fleet: dict[str, FleetCA]) -> None:
    """Attack: a provisioned card claims another DEVICE_ID (to get that device's configuration and secrets)."""
    dev = CertDevice(server)
    dev.issue(fleet["fleet"], device_id="someone-else")
    refused(dev, "identity mismatch")


def test_attack_the_fleet_ca_certificate_presented_as_the_devices(server: Server, fleet: dict[str, FleetCA]) -> None:
    """Attack: the fleet CA's own certificate (public, and 'issued by the fleet CA' since it is self-signed) sent
    as a device certificate: with the device's key, and even by someone holding the CA's key."""
    refused(CertDevice(server, cert=fleet["fleet"].cert_pem), "not a device certificate")
    ca_as_device = CertDevice(server, cert=fleet["fleet"].cert_pem)
    ca_as_device.key = fleet["fleet"].key  # the worst case: the request is signed with the CA's own key
    ca_as_device.pubkey = ca_as_device.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    refused(ca_as_device, "not a device certificate")


@pytest.mark.parametrize("garbage, reason", [
    ("hello", "malformed"), ("", "malformed"), ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                                                "malformed"), ("A" * 17_000, "too large"),
], ids=["text", "empty", "bad-der", "too-large"])
def test_garbage_is_refused(server: Server, garbage: str, reason: str) -> None:
    refused(CertDevice(server, cert=garbage), reason)


def test_a_device_cert_that_is_not_a_string_is_a_bad_request(server: Server) -> None:
    dev = CertDevice(server)
    body = json.dumps({"id_data": json.dumps(dev.identity), "pubkey": dev.pubkey, "device_cert": 42}).encode()
    r = dev.http.post("/api/devices/v1/authentication/auth_requests", content=body,
                      headers={"Content-Type": "application/json", "X-MEN-Signature": dev.sign(body)})
    assert r.status_code == 400 and "device_cert" in r.json()["error"]


def test_a_revoked_certificate_is_refused_said_once_and_may_still_be_accepted_by_hand(
        server: Server, fleet: dict[str, FleetCA]) -> None:
    dev = CertDevice(server)
    serial = x509.load_pem_x509_certificate(dev.issue(fleet["fleet"])).serial_number
    with server.admin() as a:
        r = a.post(REVOKED, json={"serial": ":".join(f"{serial:040x}"[i:i + 2] for i in range(0, 40, 2)).upper(),
                                  "reason": "card lost in transit"})
        assert r.status_code == 201, r.text
        assert r.json()["serial"] == format(serial, "x") and r.json()["rejected"] == []
        assert a.post(REVOKED, json={"serial": format(serial, "x")}).status_code == 200  # idempotent
        listed = [e for e in a.get(REVOKED).json() if e["serial"] == format(serial, "x")]
        assert len(listed) == 1 and listed[0]["reason"] == "card lost in transit"
        assert listed[0]["revoked_by"] == "bootstrap"  # the token's name
    refused(dev, "revoked")
    assert dev.auth().status_code == 401
    assert server.log_path.read_text().count(f"device certificate refused: revoked (certificate {serial:x}") == 1
    device_id = dev.id()
    aset = dev.record()["auth_sets"][0]["id"]
    with server.admin() as a:
        r = a.put(f"{DEVICES}/{device_id}/auth/{aset}/status", json={"status": "accepted"})
        assert r.status_code == 204
    assert dev.auth().status_code == 200


def test_revoking_an_accepted_devices_certificate_cuts_its_token(server: Server, fleet: dict[str, FleetCA],
                                                                tmp_path: Path) -> None:
    dev = CertDevice(server)
    cert_file = tmp_path / "device-cert.pem"
    cert_file.write_bytes(dev.issue(fleet["fleet"]))
    assert dev.auth().status_code == 200 and dev.next().status_code == 204
    done = fleet_cli(server, "revoke-cert", "--cert", cert_file, "--reason", "stolen")
    assert done.returncode == 0, done.stderr
    assert f"({dev.device_id})" in done.stdout and "rejected auth set" in done.stdout
    r = dev.next()
    assert r.status_code == 401, r.text  # the token of the accepted device, at its very next request
    assert dev.auth().status_code == 401 and dev.record()["status"] == "rejected"
    # the same key with a fresh certificate (a card re-provisioned, or the thief asking the CA again): refused
    dev.issue(fleet["fleet"])
    r = dev.auth()
    assert r.status_code == 401
    again = fleet_cli(server, "revoke-cert", "--cert", cert_file, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["rejected"] == []
    assert any(e.startswith("revoked device certificate") and "stolen" in e and dev.device_id in e
               for e in audit(server))
    bad = fleet_cli(server, "revoke-cert", "--serial", "not-hex")
    assert bad.returncode == 1 and "serial" in bad.stderr
    assert fleet_cli(server, "revoke-cert").returncode == 2


def test_revoking_a_preauthorized_key_by_certificate(server: Server, fleet: dict[str, FleetCA]) -> None:
    dev = CertDevice(server)
    pem = dev.issue(fleet["fleet"])
    dev.cert = None
    with server.admin() as a:
        assert a.post(DEVICES, json={"identity_data": dev.identity, "pubkey": dev.pubkey}).status_code == 201
        r = a.post(REVOKED, json={"certificate": pem.decode()})
        assert r.status_code == 201 and len(r.json()["rejected"]) == 1 and r.json()["device_id"] == dev.device_id
        for body in ({}, {"serial": "ab", "certificate": pem.decode()}, {"certificate": "junk"}, {"serial": "g1"},
                     {"serial": "ff" * 21}):
            assert a.post(REVOKED, json=body).status_code in (400, 422), body
    assert dev.auth().status_code == 401


def test_one_key_at_a_time_a_new_certified_key_replaces_the_old(server: Server, fleet: dict[str, FleetCA]) -> None:
    old = CertDevice(server)
    old.issue(fleet["fleet"])
    assert old.auth().status_code == 200
    new = CertDevice(server, old.device_id)
    new.identity = old.identity
    new.issue(fleet["fleet"])
    assert new.auth().status_code == 200
    assert old.next().status_code == 401 and new.next().status_code == 204
    statuses = sorted(s["status"] for s in new.record()["auth_sets"])
    assert statuses == ["accepted", "rejected"]


def test_without_a_fleet_ca_the_certificate_is_ignored(tmp_path: Path, fleet: dict[str, FleetCA],
                                                      run_cli: Callable[..., subprocess.CompletedProcess[str]]
                                                      ) -> None:
    s = Server(tmp_path / "server").start()
    try:
        dev = CertDevice(s)
        dev.issue(fleet["fleet"])
        r = dev.auth()
        assert r.status_code == 401 and "certificate" not in r.json()["error"]
        assert "device_cert" not in dev.record()["auth_sets"][0]
    finally:
        s.stop()
    device_key = ec.generate_private_key(ec.SECP256R1())
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(cert_pem(fleet["fleet"].issue(device_key.public_key(), "cam-1")))
    for path, message in ((tmp_path / "none.pem", "fleet CA file not found"), (leaf, "is not a CA certificate")):
        p = run_cli("server", "--storage", tmp_path / "st", "--fleet-ca", path)
        assert p.returncode == 2 and p.stderr.startswith("error: --fleet-ca (or OTA_FLEET_CA): "), p.stderr
        assert message in p.stderr and len(p.stderr.splitlines()) == 1
