"""Revoked device certificates of the fleet enrolment CA (``/api/management/v2/devauth/certificates/revoked``).

A revoked certificate never enrols a device again, and neither does any other certificate for its public key
(:func:`ota_server.devauth.revocation`): a stolen card's key stays out even if it comes with another certificate.
Revoking also rejects every auth set of that key (and every auth set the certificate accepted), so a device
accepted by it, or preauthorized, loses its token at its next request (the token epoch rule of
:mod:`.devauth`). An administrator may still accept such a device by hand afterwards: that is a decision about
the key, not about the certificate.
"""

from __future__ import annotations

import json
import re
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from ota_common.deviceid import IDENTITY_KEY, is_device_id
from ota_common.fleetca import MAX_DEVICE_CERT, serial_hex

from .auth import normalize_pubkey, sha256_hex
from .devauth import set_auth_status
from .errors import bad_request
from .models import auth_sets, devices, revoked_certificates
from .timeutil import now, rfc3339

#: a serial as people copy it: hex, optionally with colons (openssl) or 0x; at most 20 bytes (RFC 5280)
SERIAL_RE = re.compile(r"(0x)?[0-9a-f]{1,42}|[0-9a-f]{2}(:[0-9a-f]{2}){0,20}")


def normalize_serial(text: str) -> str:
    """The serial as stored (lower-case hex, no leading zeros), or a 400."""
    t = text.strip().lower()
    if not SERIAL_RE.fullmatch(t):
        raise bad_request("serial must be the certificate's serial number in hex (colons allowed)")
    value = int(t.removeprefix("0x").replace(":", ""), 16)
    if value.bit_length() > 160:
        raise bad_request("serial is longer than 20 bytes")
    return serial_hex(value)


def parse_certificate(pem: str) -> tuple[str, str, str | None]:
    """The serial, public key hash (as ``auth_sets.pubkey_hash``) and ``DEVICE_ID`` (its common name, when one)
    of a certificate given to be revoked, or a 400."""
    if len(pem) > MAX_DEVICE_CERT:
        raise bad_request(f"certificate is larger than {MAX_DEVICE_CERT} characters")
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
        if len(certs) != 1:
            raise ValueError(f"{len(certs)} certificates")
        cert = certs[0]
        key_hash = sha256_hex(normalize_pubkey(cert.public_key()))
        names = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm) as e:
        raise bad_request(f"certificate must be exactly one PEM certificate ({e})") from None
    device_id = str(names[0]) if len(names) == 1 and is_device_id(names[0]) else None
    return serial_hex(cert.serial_number), key_hash, device_id


def revoke(c: sa.Connection, serial: str, pubkey_hash: str | None, device_id: str | None, reason: str,
           actor: str) -> tuple[dict[str, Any], str, list[str]]:
    """Revoke ``serial`` (what is known of it is completed from the auth sets it accepted) and reject the auth sets
    of its key and of the certificate. Returns the entry, ``new``, ``updated`` (revoked before; its key or device
    id learnt now) or ``unchanged``, and the auth sets rejected now (``device/auth set``). Idempotent."""
    certified = c.execute(sa.select(auth_sets.c.pubkey_hash, devices.c.identity_json)
                          .join(devices, devices.c.id == auth_sets.c.device_id)
                          .where(auth_sets.c.cert_serial == serial)).all()
    if pubkey_hash is None and len({r.pubkey_hash for r in certified}) == 1:
        pubkey_hash = certified[0].pubkey_hash
    if device_id is None and certified:
        found = json.loads(certified[0].identity_json).get(IDENTITY_KEY)
        device_id = found if is_device_id(found) else None
    row = c.execute(sa.select(revoked_certificates).where(revoked_certificates.c.serial == serial)
                    .with_for_update()).first()
    state = "new" if row is None else "unchanged"
    if row is None:
        c.execute(revoked_certificates.insert().values(serial=serial, pubkey_hash=pubkey_hash, device_id=device_id,
                                                       reason=reason, revoked_by=actor, revoked=now()))
    else:
        fill = {k: v for k, v in (("pubkey_hash", pubkey_hash), ("device_id", device_id))
                if v is not None and getattr(row, k) is None}
        if fill:
            c.execute(revoked_certificates.update().where(revoked_certificates.c.serial == serial).values(**fill))
            state = "updated"
        pubkey_hash = row.pubkey_hash or pubkey_hash
    which = auth_sets.c.cert_serial == serial
    if pubkey_hash is not None:
        which = which | (auth_sets.c.pubkey_hash == pubkey_hash)
    rejected = []
    for s in c.execute(sa.select(auth_sets.c.id, auth_sets.c.device_id).where(which, auth_sets.c.status != "rejected")
                       .order_by(auth_sets.c.device_id, auth_sets.c.id)).all():
        set_auth_status(c, s.device_id, s.id, "rejected")
        rejected.append(f"{s.device_id}/{s.id}")
    entry = c.execute(sa.select(revoked_certificates).where(revoked_certificates.c.serial == serial)).one()
    return entry_doc(entry), state, rejected


def entry_doc(row: Any) -> dict[str, Any]:
    return {"serial": row.serial, "pubkey_hash": row.pubkey_hash, "device_id": row.device_id, "reason": row.reason,
            "revoked_by": row.revoked_by, "revoked_ts": rfc3339(row.revoked)}


def revoked_list(c: sa.Connection, page: int, per_page: int) -> list[dict[str, Any]]:
    """The revoked certificates, newest first."""
    q = sa.select(revoked_certificates).order_by(revoked_certificates.c.revoked.desc(),
                                                 revoked_certificates.c.serial)
    return [entry_doc(r) for r in c.execute(q.limit(per_page).offset((page - 1) * per_page))]
