"""Timestamps are stored as epoch seconds and shown as RFC 3339 (UTC, ``Z``)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from ota_common.errors import UserError

#: seconds per unit of a duration (``90s``, ``30m``, ``12h``, ``7d``)
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def now() -> float:
    return time.time()


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(value: str) -> float:
    """Epoch seconds of an RFC 3339 timestamp with an offset (``Z`` or ``+hh:mm``); ValueError otherwise."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone offset (write e.g. 2024-05-01T12:00:00Z)")
    return dt.timestamp()


def parse_duration(text: str, what: str = "duration", low: float = 1, high: float = 365 * 86400) -> float:
    """Seconds from ``90``, ``0.5``, ``90s``, ``30m``, ``12h`` or ``7d``, between ``low`` and ``high``.

    Raises:
        UserError: the text is not such a duration (``what`` names the setting in the message).
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text, re.IGNORECASE)
    value = float(m.group(1)) * DURATION_UNITS[(m.group(2) or "s").lower()] if m else None
    if value is None or not low <= value <= high:
        raise UserError(f"{what}: {text!r} is not a duration from {low:g} s to {high:g} s (seconds, or e.g. 90s, "
                        "30m, 12h, 7d)")
    return value
