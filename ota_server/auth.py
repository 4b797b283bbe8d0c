"""Device authentication: signed auth requests and device tokens (HS256 JWT). Management tokens are in
:mod:`ota_server.apitokens`."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from .errors import APIError, bad_request, unauthorized

ISSUER = "vv-ota"
MAX_PUBKEY_PEM = 16 * 1024
MAX_IDENTITY = 16 * 1024
TOKEN_CACHE_SIZE = 100_000


@dataclass(frozen=True)
class AuthRequest:
    identity: dict[str, Any]
    identity_json: str  # canonical (sorted keys, compact)
    identity_hash: str
    pubkey_pem: str  # normalized SubjectPublicKeyInfo PEM
    pubkey_hash: str
    tenant_token: str
    #: the device certificate of zero-touch enrolment (PEM, covered by the signature), checked by the caller
    device_cert: str | None = None


def canonical_json(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_identity(identity: dict[str, Any]) -> str:
    """The canonical JSON of identity data, or a 400: it must be storable text (no lone UTF-16 surrogate
    escape such as ``"\\ud800"``: not UTF-8, refused by the database) of a sane size. Control characters
    (NUL ...) are fine: JSON escapes them."""
    text = canonical_json(identity)
    try:
        text.encode()
    except UnicodeEncodeError:
        raise bad_request("identity data is not valid Unicode (a lone \\uD800-\\uDFFF escape)") from None
    if len(text) > MAX_IDENTITY:
        raise bad_request(f"identity data is larger than {MAX_IDENTITY} characters")
    return text


def sha256_hex(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def load_device_pubkey(pem: str) -> Any:
    """A device public key (RSA, ECDSA P-256/P-384/P-521, ed25519) or a 400 saying what is wrong."""
    if not isinstance(pem, str) or not pem.strip():
        raise bad_request("pubkey must be a PEM public key")
    if len(pem) > MAX_PUBKEY_PEM:
        raise bad_request("pubkey is too large")
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnicodeError):
        raise bad_request("pubkey is not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise bad_request(f"RSA device keys must have at least 2048 bits, not {key.key_size}")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)):
            raise bad_request(f"unsupported elliptic curve {key.curve.name} (P-256, P-384, P-521)")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise bad_request("unsupported key type (RSA, ECDSA P-256/P-384/P-521 or ed25519)")
    return key


def normalize_pubkey(key: Any) -> str:
    return str(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())


def verify_signature(key: Any, signature: bytes, body: bytes) -> bool:
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, body, ec.ECDSA(hashes.SHA256()))  # DER-encoded (r, s), as the Mender client signs
        else:
            key.verify(signature, body)
    except (InvalidSignature, ValueError):
        return False
    return True


def parse_auth_request(body: bytes, signature_header: str | None) -> AuthRequest:
    """Validate an auth request body and its ``X-MEN-Signature``. A bad signature is a 401, a malformed
    request a 400."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise bad_request("the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise bad_request("the body must be a JSON object")
    id_data, pem, tenant = doc.get("id_data"), doc.get("pubkey"), doc.get("tenant_token", "")
    if not isinstance(id_data, str):
        raise bad_request("id_data must be a string holding a JSON object")
    try:
        identity = json.loads(id_data)
    except (ValueError, RecursionError):
        raise bad_request("id_data is not valid JSON") from None
    if not isinstance(identity, dict) or not identity:
        raise bad_request("id_data must hold a non-empty JSON object")
    if not isinstance(tenant, str):
        raise bad_request("tenant_token must be a string")
    if not isinstance(pem, str):
        raise bad_request("pubkey must be a PEM public key")
    device_cert = doc.get("device_cert")
    if device_cert is not None and not isinstance(device_cert, str):
        raise bad_request("device_cert must be a string (a PEM certificate)")
    key = load_device_pubkey(pem)
    if not signature_header:
        raise unauthorized("missing X-MEN-Signature header")
    try:
        signature = base64.b64decode(signature_header.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise unauthorized("X-MEN-Signature is not base64") from None
    if not verify_signature(key, signature, body):
        raise unauthorized("the request signature does not verify with the given public key")
    ident = canonical_identity(identity)
    pubkey = normalize_pubkey(key)
    return AuthRequest(identity, ident, sha256_hex(ident), pubkey, sha256_hex(pubkey), tenant, device_cert)


@dataclass(frozen=True)
class DeviceClaims:
    """What a verified device token says: the device, and the auth set and epoch it was issued for (the
    request is allowed only while the device's accepted auth set and token epoch are still these)."""

    device_id: str
    auth_set_id: str
    epoch: int


class TokenCodec:
    """Device tokens: HS256 JWTs naming the device (``sub``), the auth set they were issued for
    (``mender.auth_set``, as Mender's) and the device's token epoch at issue time (``vv.epoch``)."""

    def __init__(self, key: bytes, ttl: int) -> None:
        self._key = key
        self.ttl = ttl
        self._verified: dict[str, tuple[DeviceClaims, float]] = {}

    def issue(self, device_id: str, auth_set_id: str, epoch: int) -> str:
        now = int(time.time())
        claims = {
            "jti": str(uuid.uuid4()),
            "sub": device_id,
            "iat": now,
            "exp": now + self.ttl,
            "iss": ISSUER,
            "mender.device": True,
            "mender.auth_set": auth_set_id,
            "vv.epoch": epoch,
        }
        return jwt.encode(claims, self._key, algorithm="HS256")

    def verify(self, authorization: str | None) -> DeviceClaims:
        """The claims of a valid, unexpired token. A device sends the same token on every poll, so verified
        tokens are remembered (bounded cache; the expiry is still checked every time). Whether the auth set
        and epoch are still current is the caller's check (one column pair of the device row it reads anyway).

        Raises:
            APIError: 401 for a missing, malformed, forged or expired token, or one without the auth set and
                epoch claims (issued before tokens were bound to their auth set).
        """
        if not authorization or not authorization.startswith("Bearer "):
            raise unauthorized("missing device token (Authorization: Bearer ...)")
        token = authorization[7:].strip()
        hit = self._verified.get(token)
        if hit is not None and hit[1] > time.time():
            return hit[0]
        try:
            claims = jwt.decode(token, self._key, algorithms=["HS256"], options={"require": ["exp", "sub"]},
                                issuer=ISSUER)
        except jwt.ExpiredSignatureError:
            raise unauthorized("device token expired") from None
        except jwt.PyJWTError:
            raise unauthorized("invalid device token") from None
        sub, aset, epoch = claims.get("sub"), claims.get("mender.auth_set"), claims.get("vv.epoch")
        if (not isinstance(sub, str) or not claims.get("mender.device") or not isinstance(aset, str)
                or type(epoch) is not int):
            raise unauthorized("invalid device token")
        if len(self._verified) >= TOKEN_CACHE_SIZE:
            self._verified.clear()
        found = DeviceClaims(sub, aset, epoch)
        self._verified[token] = (found, float(claims["exp"]))
        return found


__all__ = ["APIError", "AuthRequest", "DeviceClaims", "TokenCodec", "parse_auth_request"]
