"""``provenance.intoto.json``: a release's in-toto Statement v1 (SLSA provenance v1 predicate) in a DSSE envelope
signed with the release key (issue 17).

DSSE (https://github.com/secure-systems-lab/dsse, protocol v1): the signature covers
``PAE(payloadType, payload) = "DSSEv1" SP len(type) SP type SP len(payload) SP payload``, never the JSON
around it, so the envelope's formatting is not part of what is trusted. The signatures are the release key's,
made the way the artifacts' are (:mod:`artifacts.keys`: RSA PKCS#1 v1.5 or ECDSA P-256 with SHA-256, ECDSA as
raw r||s), and ``keyid`` is the key's fingerprint (:func:`artifacts.keys.key_fingerprint`).

:func:`verify_provenance` is strict: the envelope and statement are untrusted input (a file handed over with
a release), so their shape is checked and only a verified payload is parsed as a statement.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

from ota_common.errors import BadSignature, MalformedArtifact, UnsignedArtifact

from .keys import Signer, Verifier, key_fingerprint

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
#: far above any release's provenance (a few KB per output and layer file)
MAX_ENVELOPE_SIZE = 16 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def statement(subjects: Mapping[str, str], predicate: Mapping[str, Any]) -> dict[str, Any]:
    """An in-toto Statement v1 about ``subjects`` (name → sha256 hex) with an SLSA provenance v1 predicate."""
    return {"_type": STATEMENT_TYPE,
            "subject": [{"name": n, "digest": {"sha256": d}} for n, d in sorted(subjects.items())],
            "predicateType": SLSA_PROVENANCE, "predicate": dict(predicate)}


def sign_envelope(doc: Mapping[str, Any], signer: Signer | None) -> bytes:
    """The DSSE envelope of ``doc`` (a statement), as the bytes of ``provenance.intoto.json``. Without a signer
    the envelope has no signatures (an unsigned release's): :func:`verify_provenance` refuses it."""
    payload = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    signatures = []
    if signer is not None:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        keyid = key_fingerprint(load_pem_public_key(signer.public_key_pem()))  # type: ignore[arg-type]
        sig = signer.sign(pae(PAYLOAD_TYPE, payload))
        signatures.append({"keyid": keyid, "sig": base64.b64encode(sig).decode()})
    envelope = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(), "signatures": signatures}
    return (json.dumps(envelope, indent=1) + "\n").encode()


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedArtifact(f"provenance: {what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedArtifact(f"provenance: {what} is not valid base64") from None


def _open_envelope(data: bytes) -> tuple[bytes, list[dict[str, Any]]]:
    """The payload and signature entries of a DSSE envelope's bytes, its shape checked. Raises MalformedArtifact."""
    if len(data) > MAX_ENVELOPE_SIZE:
        raise MalformedArtifact(f"provenance: {len(data)} bytes is far more than a provenance document")
    try:
        env = json.loads(data)
    except (ValueError, RecursionError):
        raise MalformedArtifact("provenance: not JSON") from None
    if not isinstance(env, dict) or set(env) != {"payloadType", "payload", "signatures"}:
        raise MalformedArtifact("provenance: not a DSSE envelope (payloadType, payload, signatures)")
    if env["payloadType"] != PAYLOAD_TYPE:
        raise MalformedArtifact(f"provenance: payload type {env['payloadType']!r} is not {PAYLOAD_TYPE}")
    payload = _b64(env["payload"], "payload")
    sigs = env["signatures"]
    if not isinstance(sigs, list) or not all(isinstance(s, dict) for s in sigs) or len(sigs) > 16:
        raise MalformedArtifact("provenance: signatures must be a list of objects")
    return payload, sigs


def _statement_of(payload: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise MalformedArtifact("provenance: the signed payload is not JSON") from None
    _check_statement(doc)
    return cast(dict[str, Any], doc)


def verify_provenance(data: bytes, verifiers: Sequence[Verifier]) -> tuple[dict[str, Any], Verifier]:
    """The statement of a DSSE envelope (``provenance.intoto.json``'s bytes) whose signature verifies with one of
    ``verifiers``, and that verifier. Raises :class:`MalformedArtifact` for a document that is not such an
    envelope or statement, :class:`UnsignedArtifact` for one without signatures, :class:`BadSignature` when no
    signature verifies with any of the keys."""
    payload, sigs = _open_envelope(data)
    if not sigs:
        raise UnsignedArtifact("provenance: the envelope is not signed (an unsigned release's)")
    message = pae(PAYLOAD_TYPE, payload)
    signed_by = None
    for s in sigs:
        sig = _b64(s.get("sig"), "a signature")
        for v in verifiers:
            try:
                v.verify(message, sig)
            except BadSignature:
                continue
            signed_by = v
            break
        if signed_by is not None:
            break
    if signed_by is None:
        keys = ", ".join(v.description for v in verifiers) or "no key (none given)"
        raise BadSignature(f"provenance: no signature verifies with {keys}")
    return _statement_of(payload), signed_by


def read_unverified_provenance(data: bytes) -> tuple[dict[str, Any], int]:
    """The statement of a DSSE envelope and how many signatures it has, **without verifying any**: for a holder
    that has no key to verify with (an update server started without release keys), which must then say that
    the document is unverified. Raises :class:`MalformedArtifact` as :func:`verify_provenance` does."""
    payload, sigs = _open_envelope(data)
    for s in sigs:
        _b64(s.get("sig"), "a signature")
    return _statement_of(payload), len(sigs)


def _check_statement(doc: Any) -> None:
    if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE:
        raise MalformedArtifact(f"provenance: the payload is not an in-toto statement ({STATEMENT_TYPE})")
    if doc.get("predicateType") != SLSA_PROVENANCE or not isinstance(doc.get("predicate"), dict):
        raise MalformedArtifact(f"provenance: the predicate is not SLSA provenance ({SLSA_PROVENANCE})")
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise MalformedArtifact("provenance: the statement has no subjects")
    for s in subjects:
        if (not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("digest"), dict)
                or not isinstance(s["digest"].get("sha256"), str) or not _SHA256_RE.fullmatch(s["digest"]["sha256"])):
            raise MalformedArtifact("provenance: a subject is not a name with a sha256 digest")


def subjects_of(doc: Mapping[str, Any]) -> dict[str, str]:
    """A verified statement's subjects: name → sha256."""
    return {s["name"]: s["digest"]["sha256"] for s in doc["subject"]}


__all__ = ["PAYLOAD_TYPE", "SLSA_PROVENANCE", "STATEMENT_TYPE", "pae", "read_unverified_provenance", "sign_envelope",
           "statement", "subjects_of", "verify_provenance"]
