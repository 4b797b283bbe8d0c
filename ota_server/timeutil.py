"""Timestamps are stored as epoch seconds and shown as RFC 3339 (UTC, ``Z``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime


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
