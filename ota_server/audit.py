"""The audit log: every management change (and every refused attempt of a known token), who made it (the token's
name), what (method, path and a short summary) and when. Entries are written in the transaction of the change
they describe, so the log holds exactly the changes that were committed."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from .models import audit_log
from .timeutil import now, rfc3339

MAX_SUMMARY = 1000
MAX_PATH = 2048
MAX_LIMIT = 1000
#: the largest id the column holds on every database (``audit_log.id`` is an INTEGER: 32 bits on PostgreSQL); a
#: ``before`` past it means "from the newest" and is not sent as a bound PostgreSQL cannot compare (a 500 before)
MAX_ID = 2**31 - 1


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def record(c: sa.Connection, actor: str, method: str, path: str, summary: str) -> None:
    """Add one entry (inside the caller's transaction)."""
    c.execute(audit_log.insert().values(ts=now(), actor=clip(actor, 128), method=clip(method, 16),
                                        path=clip(path, MAX_PATH), summary=clip(summary, MAX_SUMMARY)))


def entries(c: sa.Connection, limit: int = 100, before: int | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` entries older than entry ``before`` (all when None), newest first."""
    q = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(max(1, min(limit, MAX_LIMIT)))
    if before is not None and before <= MAX_ID:
        q = q.where(audit_log.c.id < before)
    return [{"id": r.id, "time": rfc3339(r.ts), "ts": r.ts, "actor": r.actor, "method": r.method, "path": r.path,
             "summary": r.summary} for r in c.execute(q)]


def names(values: Any, limit: int = 10) -> str:
    """``a, b, c`` (sorted), ``… (+n more)`` past ``limit``: names in a summary, never values."""
    items = sorted(str(v) for v in values)
    text = ", ".join(items[:limit])
    return text + (f" … (+{len(items) - limit} more)" if len(items) > limit else "") if items else "none"
