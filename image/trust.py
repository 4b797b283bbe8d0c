"""What an image trusts (DESIGN.md section 6), checked before a build and installed into its rootfs.

- The release key (the signer's public half) and ``trusted_keys``: installed in ``/etc/ota/keys`` re-serialised
  as public PEM (never a copy of the file read, so a private key or stray text cannot reach a device). A private
  key in ``trusted_keys`` is refused. An unsigned image (no signer) trusts no key at all.
- ``revoked_keys``: public keys the devices must never trust again, written to ``/etc/ota/keys.revoked`` as
  ``sha256:<hex of the DER SubjectPublicKeyInfo> <file name>`` lines. Signing with a revoked key, or a key both
  trusted and revoked, is refused.
- The update server: ``server_ca`` (PEM X.509 certificates only) is installed as ``/etc/ota/server-ca.pem``; a
  plain ``http://`` server URL is refused unless ``insecure_http`` allows it.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from artifacts.keys import KeyVerifier, Signer, load_verifier, signer_verifier
from ota_common.errors import KeyFormatError, UserError
from ota_common.files import read_input

from .config import ReleaseModel

#: where the image keeps what it trusts (the agent's ota.conf names the same paths)
KEYS_DIR = "/etc/ota/keys"
REVOKED_KEYS = "/etc/ota/keys.revoked"
SERVER_CA = "/etc/ota/server-ca.pem"

_URL = re.compile(r"^(https?)://[^/\s]+\S*$")
_PEM_LABEL = re.compile(rb"-----BEGIN ([^-\r\n]+)-----")


class InsecureServerError(UserError):
    """A plain http:// server URL without permission for it; the message says how to allow it."""


@dataclass(frozen=True)
class ImageTrust:
    """The checked trust settings of one image."""

    #: the public half of the signing key; None: an unsigned image, which trusts no key and refuses every update
    release_key: KeyVerifier | None
    #: ``trusted_keys``, in order (descriptions name their files)
    trusted: tuple[KeyVerifier, ...]
    #: ``revoked_keys``: (fingerprint, file name), in order
    revoked: tuple[tuple[str, str], ...]
    #: the server CA certificates as PEM (re-serialised), or None: the device uses the system's trust store
    server_ca: bytes | None
    #: things worth telling whoever builds (an expiring CA, keys left out of an unsigned image)
    notes: tuple[str, ...] = ()

    @property
    def signed(self) -> bool:
        return self.release_key is not None

    def verifiers(self) -> list[KeyVerifier]:
        """The keys the image's devices trust: the release key and ``trusted_keys`` (none when unsigned)."""
        return [self.release_key, *self.trusted] if self.release_key is not None else []

    def revoked_text(self) -> str:
        """The content of ``/etc/ota/keys.revoked``."""
        lines = ["# release keys this image never trusts: sha256 of the DER SubjectPublicKeyInfo, file name "
                 "(revoked_keys of the release configuration)"]
        lines += [f"{fp} {name}" for fp, name in self.revoked]
        return "\n".join(lines) + "\n"

    def manifest(self) -> dict[str, Any]:
        """What manifest.json records: fingerprints, not keys."""
        return {
            "release_key": self.release_key.fingerprint if self.release_key else None,
            "trusted_keys": [k.fingerprint for k in self.trusted],
            "revoked_keys": [fp for fp, _ in self.revoked],
            "server_ca": len(_PEM_LABEL.findall(self.server_ca)) if self.server_ca else 0,
        }


def load_server_ca(path: Path) -> bytes:
    """The X.509 certificates of a PEM file, re-serialised as PEM. The file must hold one or more PEM
    ``CERTIFICATE`` blocks and nothing else that is PEM (above all no private key).

    Raises :class:`UserError` naming the file."""
    data = read_input(path, "server CA file")
    labels = [m.decode(errors="replace").strip() for m in _PEM_LABEL.findall(data)]
    if any("PRIVATE KEY" in label for label in labels):
        raise UserError(f"{path}: holds a private key; the server CA file goes onto every device and must hold "
                        "only certificates")
    others = sorted({label for label in labels if label != "CERTIFICATE"})
    if others:
        raise UserError(f"{path}: holds a PEM {others[0]} block; the server CA file must hold only X.509 "
                        "certificates (PEM CERTIFICATE blocks)")
    if not labels:
        raise UserError(f"{path}: not a PEM file of X.509 certificates (no BEGIN CERTIFICATE block)")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise UserError(f"{path}: not a valid X.509 certificate: {e}") from None
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _expiry_notes(path: Path, pem: bytes) -> list[str]:
    now = datetime.datetime.now(datetime.UTC)
    notes = []
    for cert in x509.load_pem_x509_certificates(pem):
        if cert.not_valid_after_utc < now:
            notes.append(f"server CA {path}: the certificate {cert.subject.rfc4514_string()} expired on "
                         f"{cert.not_valid_after_utc:%Y-%m-%d}")
    return notes


def _load_public(key: str, base_dir: Path, what: str, config: str) -> tuple[Path, KeyVerifier]:
    path = (base_dir / key).resolve()
    try:
        return path, load_verifier(path)
    except KeyFormatError as e:
        raise KeyFormatError(f"{what} in {config}: {e}") from None
    except UserError as e:  # not found, unreadable
        raise UserError(f"{what} in {config}: {e}") from None


def load_trust(release: ReleaseModel, base_dir: Path, signer: Signer | None, *, server_ca: Path | None = None,
               config: str = "the release configuration") -> ImageTrust:
    """Check an image's keys and server CA. Paths in ``release`` are relative to ``base_dir`` (the directory of
    the configuration file ``config``); ``server_ca`` (e.g. from the command line) replaces ``release.server_ca``.

    Raises :class:`UserError` (:class:`KeyFormatError` for keys) naming the file: a key that is private, missing
    or unsupported, a release key or trusted key that is revoked, a server CA that is not certificates only."""
    trusted = [_load_public(k, base_dir, "trusted_keys", config) for k in release.trusted_keys]
    revoked = [_load_public(k, base_dir, "revoked_keys", config) for k in release.revoked_keys]
    revoked_by_fp = {v.fingerprint: path for path, v in revoked}
    release_key = None
    if signer is not None:
        release_key = signer_verifier(signer, f"the release key ({signer.description})")
        if release_key.fingerprint in revoked_by_fp:
            raise UserError(f"the release key {signer.description} ({release_key.fingerprint}) is revoked: "
                            f"{revoked_by_fp[release_key.fingerprint]} in revoked_keys of {config}; sign with a key "
                            "that is not revoked")
    for path, v in trusted:
        if v.fingerprint in revoked_by_fp:
            raise UserError(f"{path} is both trusted and revoked in {config} (trusted_keys, and revoked_keys as "
                            f"{revoked_by_fp[v.fingerprint]}): a key is one or the other")
    notes: list[str] = []
    if release_key is None and trusted:
        notes.append(f"unsigned image: the {len(trusted)} key(s) of trusted_keys are not installed (an unsigned "
                     "image trusts no key and refuses every update)")
    ca_path = server_ca.absolute() if server_ca is not None else (
        (base_dir / release.server_ca).resolve() if release.server_ca else None)
    ca = load_server_ca(ca_path) if ca_path is not None else None
    if ca_path is not None and ca is not None:
        notes += _expiry_notes(ca_path, ca)
    return ImageTrust(release_key=release_key, trusted=tuple(v for _, v in trusted),
                      revoked=tuple((v.fingerprint, path.name) for path, v in revoked), server_ca=ca,
                      notes=tuple(notes))


def check_server_url(url: str, *, insecure_http: bool, server_ca: bool, config: str) -> list[str]:
    """Check the server URL an image is built with; returns notes for whoever builds (an https URL without a CA
    of its own, an allowed plain http URL). An empty URL (set later on the device) is fine.

    Raises :class:`InsecureServerError` for plain http without ``insecure_http``, :class:`UserError` for a URL
    that is not http(s)."""
    if not url:
        return []
    m = _URL.match(url)
    if not m:
        raise UserError(f"server_url {url!r}: must be an https:// URL (scheme, host and optional path)")
    if m.group(1) == "http":
        if not insecure_http:
            raise InsecureServerError(
                f"server_url {url} is plain http: anyone on the network path could read and change what the devices "
                "are told; use an https:// URL (with server_ca for a private CA), or allow plain http (a lab only) "
                f"with insecure_http: true in {config}")
        return [f"server {url}: plain http allowed (insecure_http): a lab setting, not for a fleet"]
    if not server_ca:
        return [f"server {url}: no server_ca: the devices check the server's certificate against the system's "
                "trust store (ca-certificates)"]
    return []


def install_trust(root: Path, trust: ImageTrust) -> list[Path]:
    """Write the image's keys, revocation list and server CA under ``root`` (``/etc/ota/keys`` is emptied of
    ``*.pem`` first, so only these keys are trusted). Returns the files written."""
    keys_dir = root / KEYS_DIR.lstrip("/")
    keys_dir.mkdir(parents=True, exist_ok=True)
    for old in keys_dir.glob("*.pem"):
        old.unlink()
    written: list[Path] = []

    def write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o644)
        written.append(path)

    if trust.release_key is not None:
        write(keys_dir / "release.pem", trust.release_key.public_key_pem())
        for i, v in enumerate(trust.trusted):
            write(keys_dir / f"trusted-{i}.pem", v.public_key_pem())
    write(root / REVOKED_KEYS.lstrip("/"), trust.revoked_text().encode())
    ca = root / SERVER_CA.lstrip("/")
    if trust.server_ca is not None:
        write(ca, trust.server_ca)
    elif ca.exists() or ca.is_symlink():
        ca.unlink()
    return written


__all__ = ["KEYS_DIR", "REVOKED_KEYS", "SERVER_CA", "ImageTrust", "InsecureServerError", "check_server_url",
           "install_trust", "load_server_ca", "load_trust"]
