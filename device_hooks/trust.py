"""What the device trusts, and the floors that only go up.

- Release keys: every public key in ``[paths] trusted_keys`` (the signed image's), minus every revoked key.
  Revoked keys come from the image (``[paths] revoked_keys``: lines ``sha256:<hex of the DER
  SubjectPublicKeyInfo> [comment]``) and from ``revoked.json`` on ``/data``, which holds the union of every
  list an image of this device has shipped: it only grows, so booting an older slot cannot un-revoke a key.
- Security floor: the highest signed ``rootfs-image.security_version`` the device has committed (``floor.json``
  on ``/data``) and never lower than the running image's own. An artifact below it is refused whatever the
  deployment says; the server's ``allow_downgrade`` can allow an older *version*, never a lower floor.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

from artifacts import Verifier
from artifacts.keys import load_verifier
from ota_common.errors import OTAError

from .config import Config
from .install import SECURITY_VERSION, security_version
from .state import read_json, write_json

log = logging.getLogger(__name__)

FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")


def parse_revoked(text: str, source: str) -> set[str]:
    """The fingerprints of a revocation list; a malformed line is logged and skipped."""
    out = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fp = line.split()[0].lower()
        if FINGERPRINT.match(fp):
            out.add(fp)
        else:
            log.error("%s:%d: not a key fingerprint (sha256:<64 hex digits>): %r", source, n, line[:100])
    return out


class Trust:
    """The device's keys and floors, from its configuration and ``state_dir``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.revoked_file = cfg.state_dir / "revoked.json"
        self.floor_file = cfg.state_dir / "floor.json"

    # -- keys
    def revoked(self) -> set[str]:
        """The image's revocations merged into ``revoked.json`` (written when it grew); returns the union."""
        image = Path(self.cfg.paths.revoked_keys)
        shipped: set[str] = set()
        try:
            shipped = parse_revoked(image.read_text(), str(image))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("cannot read %s: %s", image, e.strerror)
        stored = {fp for fp in read_json(self.revoked_file).get("revoked", []) if isinstance(fp, str)
                  and FINGERPRINT.match(fp)}
        union = stored | shipped
        if union != stored:
            write_json(self.revoked_file, {"revoked": sorted(union)})
            log.info("revoked keys recorded on /data: %d (only ever grows)", len(union))
        return union

    def verifiers(self) -> list[Verifier]:
        """The release keys this device accepts: public keys only, none revoked."""
        d = Path(self.cfg.paths.trusted_keys)
        revoked = self.revoked()
        out: list[Verifier] = []
        for path in sorted(d.glob("*.pem")) if d.is_dir() else []:
            try:
                v = load_verifier(path)
            except OTAError as e:
                log.error("trusted key %s ignored: %s", path, e)
                continue
            if v.fingerprint in revoked:
                log.warning("trusted key %s is revoked (%s): ignored", path, v.fingerprint)
                continue
            out.append(v)
        return out

    # -- security floor
    def _stored_floor(self) -> int:
        stored = read_json(self.floor_file).get("security_version", 0)
        return stored if isinstance(stored, int) and stored >= 0 else 0

    def floor(self) -> int:
        return max(self._stored_floor(), self.cfg.device.security_version)

    def raise_floor(self, versions: Iterable[int]) -> int:
        """Persist the floor as the highest of itself and ``versions`` (never lower). Returns it."""
        current = self._stored_floor()
        new = max([current, self.cfg.device.security_version, *versions])
        if new != current:
            write_json(self.floor_file, {"security_version": new})
            log.info("security floor raised to %d", new)
        return new


__all__ = ["SECURITY_VERSION", "Trust", "parse_revoked", "security_version"]
