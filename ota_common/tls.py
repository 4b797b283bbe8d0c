"""TLS for the update server: a small CA and server certificates for a lab or a test run, and the check that
``build.py server --tls-cert/--tls-key`` runs before it starts listening.

Keys are ECDSA P-256, certificates X.509 v3 signed with SHA-256 (``cryptography``'s x509 API). Private keys are
written unencrypted (uvicorn reads them without a passphrase) with mode 0600; nothing is ever overwritten.
Every problem a user can fix is raised as :class:`~ota_common.errors.UserError` with a one-line message.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import UserError
from .files import read_input

#: a certificate starts to be valid this long before it is made (clocks of devices and servers differ)
CLOCK_SKEW = timedelta(minutes=5)
_ISSUER_KEYS = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey,
                dsa.DSAPrivateKey)
_DNS_NAME = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def make_ca(out_dir: Path, common_name: str = "vv-ota test CA", days: int = 3650) -> tuple[Path, Path]:
    """Write a self-signed CA: ``out_dir/ca.pem`` (certificate) and ``out_dir/ca.key`` (private key, 0600).

    Returns ``(ca.pem, ca.key)``. Raises :class:`UserError` when either file exists already (never overwritten),
    ``days`` is not positive, the name is empty, or the directory cannot be written."""
    if not common_name.strip():
        raise UserError("the CA's common name is empty")
    cert_path, key_path = out_dir / "ca.pem", out_dir / "ca.key"
    _check_new(cert_path, key_path, days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
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


def make_server_cert(ca_cert: Path, ca_key: Path, out_dir: Path, names: Sequence[str], days: int = 825, *,
                     not_before: datetime | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/server.pem`` (the leaf certificate only) and ``out_dir/server.key`` (0600), signed by the CA.

    Each of ``names`` goes into the SubjectAltName: an IP address when it parses as one, else a DNS name (the
    first is also the subject's common name). ``not_before`` (default: now minus :data:`CLOCK_SKEW`) is for
    tests that need a certificate outside its validity. Returns ``(server.pem, server.key)``.

    Raises :class:`UserError` when ``names`` is empty or holds something that is neither an IP address nor a
    DNS name, the CA files cannot be read, are not PEM, do not match or are not a CA, an output file exists
    already, ``days`` is not positive, or the directory cannot be written."""
    if not names:
        raise UserError("a server certificate needs at least one name (DNS name or IP address)")
    sans = [_general_name(n) for n in names]
    issuer = _load_cert(ca_cert, "CA certificate")
    issuer_key = _load_key(ca_key, "CA key")
    _check_match(issuer, issuer_key, ca_cert, ca_key)
    try:
        is_ca = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise UserError(f"{ca_cert} is not a CA certificate (BasicConstraints CA=true is missing)")
    if not isinstance(issuer_key, _ISSUER_KEYS):
        raise UserError(f"{ca_key}: a {type(issuer_key).__name__.lstrip('_')} cannot sign certificates")
    signer: CertificateIssuerPrivateKeyTypes = issuer_key
    cert_path, key_path = out_dir / "server.pem", out_dir / "server.key"
    _check_new(cert_path, key_path, days)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before if not_before is not None else datetime.now(UTC) - CLOCK_SKEW
    signing_hash = None if isinstance(signer, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
        .sign(signer, signing_hash)
    )
    _write_pair(out_dir, cert_path, cert, key_path, key)
    return cert_path, key_path


def check_server_tls(cert: Path, key: Path) -> None:
    """Check that ``cert`` (PEM, the server's certificate first, then any intermediates) and ``key`` (PEM
    private key, unencrypted) can serve TLS now.

    Raises :class:`UserError` with a one-line message when a file is missing or unreadable, is not PEM, the
    key is not a private key (or is encrypted), the key does not match the certificate, the certificate is
    expired or not yet valid, or Python's TLS layer refuses the pair."""
    leaf = _load_cert(cert, "TLS certificate")
    private = _load_key(key, "TLS key")
    _check_match(leaf, private, cert, key)
    now = datetime.now(UTC)
    if now > leaf.not_valid_after_utc:
        raise UserError(f"TLS certificate {cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < leaf.not_valid_before_utc:
        raise UserError(f"TLS certificate {cert} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise UserError(f"TLS certificate {cert} and key {key} are refused by the TLS library: {e}") from None


# --- helpers -------------------------------------------------------------------------------------------------


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if len(name) > 253 or not _DNS_NAME.match(name):
        raise UserError(f"{name!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name.lower())


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=key_cert_sign, crl_sign=crl_sign, encipher_only=False, decipher_only=False)


def _read(path: Path, what: str) -> bytes:
    return read_input(path, what)


def _load_cert(path: Path, what: str) -> x509.Certificate:
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise UserError(f"{what} {path} is not a PEM certificate") from None
    return certs[0]


def _load_key(path: Path, what: str) -> PrivateKeyTypes:
    data = _read(path, what)
    if b"-----BEGIN" not in data:
        raise UserError(f"{what} {path} is not PEM")
    if b"PRIVATE KEY-----" not in data:
        raise UserError(f"{what} {path} is not a private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UserError(f"{what} {path} is encrypted; the server needs an unencrypted key (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise UserError(f"{what} {path} is not a usable private key: {e}") from None


def _check_match(cert: x509.Certificate, key: PrivateKeyTypes, cert_path: Path, key_path: Path) -> None:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise UserError(f"key {key_path} does not match certificate {cert_path}")


def _check_new(cert_path: Path, key_path: Path, days: int) -> None:
    if days < 1:
        raise UserError(f"a certificate must be valid for at least one day, not {days}")
    for p in (cert_path, key_path):
        if p.exists():
            raise UserError(f"{p} already exists; refusing to overwrite it")


def _write_pair(out_dir: Path, cert_path: Path, cert: x509.Certificate, key_path: Path,
                key: ec.EllipticCurvePrivateKey) -> None:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_new(key_path, key_pem, 0o600)
        try:
            _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        except BaseException:
            key_path.unlink()
            raise
    except FileExistsError as e:
        raise UserError(f"{e.filename} already exists; refusing to overwrite it") from None
    except OSError as e:
        raise UserError(f"cannot write into {out_dir}: {e.strerror}") from None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
