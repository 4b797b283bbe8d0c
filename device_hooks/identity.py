"""Device identity: a key pair generated on first boot into ``/data`` and identity attributes from a script.

The key is ed25519 (fast to generate on a Pi, small signatures); the server also accepts RSA and ECDSA keys,
so a key provisioned by other means (``device-key.pem`` placed before first boot) works as well. The identity
attributes come from an executable that prints ``name=value`` lines, Mender's identity-script convention.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from ota_common.errors import OTAError

log = logging.getLogger(__name__)

KEY_NAME = "device-key.pem"

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class IdentityError(OTAError):
    """The device identity cannot be established (unreadable key, failing identity script)."""


def load_or_create_key(state_dir: Path) -> PrivateKey:
    path = state_dir / KEY_NAME
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        pem = b""
    if pem:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as e:
            raise IdentityError(f"device key {path} is unreadable: {e}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise IdentityError(f"device key {path}: unsupported key type {type(key).__name__}")
        return key
    from .state import atomic_write

    new = ed25519.Ed25519PrivateKey.generate()
    data = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    atomic_write(path, data, 0o600)
    log.info("generated a new device key in %s", path)
    return new


def public_pem(key: PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def sign(key: PrivateKey, message: bytes) -> bytes:
    """The ``X-MEN-Signature`` of a request body: RSA PKCS#1 v1.5, ECDSA DER, or ed25519, all over SHA-256
    except ed25519 (which signs the message itself)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    return key.sign(message, padding.PKCS1v15(), hashes.SHA256())


def identity_data(command: str) -> dict[str, str | list[str]]:
    """Run the identity script; ``name=value`` lines, a repeated name becomes a list. Output must not be empty."""
    try:
        proc = subprocess.run([command], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise IdentityError(f"identity script {command} cannot run: {e}") from None
    if proc.returncode != 0:
        raise IdentityError(f"identity script {command} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    out: dict[str, str | list[str]] = {}
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise IdentityError(f"identity script {command}: bad line {line!r} (need name=value)")
        name = name.strip()
        prev = out.get(name)
        if prev is None:
            out[name] = value
        elif isinstance(prev, list):
            prev.append(value)
        else:
            out[name] = [prev, value]
    if not out:
        raise IdentityError(f"identity script {command} printed no attributes")
    return out


def identity_json(data: dict[str, str | list[str]]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def boot_id(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return f"pid-{os.getpid()}"
