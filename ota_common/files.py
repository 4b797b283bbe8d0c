"""Files: reading one the user named, with the error every caller wants (one line that names what and where),
and the SHA-256 of a file of any size."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import UserError


def read_input(path: Path, what: str, error: type[UserError] = UserError) -> bytes:
    """The bytes of ``path``. Raises ``error`` (a :class:`UserError`): ``<what> not found: <path>`` or
    ``cannot read <what> <path>: <reason>``."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 4 MiB pieces. Raises ``OSError``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(4 << 20):
            h.update(b)
    return h.hexdigest()
