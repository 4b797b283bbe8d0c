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
signed directly by the fleet CA. :func:`verify_device_cert` checks all of it and says why not in one word
(:attr:`CertificateRefused.reason`), so that the server can tell the device and keep the reason for the operator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .deviceid import is_device_id
from .errors import OTAError, UserError
from .files import read_input
from .tls import _ISSUER_KEYS, CLOCK_SKEW, _check_match, _check_new, _key_usage, _load_cert, _load_key, _write_pair

CA_CERT = "fleet-ca.pem"
CA_KEY = "fleet-ca.key"
URN_PREFIX = "urn:vv-ota:device:"
#: the default validity of a device certificate (a card may sit in a drawer for years before it is used)
DEVICE_DAYS = 3650
#: the largest device certificate PEM looked at (ours are under 1 KiB; the auth request is a network input)
MAX_DEVICE_CERT = 16 * 1024
#: the reasons :class:`CertificateRefused` gives (``revoked`` is the server's, from its revocation list)
REFUSAL_REASONS = ("expired", "not yet valid", "unknown issuer", "key mismatch", "identity mismatch",
                   "not a device certificate", "malformed", "too large", "revoked")


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


class CertificateRefused(OTAError):
    """A device certificate that does not enrol its device. ``reason`` is one of :data:`REFUSAL_REASONS` (short,
    stable: the server answers with it, stores it for the operator and tests compare it); ``str(e)`` is
    ``device certificate refused: <reason>``, with a detail for the server's log in ``detail``; ``serial`` is the
    certificate's (lower-case hex) when it parsed, for the operator."""

    def __init__(self, reason: str, detail: str = "", serial: str | None = None) -> None:
        assert reason in REFUSAL_REASONS, reason
        super().__init__(f"device certificate refused: {reason}")
        self.reason = reason
        self.detail = detail
        self.serial = serial


@dataclass(frozen=True)
class DeviceCert:
    """What a verified device certificate vouches for. ``serial``: lower-case hex without leading zeros (the
    form of :func:`serial_hex`); ``fingerprint``: SHA-256 of the DER certificate, hex."""

    serial: str
    fingerprint: str
    device_id: str
    not_after: datetime


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def verify_device_cert(pem: bytes, cas: Sequence[x509.Certificate], public_key_spki_der: bytes, device_id: str,
                       now: datetime) -> DeviceCert:
    """Check that ``pem`` is exactly one device certificate, signed directly by one of ``cas`` (each itself a CA
    valid at ``now``), valid at ``now``, for the public key ``public_key_spki_der`` (DER SubjectPublicKeyInfo)
    and the device ``device_id`` (common name *and* SubjectAltName URI ``urn:vv-ota:device:<id>``).

    The checks run in that order, so that a certificate from nobody we trust is ``unknown issuer`` whatever
    else is wrong with it.

    Raises:
        CertificateRefused: with the first reason that applies (see :data:`REFUSAL_REASONS`).
    """
    if len(pem) > MAX_DEVICE_CERT:
        raise CertificateRefused("too large", f"{len(pem)} bytes, at most {MAX_DEVICE_CERT}")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise CertificateRefused("malformed", f"not a PEM certificate: {e}") from None
    if len(certs) != 1:
        raise CertificateRefused("malformed", f"{len(certs)} certificates, expected exactly one")
    cert = certs[0]
    try:
        return _verify(cert, cas, public_key_spki_der, device_id, now)
    except CertificateRefused as e:
        e.serial = serial_hex(cert.serial_number)
        raise
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # an extension, name or key that does not parse
        # (cryptography reads them lazily)
        raise CertificateRefused("malformed", str(e), serial_hex(cert.serial_number)) from None


def _verify(cert: x509.Certificate, cas: Sequence[x509.Certificate], spki: bytes, device_id: str,
            now: datetime) -> DeviceCert:
    if not any(_issued_by(cert, ca, now) for ca in cas):
        raise CertificateRefused("unknown issuer", f"issuer {cert.issuer.rfc4514_string()!r} is none of the "
                                 f"{len(cas)} fleet CA(s) valid now")
    if now < cert.not_valid_before_utc:
        raise CertificateRefused("not yet valid", f"valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if now > cert.not_valid_after_utc:
        raise CertificateRefused("expired", f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    ext = cert.extensions
    if _is_ca(cert):
        raise CertificateRefused("not a device certificate", "it is a CA certificate")
    try:
        usage = ext.get_extension_for_class(x509.KeyUsage).value
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateRefused("not a device certificate", "no key usage or extended key usage") from None
    if not usage.digital_signature or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertificateRefused("not a device certificate", "not for digitalSignature and clientAuth")
    spki_format = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, spki_format) != spki:
        raise CertificateRefused("key mismatch", "the certificate is for another key than the request's")
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateRefused("identity mismatch", "no SubjectAltName") from None
    urns = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(URN_PREFIX)]
    if not is_device_id(device_id) or names != [device_id] or urns != [URN_PREFIX + device_id]:
        raise CertificateRefused("identity mismatch", f"certificate for {names!r} / {urns!r}, request for "
                                 f"{device_id!r}")
    return DeviceCert(serial_hex(cert.serial_number), cert.fingerprint(hashes.SHA256()).hex(), device_id,
                      cert.not_valid_after_utc)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, ca: x509.Certificate, now: datetime) -> bool:
    """``ca`` is a CA valid at ``now`` (CA:TRUE, keyCertSign when it has a key usage) whose key signed ``cert``."""
    if not _is_ca(ca) or not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        return False
    try:
        if not ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
            return False
    except x509.ExtensionNotFound:
        pass
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def load_fleet_cas(path: Path) -> list[x509.Certificate]:
    """The CA certificates of a PEM file (one or more), for the server's ``--fleet-ca``.

    Raises:
        UserError: the file cannot be read, holds no PEM certificate, or one of them is not a CA or has expired.
    """
    data = read_input(path, "fleet CA file")
    try:
        cas = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise UserError(f"fleet CA file {path} holds no PEM certificate") from None
    now = datetime.now(UTC)
    for ca in cas:
        name = ca.subject.rfc4514_string()
        if not _is_ca(ca):
            raise UserError(f"fleet CA file {path}: {name!r} is not a CA certificate (BasicConstraints CA=true)")
        if now > ca.not_valid_after_utc:
            raise UserError(f"fleet CA file {path}: {name!r} expired on {ca.not_valid_after_utc:%Y-%m-%d}")
    return cas
