"""Signing keys, signers and verifiers for artifact manifests.

mender-artifact 3.9 signs the exact manifest bytes with SHA-256 and either RSA PKCS#1 v1.5 or ECDSA P-256,
the latter encoded as raw ``r‖s`` (64 bytes, *not* DER: 3.9 refuses DER). It reads only PKCS#1
(``RSA PRIVATE KEY``) and SEC1 (``EC PRIVATE KEY``) private keys and refuses ed25519 and P-384, so keys we
generate use those encodings and we refuse other key types up front with a clear message.

:class:`Signer` and :class:`Verifier` are small protocols so that file keys, HSMs and test keys share one
path (as in mender-artifact's Go packages).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from ota_common.errors import BadSignature, KeyFormatError, UserError
from ota_common.files import read_input

_P256_COORD = 32
MIN_RSA_BITS = 2048


class KeyType(enum.Enum):
    ECDSA_P256 = "ecdsa-p256"
    RSA_3072 = "rsa-3072"


class Signer(Protocol):
    """Signs manifest bytes; returns the raw signature (before base64)."""

    def sign(self, message: bytes) -> bytes: ...

    def public_key_pem(self) -> bytes:
        """The public half, to bake into images as a trusted key."""
        ...

    @property
    def description(self) -> str: ...


class Verifier(Protocol):
    """Checks a raw signature over manifest bytes; raises :class:`BadSignature` when it does not verify."""

    def verify(self, message: bytes, signature: bytes) -> None: ...

    @property
    def description(self) -> str: ...


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _check_supported(key: object, path: str) -> None:
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFormatError(f"{path}: RSA key of {key.key_size} bits is too weak (at least {MIN_RSA_BITS})")
        return
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyFormatError(
                f"{path}: unsupported key: ECDSA curve {key.curve.name}; mender-artifact 3.9 supports only P-256"
            )
        return
    kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "")
    raise KeyFormatError(f"{path}: unsupported key type {kind}; mender-artifact 3.9 supports RSA and ECDSA P-256")


@dataclass(frozen=True)
class KeySigner:
    """A signer backed by a private key in memory."""

    key: PrivateKey
    description: str

    def sign(self, message: bytes) -> bytes:
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        der = self.key.sign(message, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return r.to_bytes(_P256_COORD, "big") + s.to_bytes(_P256_COORD, "big")

    def public_key_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def key_fingerprint(key: PublicKey | PrivateKey) -> str:
    """``sha256:<hex>`` of the key's DER SubjectPublicKeyInfo (of the public half for a private key): how
    ``keys.revoked`` on a device and the release manifest name a key."""
    public = key.public_key() if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) else key
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class KeyVerifier:
    """A verifier backed by a public key."""

    key: PublicKey
    description: str

    @property
    def fingerprint(self) -> str:
        """:func:`key_fingerprint` of the key."""
        return key_fingerprint(self.key)

    def public_key_pem(self) -> bytes:
        """The key as a PEM SubjectPublicKeyInfo (what an image installs; never a copy of the file read)."""
        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def verify(self, message: bytes, signature: bytes) -> None:
        try:
            if isinstance(self.key, rsa.RSAPublicKey):
                if len(signature) != (self.key.key_size + 7) // 8:
                    raise BadSignature(
                        f"signature is {len(signature)} bytes, but {self.description} makes "
                        f"{(self.key.key_size + 7) // 8}-byte signatures"
                    )
                self.key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
                return
            if len(signature) != 2 * _P256_COORD:
                der_hint = " (it looks DER-encoded; mender-artifact 3.9 requires raw r||s)" if signature[:1] == b"\x30" else ""
                raise BadSignature(
                    f"signature is {len(signature)} bytes, but {self.description} needs 64 bytes of raw r||s{der_hint}"
                )
            r = int.from_bytes(signature[:_P256_COORD], "big")
            s = int.from_bytes(signature[_P256_COORD:], "big")
            self.key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise BadSignature(f"signature does not verify with {self.description}") from None


# ---------------------------------------------------------------------------------------------------------
# Loading


def _read(path: Path) -> bytes:
    return read_input(path, "key file")


def load_signer(path: Path) -> KeySigner:
    """A signer from a PEM private key file (PKCS#1, SEC1 or PKCS#8; RSA ≥ 2048 bits or ECDSA P-256).

    Raises :class:`KeyFormatError` for unreadable, encrypted or unsupported keys."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFormatError(f"{path}: the private key is encrypted; provide an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        if b"PUBLIC KEY" in data:
            raise KeyFormatError(f"{path}: is a public key; signing needs the private key") from None
        raise KeyFormatError(f"{path}: not a PEM private key") from None
    _check_supported(key, str(path))
    assert isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey))
    return KeySigner(key, f"{_describe(key)} key {path}")


def load_verifier(path: Path) -> KeyVerifier:
    """A verifier from a PEM public key file. A private key is refused: whatever verifies (a device, the
    server, a release engineer's check) must never hold one.

    Raises :class:`KeyFormatError` for private, unreadable or unsupported keys."""
    data = _read(path)
    if b"PRIVATE KEY" in data:
        raise KeyFormatError(f"{path}: is a private key; a device or a verifier must only hold public keys")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFormatError(f"{path}: not a PEM public key") from None
    _check_supported(key, str(path))
    assert isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey))
    return KeyVerifier(key, f"{_describe(key)} key {path}")


def signer_verifier(signer: Signer, description: str | None = None) -> KeyVerifier:
    """A verifier for what ``signer`` signs, from its public half only (e.g. to check inputs signed by the
    same key). Raises :class:`KeyFormatError` when the signer's public key is not a supported one."""
    desc = description or f"the public half of {signer.description}"
    try:
        key = serialization.load_pem_public_key(signer.public_key_pem())
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFormatError(f"{signer.description}: its public key cannot be read") from None
    _check_supported(key, desc)
    assert isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey))
    return KeyVerifier(key, desc)


def load_verifiers(paths: Sequence[Path]) -> list[KeyVerifier]:
    return [load_verifier(p) for p in paths]


def _describe(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"RSA-{key.key_size}"
    return "ECDSA-P256"


# ---------------------------------------------------------------------------------------------------------
# Generation


def generate_keypair(key_type: KeyType, out_dir: Path) -> tuple[Path, Path]:
    """Write ``private.pem`` (SEC1 or PKCS#1, mode 0600) and ``public.pem`` into ``out_dir``.

    Refuses (:class:`UserError`) to overwrite an existing key."""
    private_path, public_path = out_dir / "private.pem", out_dir / "public.pem"
    for p in (private_path, public_path):
        if p.exists():
            raise UserError(f"{p} already exists; refusing to overwrite a key")
    key: PrivateKey
    if key_type is KeyType.ECDSA_P256:
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink()
        raise
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise UserError(f"{path} already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------
# manifest.sig encoding


def encode_signature(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def decode_signature(data: bytes) -> bytes:
    """The raw signature from ``manifest.sig`` (base64, optionally followed by one newline)."""
    text = data[:-1] if data.endswith(b"\n") else data
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadSignature("manifest.sig is not valid base64") from None
