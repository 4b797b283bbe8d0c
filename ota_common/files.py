"""Reading a file the user named, with the error every caller wants: one line that names what and where."""

from __future__ import annotations

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
