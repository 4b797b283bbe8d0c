"""OpenSSH public keys for the fleet's operators: the ``SSH_AUTHORIZED_KEYS`` configuration variable and the
``/data/ota/authorized_keys`` file it becomes on the device.

Standard library only: the update server (refusing a bad value when it is set), the Ansible import and the
device's agent (before it writes the file sshd reads for root) run the same check. The file grants root a
shell, so a line is accepted only when it is exactly ``<type> <base64 blob> [comment]``:

- the type is one of :data:`KEY_TYPES` (no DSA, no RSA under :data:`MIN_RSA_BITS` bits);
- the blob decodes, names the same type, and holds a well-formed key of it with nothing after it;
- there is **no options prefix** (``command="..."``, ``from=...``, ``environment=...``: an operator's key is a
  plain key, and an option is how a server that is not trusted would turn one into something else);
- the comment is printable ASCII (no control characters: nothing that could start another line);
- at most :data:`MAX_KEYS` keys.

A value holds key lines separated by newlines or ``;``; empty lines and ``#`` lines are dropped. Fingerprints
are ``SHA256:<base64 of the blob's SHA-256, unpadded>``, as ``ssh-keygen -l`` prints them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

#: the configuration variable that carries the keys (never written to the application's environment)
VARIABLE = "SSH_AUTHORIZED_KEYS"
MAX_KEYS = 100
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384
MAX_LINE = 16 * 1024
MAX_COMMENT = 256
_CURVES = {"nistp256": 65, "nistp384": 97, "nistp521": 133}  # uncompressed point sizes
#: accepted key types
KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa",
             "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
_COMMENT_RE = re.compile(r"[\x20-\x7e]*")
_B64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class SSHKeyError(ValueError):
    """A value is not an acceptable list of OpenSSH public keys; the message says which line and why."""


@dataclass(frozen=True)
class PublicKey:
    type: str
    blob: bytes
    comment: str = ""

    @property
    def fingerprint(self) -> str:
        return "SHA256:" + base64.b64encode(hashlib.sha256(self.blob).digest()).decode().rstrip("=")

    @property
    def line(self) -> str:
        b64 = base64.b64encode(self.blob).decode()
        return f"{self.type} {b64} {self.comment}".rstrip()


class _Reader:
    """The SSH wire format (RFC 4251 section 5): ``string`` and ``mpint`` with a 32-bit length."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def string(self) -> bytes:
        if self.pos + 4 > len(self.data):
            raise SSHKeyError("the key blob is truncated")
        n = int.from_bytes(self.data[self.pos:self.pos + 4], "big")
        start = self.pos + 4
        if start + n > len(self.data):
            raise SSHKeyError("the key blob is truncated")
        self.pos = start + n
        return self.data[start:self.pos]

    def mpint(self) -> int:
        raw = self.string()
        if raw and raw[0] & 0x80:
            raise SSHKeyError("the key blob holds a negative number")
        return int.from_bytes(raw, "big")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise SSHKeyError("the key blob has bytes after the key")


def _check_blob(key_type: str, blob: bytes) -> None:
    r = _Reader(blob)
    embedded = r.string()
    if embedded != key_type.encode():
        raise SSHKeyError(f"the key blob is a {embedded[:40].decode('ascii', 'replace')!r} key, "
                          f"the line says {key_type}")
    if key_type in ("ssh-ed25519", "sk-ssh-ed25519@openssh.com"):
        if len(r.string()) != 32:
            raise SSHKeyError("an ed25519 key is 32 bytes")
    elif key_type.startswith(("ecdsa-sha2-", "sk-ecdsa-sha2-")):
        curve = key_type.removeprefix("sk-").removeprefix("ecdsa-sha2-").removesuffix("@openssh.com")
        if r.string() != curve.encode():
            raise SSHKeyError(f"the key blob names another curve than {curve}")
        point = r.string()
        if len(point) != _CURVES[curve] or point[0] != 4:
            raise SSHKeyError(f"not an uncompressed {curve} point")
    else:  # ssh-rsa
        e, n = r.mpint(), r.mpint()
        if e < 3 or e % 2 == 0:
            raise SSHKeyError("the RSA exponent is not valid")
        if n.bit_length() < MIN_RSA_BITS or n.bit_length() > MAX_RSA_BITS:
            raise SSHKeyError(f"an RSA key must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, this one has "
                              f"{n.bit_length()}")
    if key_type.startswith("sk-") and not r.string().startswith(b"ssh:"):
        raise SSHKeyError("a security-key key's application must start with ssh:")
    r.end()


def parse_line(line: str) -> PublicKey:
    """One ``<type> <base64> [comment]`` line. Raises :class:`SSHKeyError`."""
    if len(line) > MAX_LINE:
        raise SSHKeyError(f"longer than {MAX_LINE} characters")
    fields = line.strip(" \t").split(None, 2)
    if len(fields) < 2:
        raise SSHKeyError("need '<type> <base64 key> [comment]'")
    key_type, b64 = fields[0], fields[1]
    comment = fields[2].strip(" \t") if len(fields) == 3 else ""
    if key_type not in KEY_TYPES:
        raise SSHKeyError(f"starts with {key_type[:40]!r}, not a key type ({', '.join(KEY_TYPES)}); options such "
                          "as command=\"...\" are not allowed")
    if not _B64_RE.fullmatch(b64):
        raise SSHKeyError("the key is not base64")
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise SSHKeyError("the key is not base64") from None
    if len(comment) > MAX_COMMENT or not _COMMENT_RE.fullmatch(comment):
        raise SSHKeyError(f"the comment must be printable ASCII, at most {MAX_COMMENT} characters")
    _check_blob(key_type, blob)
    return PublicKey(key_type, blob, comment)


def parse_keys(value: str) -> list[PublicKey]:
    """Every key of ``value`` (lines separated by newlines or ``;``), duplicates dropped. Raises
    :class:`SSHKeyError` naming the first bad line (counted from 1)."""
    if not isinstance(value, str):
        raise SSHKeyError("must be text")
    keys: dict[bytes, PublicKey] = {}
    for n, raw in enumerate(re.split(r"[\n;]", value), 1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            key = parse_line(line)
        except SSHKeyError as e:
            raise SSHKeyError(f"key line {n}: {e}") from None
        keys.setdefault(key.blob, key)
        if len(keys) > MAX_KEYS:
            raise SSHKeyError(f"more than {MAX_KEYS} keys")
    return list(keys.values())


def check_value(value: str) -> str | None:
    """Why ``value`` cannot be an ``SSH_AUTHORIZED_KEYS`` value, or None."""
    try:
        parse_keys(value)
    except SSHKeyError as e:
        return str(e)
    return None


def authorized_keys_text(keys: list[PublicKey]) -> str:
    """The ``authorized_keys`` file of ``keys``: one normalised line each."""
    return "".join(f"{k.line}\n" for k in keys)


__all__ = ["KEY_TYPES", "MAX_KEYS", "VARIABLE", "PublicKey", "SSHKeyError", "authorized_keys_text", "check_value",
           "parse_keys", "parse_line"]
