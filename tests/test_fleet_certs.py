"""Device certificates of the fleet enrolment CA (:func:`ota_common.fleetca.verify_device_cert`): the good case,
and one refusal per way a certificate can be wrong, each with its machine-usable reason."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ota_common.errors import OTAError, UserError
from ota_common.fleetca import (
    URN_PREFIX,
    CertificateRefused,
    FleetCA,
    cert_pem,
    load_fleet_cas,
    make_fleet_ca,
    verify_device_cert,
)

DEVICE_ID = "cam-0001"


def spki(key: Any) -> bytes:
    return bytes(key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    d = tmp_path_factory.mktemp("fleet-ca")
    make_fleet_ca(d)
    return FleetCA(d)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    """A CA with the very same name as the fleet's, and its own key."""
    d = tmp_path_factory.mktemp("other-ca")
    make_fleet_ca(d)
    return FleetCA(d)


@pytest.fixture(scope="module")
def device_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def leaf(ca: FleetCA, key: Any, *, cn: str = DEVICE_ID, urn: str | None = URN_PREFIX + DEVICE_ID,
         is_ca: bool = False, eku: bool = True, digital_signature: bool = True) -> bytes:
    """A certificate made by hand (not by :meth:`FleetCA.issue`) to get each property wrong on its own."""
    start = datetime.now(UTC) - timedelta(minutes=5)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(start + timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False, key_agreement=False,
                                      key_cert_sign=is_ca, crl_sign=False, encipher_only=False,
                                      decipher_only=False), critical=True))
    if urn is not None:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(urn)]), critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return cert_pem(b.sign(ca.key, hashes.SHA256()))


def refused(pem: bytes, ca: FleetCA, key: Any, device_id: str = DEVICE_ID, now: datetime | None = None,
            cas: list[x509.Certificate] | None = None) -> str:
    with pytest.raises(CertificateRefused) as e:
        verify_device_cert(pem, [ca.cert] if cas is None else cas, spki(key), device_id, now or datetime.now(UTC))
    assert str(e.value) == f"device certificate refused: {e.value.reason}"
    assert isinstance(e.value, OTAError)
    return e.value.reason


def test_a_certificate_issued_by_the_fleet_ca_is_accepted(ca: FleetCA, other_ca: FleetCA,
                                                          device_key: ec.EllipticCurvePrivateKey) -> None:
    cert = ca.issue(device_key.public_key(), DEVICE_ID, days=30)
    found = verify_device_cert(cert_pem(cert), [other_ca.cert, ca.cert], spki(device_key), DEVICE_ID,
                               datetime.now(UTC))
    assert found.serial == format(cert.serial_number, "x") and found.serial == found.serial.lower()
    assert found.fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    assert found.device_id == DEVICE_ID and found.not_after == cert.not_valid_after_utc


def test_outside_its_validity(ca: FleetCA, device_key: ec.EllipticCurvePrivateKey) -> None:
    start = datetime.now(UTC) - timedelta(days=40)
    old = cert_pem(ca.issue(device_key.public_key(), DEVICE_ID, days=30, not_before=start))
    assert refused(old, ca, device_key) == "expired"
    future = cert_pem(ca.issue(device_key.public_key(), DEVICE_ID, days=30,
                               not_before=datetime.now(UTC) + timedelta(days=1)))
    assert refused(future, ca, device_key) == "not yet valid"
    good = cert_pem(ca.issue(device_key.public_key(), DEVICE_ID, days=30))
    assert refused(good, ca, device_key, now=datetime.now(UTC) + timedelta(days=31)) == "expired"


def test_attack_a_certificate_from_a_look_alike_ca_is_refused(ca: FleetCA, other_ca: FleetCA,
                                                              device_key: ec.EllipticCurvePrivateKey) -> None:
    """Attack: someone makes a CA with the fleet CA's name and issues themselves a device certificate."""
    assert other_ca.cert.subject == ca.cert.subject
    forged = cert_pem(other_ca.issue(device_key.public_key(), DEVICE_ID))
    assert refused(forged, ca, device_key) == "unknown issuer"
    assert refused(forged, ca, device_key, cas=[]) == "unknown issuer"


def test_the_ca_itself_must_be_a_valid_ca(ca: FleetCA, device_key: ec.EllipticCurvePrivateKey) -> None:
    pem = cert_pem(ca.issue(device_key.public_key(), DEVICE_ID, days=30))
    assert refused(pem, ca, device_key, now=ca.cert.not_valid_after_utc + timedelta(days=1)) == "unknown issuer"
    # a device certificate trusted as if it were a CA signs nothing
    sub_key = ec.generate_private_key(ec.SECP256R1())
    sub_leaf = x509.load_pem_x509_certificate(pem)
    signed_by_leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                            DEVICE_ID)]))
                      .issuer_name(sub_leaf.subject).public_key(sub_key.public_key()).serial_number(1)
                      .not_valid_before(datetime.now(UTC) - timedelta(days=1))
                      .not_valid_after(datetime.now(UTC) + timedelta(days=1)).sign(device_key, hashes.SHA256()))
    assert refused(cert_pem(signed_by_leaf), ca, sub_key, cas=[sub_leaf]) == "unknown issuer"


def test_attack_the_fleet_ca_certificate_presented_as_a_device_certificate(ca: FleetCA) -> None:
    """Attack: the fleet CA's own certificate (public, self-signed, so 'issued by the CA') with its key's SPKI."""
    ca_key_spki = spki(ca.key)
    with pytest.raises(CertificateRefused) as e:
        verify_device_cert(ca.cert_pem, [ca.cert], ca_key_spki, DEVICE_ID, datetime.now(UTC))
    assert e.value.reason == "not a device certificate"


@pytest.mark.parametrize("change", [
    {"is_ca": True}, {"eku": False}, {"digital_signature": False},
], ids=["ca-true", "no-client-auth", "no-digital-signature"])
def test_not_a_device_certificate(ca: FleetCA, device_key: ec.EllipticCurvePrivateKey, change: dict[str, Any]) -> None:
    assert refused(leaf(ca, device_key, **change), ca, device_key) == "not a device certificate"
    assert verify_device_cert(leaf(ca, device_key), [ca.cert], spki(device_key), DEVICE_ID, datetime.now(UTC))


def test_attack_a_certificate_copied_from_another_card_is_refused(ca: FleetCA,
                                                                  device_key: ec.EllipticCurvePrivateKey) -> None:
    """Attack: a device certificate copied off a card, sent with the attacker's own key."""
    pem = cert_pem(ca.issue(device_key.public_key(), DEVICE_ID))
    attacker = ec.generate_private_key(ec.SECP256R1())
    assert refused(pem, ca, attacker) == "key mismatch"


@pytest.mark.parametrize("make, device_id", [
    (lambda ca, k: cert_pem(ca.issue(k.public_key(), "cam-0002")), DEVICE_ID),
    (lambda ca, k: leaf(ca, k, cn="cam-0002"), DEVICE_ID),
    (lambda ca, k: leaf(ca, k, urn=URN_PREFIX + "cam-0002"), DEVICE_ID),
    (lambda ca, k: leaf(ca, k, urn=None), DEVICE_ID),
    (lambda ca, k: leaf(ca, k, urn="https://example.com/cam-0001"), DEVICE_ID),
    (lambda ca, k: cert_pem(ca.issue(k.public_key(), DEVICE_ID)), DEVICE_ID.upper()),
    (lambda ca, k: cert_pem(ca.issue(k.public_key(), DEVICE_ID)), ""),
], ids=["other-device", "cn-only-differs", "san-only-differs", "no-san", "no-urn", "case-differs", "no-id"])
def test_attack_a_certificate_of_another_device_is_refused(ca: FleetCA, device_key: ec.EllipticCurvePrivateKey,
                                                           make: Callable[[FleetCA, Any], bytes],
                                                           device_id: str) -> None:
    """Attack: a device enrols under another DEVICE_ID (and so gets that device's staged configuration)."""
    assert refused(make(ca, device_key), ca, device_key, device_id) == "identity mismatch"


def test_garbage_and_oversized_input(ca: FleetCA, device_key: ec.EllipticCurvePrivateKey) -> None:
    good = cert_pem(ca.issue(device_key.public_key(), DEVICE_ID))
    assert refused(b"", ca, device_key) == "malformed"
    assert refused(b"hello", ca, device_key) == "malformed"
    assert refused(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", ca, device_key) == "malformed"
    assert refused(good + good, ca, device_key) == "malformed"  # exactly one
    assert refused(good.replace(b"\n-----END", b"A\n-----END"), ca, device_key) == "malformed"
    assert refused(good + b" " * 16 * 1024, ca, device_key) == "too large"


def test_load_fleet_cas(ca: FleetCA, other_ca: FleetCA, tmp_path: Path, device_key: ec.EllipticCurvePrivateKey
                        ) -> None:
    bundle = tmp_path / "cas.pem"
    bundle.write_bytes(ca.cert_pem + other_ca.cert_pem)
    assert load_fleet_cas(bundle) == [ca.cert, other_ca.cert]
    device = tmp_path / "device.pem"
    device.write_bytes(cert_pem(ca.issue(device_key.public_key(), DEVICE_ID)))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for path, message in ((tmp_path / "missing.pem", "fleet CA file not found"),
                          (junk, "holds no PEM certificate"), (device, "is not a CA certificate")):
        with pytest.raises(UserError, match=message):
            load_fleet_cas(path)


def test_keys_fleet_ca_cli(tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]],
                           device_key: ec.EllipticCurvePrivateKey) -> None:
    out = tmp_path / "ca"
    done = run_cli("keys", "fleet-ca", "--out", out, "--name", "Acme fleet", "--days", "30", check=True)
    assert "fleet-ca.pem" in done.stdout and stat.S_IMODE((out / "fleet-ca.key").stat().st_mode) == 0o600
    ca = FleetCA(out)
    assert ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Acme fleet"
    assert ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc == timedelta(days=30)
    assert load_fleet_cas(out / "fleet-ca.pem") == [ca.cert]
    pem = cert_pem(ca.issue(device_key.public_key(), DEVICE_ID))
    assert verify_device_cert(pem, [ca.cert], spki(device_key), DEVICE_ID, datetime.now(UTC)).device_id == DEVICE_ID
    before = (out / "fleet-ca.key").read_bytes()
    again = run_cli("keys", "fleet-ca", "--out", out)
    assert again.returncode == 2 and "already exists; refusing to overwrite it" in again.stderr
    assert (out / "fleet-ca.key").read_bytes() == before
    assert run_cli("keys", "fleet-ca", "--out", tmp_path / "b", "--days", "0").returncode == 2
