"""The fleet enrolment CA: the certificate that lets a provisioned device be accepted by the update server
without a manual step (zero-touch enrolment).

``build.py keys fleet-ca`` makes the CA (ECDSA P-256, ``fleet-ca.pem`` + ``fleet-ca.key`` 0600, never
overwritten); ``build.py provision`` issues each device a certificate for its own key and ``DEVICE_ID``; the
server, given ``fleet-ca.pem``, accepts a device whose auth request carries such a certificate (see
:func:`verify_device_cert`, used by the server).

A device certificate binds exactly two things, both checked by the server against the auth request:

- its public key (the device key whose signature the auth request carries);
- its ``DEVICE_ID``: subject common name and SubjectAltName URI ``urn:vv-ota:device:<DEVICE_ID>`` (the identity
  attribute ``device_id``).

It is an end-entity certificate (``CA:FALSE``, key usage digitalSignature, extended key usage clientAuth),
signed directly by the fleet CA.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .deviceid import is_device_id
from .errors import UserError
from .tls import _ISSUER_KEYS, CLOCK_SKEW, _check_match, _check_new, _key_usage, _load_cert, _load_key, _write_pair

CA_CERT = "fleet-ca.pem"
CA_KEY = "fleet-ca.key"
URN_PREFIX = "urn:vv-ota:device:"
#: the default validity of a device certificate (a card may sit in a drawer for years before it is used)
DEVICE_DAYS = 3650


def make_fleet_ca(out_dir: Path, common_name: str = "vv-ota fleet enrolment CA", days: int = 3650
                  ) -> tuple[Path, Path]:
    """Write ``out_dir/fleet-ca.pem`` and ``out_dir/fleet-ca.key`` (0600). Returns their paths.

    Raises :class:`UserError` when either exists (never overwritten), the name is empty or ``days`` < 1."""
    if not common_name.strip():
        raise UserError("the fleet CA's common name is empty")
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    _check_new(cert_path, key_path, days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "vv-ota fleet enrolment")])
    start = datetime.now(UTC) - CLOCK_SKEW
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(out_dir, cert_path, cert, key_path, key)
    return cert_path, key_path


class FleetCA:
    """A loaded fleet CA (certificate and private key), ready to issue device certificates."""

    def __init__(self, ca_dir: Path) -> None:
        cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
        self.cert = _load_cert(cert_path, "fleet CA certificate")
        key = _load_key(key_path, "fleet CA key")
        _check_match(self.cert, key, cert_path, key_path)
        try:
            is_ca = self.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise UserError(f"{cert_path} is not a CA certificate (BasicConstraints CA=true is missing)")
        if not isinstance(key, _ISSUER_KEYS):
            raise UserError(f"{key_path}: a {type(key).__name__.lstrip('_')} cannot sign certificates")
        self.key: CertificateIssuerPrivateKeyTypes = key
        if datetime.now(UTC) > self.cert.not_valid_after_utc:
            raise UserError(f"fleet CA {cert_path} expired on {self.cert.not_valid_after_utc:%Y-%m-%d}")
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, public_key: CertificatePublicKeyTypes, device_id: str, days: int = DEVICE_DAYS, *,
              not_before: datetime | None = None) -> x509.Certificate:
        """A certificate for the device ``device_id`` holding ``public_key``. ``not_before`` (default: now minus
        the clock skew) is for tests that need one outside its validity. The certificate never outlives the CA.

        Raises :class:`UserError` for an id outside the grammar of :mod:`ota_common.deviceid` or ``days`` < 1."""
        if not is_device_id(device_id):
            raise UserError(f"cannot issue a certificate for {device_id!r}: not a DEVICE_ID")
        if days < 1:
            raise UserError(f"a certificate must be valid for at least one day, not {days}")
        start = not_before if not_before is not None else datetime.now(UTC) - CLOCK_SKEW
        end = min(start + timedelta(days=days), self.cert.not_valid_after_utc)
        signing_hash = None if isinstance(self.key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) \
            else hashes.SHA256()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(URN_PREFIX + device_id)]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, signing_hash)
        )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
