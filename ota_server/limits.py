"""Rate limits for unauthenticated work: in-process token buckets keyed by client address and by identity.

Each server process keeps its own buckets: with ``--workers N`` a client may get up to N times the configured
rate (the operating system spreads connections over the workers). A bucket of ``N/PERIOD`` holds N requests
and refills at N per PERIOD, so a burst of N passes at once and the sustained rate is N/PERIOD.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ota_common.errors import UserError

from .errors import APIError

#: buckets remembered per limiter; the least recently used ones are forgotten first (a forgotten key starts
#: again with a full bucket, so this bounds memory, not the rate of any one key that keeps asking)
MAX_KEYS = 100_000

_RATE = re.compile(r"(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*(s|sec|m|min|h)?", re.IGNORECASE)
_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Rate:
    """``count`` requests per ``period`` seconds (and a burst of ``count``)."""

    count: int
    period: float

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


def parse_rate(text: str, what: str = "rate") -> Rate | None:
    """``"30/60s"``, ``"5/s"``, ``"100/1m"``, ``"1000/h"``; ``"0"`` or ``"off"`` → None (no limit).

    Raises:
        UserError: the text is not such a rate.
    """
    value = text.strip().lower()
    if value in ("0", "off", "none"):
        return None
    m = _RATE.fullmatch(value)
    if m is None:
        raise UserError(f"{what}: {text!r} is not N/PERIOD (for example 30/60s, 5/s, 1000/h) or 'off'")
    count = int(m.group(1))
    period = float(m.group(2) or 1) * _UNITS[(m.group(3) or "s").lower()]
    if count == 0:
        return None
    if period <= 0:
        raise UserError(f"{what}: the period of {text!r} must be longer than 0")
    return Rate(count, period)


class TokenBuckets:
    """One token bucket per key, at most :data:`MAX_KEYS` keys (least recently used forgotten)."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)

    def take(self, key: str) -> float:
        """Take one token for ``key``. Returns 0 when it was there, else the seconds until one will be."""
        now = self._clock()
        tokens, when = self._buckets.pop(key, (float(self.rate.count), now))
        tokens = min(float(self.rate.count), tokens + (now - when) * self.rate.count / self.rate.period)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) * self.rate.period / self.rate.count
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait


class AuthLimiter:
    """The rate limits of ``POST .../authentication/auth_requests``: per client address (checked before the
    body is parsed) and per identity (checked once the signature verified, before the database is touched)."""

    def __init__(self, per_address: Rate | None, per_identity: Rate | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._address = TokenBuckets(per_address, clock) if per_address else None
        self._identity = TokenBuckets(per_identity, clock) if per_identity else None

    @classmethod
    def from_settings(cls, per_address: str, per_identity: str) -> AuthLimiter:
        """Raises:
            UserError: a rate is malformed."""
        return cls(parse_rate(per_address, "auth rate per address"), parse_rate(per_identity, "auth rate per identity"))

    def check_address(self, address: str) -> None:
        """Raises:
            APIError: 429 (with ``Retry-After``) when this address asked too often."""
        if self._address is not None:
            _refuse(self._address.take(address), "from this address")

    def check_identity(self, identity_hash: str) -> None:
        """Raises:
            APIError: 429 (with ``Retry-After``) when this identity asked too often."""
        if self._identity is not None:
            _refuse(self._identity.take(identity_hash), "for this identity")


def _refuse(wait: float, what: str) -> None:
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise APIError(429, f"too many auth requests {what}; try again in {seconds} s",
                       {"Retry-After": str(seconds)})


def parse_size(text: str, what: str = "size") -> int:
    """Bytes: ``65536``, ``64K``/``64KiB``, ``16M``/``16MiB``, ``1G`` (powers of 1024).

    Raises:
        UserError: the text is not such a size.
    """
    m = re.fullmatch(r"\s*(\d+)\s*(?:([kmg])(?:i?b)?|b)?\s*", text, re.IGNORECASE)
    if m is None:
        raise UserError(f"{what}: {text!r} is not a size (bytes, or with K, M, G: 64K, 16MiB)")
    unit = (m.group(2) or "").lower()
    return int(m.group(1)) * (1 << (10 * " kmg".index(unit or " ")))
