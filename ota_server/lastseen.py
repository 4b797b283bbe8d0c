""""Last seen": when the server last heard from a device, recorded in batches.

Every authenticated device request that shows the device is alive (``next`` polls, the idle-poll shortcut
included, status reports, logs, inventory, configuration) notes the device and the time in memory
(:meth:`LastSeen.seen`: a dict assignment, no I/O). A background task of each worker process writes what it
collected every ``last_seen_flush_seconds`` in one ``UPDATE`` (per :data:`BATCH` devices), and once more when the
worker stops. A fleet of 100,000 devices polling every 30 minutes is ~55 polls a second: one write every few
seconds instead of 55 a second, and the hot path stays read-only.

Several workers (and several servers on PostgreSQL) flush side by side, and a slow flush may land after a
newer one: the ``UPDATE`` only moves ``last_seen`` forward (``WHERE last_seen IS NULL OR last_seen < new``),
so the column never goes back. A flush that fails (database unreachable, a PostgreSQL deadlock between two
flushers) keeps its entries for the next one. ``last_seen`` therefore lags the truth by up to the flush
interval, which is far below the ``stale_after`` it is compared with.

Stale: an accepted device not heard from for ``stale_after`` (since it was last seen, or — never seen since
— since its status last changed, e.g. it was accepted). Devices that are not accepted are never stale: they
are not expected to poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import sqlalchemy as sa

from .db import Database
from .models import devices
from .timeutil import now

log = logging.getLogger("ota_server.lastseen")

#: devices written by one UPDATE statement (two bound parameters each: SQLite allows 32,766)
BATCH = 5000


class LastSeen:
    """The devices this process heard from since its last flush, with the newest time of each."""

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()  # flushes may run in a thread while requests note devices

    def seen(self, device_id: str, t: float | None = None) -> None:
        """Note that ``device_id`` (from a verified token) made a request at ``t`` (now). No I/O."""
        t = now() if t is None else t
        with self._lock:
            if self._pending.get(device_id, 0.0) < t:
                self._pending[device_id] = t

    def __len__(self) -> int:
        return len(self._pending)

    def _take(self) -> dict[str, float]:
        with self._lock:
            taken, self._pending = self._pending, {}
        return taken

    def _give_back(self, taken: dict[str, float]) -> None:
        with self._lock:
            for device_id, t in taken.items():
                if self._pending.get(device_id, 0.0) < t:
                    self._pending[device_id] = t

    def flush(self, db: Database) -> int:
        """Write the collected times (one UPDATE per :data:`BATCH` devices); returns the number of devices
        written. On a database error the entries are kept for the next flush and the error is raised."""
        taken = self._take()
        if not taken:
            return 0
        items = sorted(taken.items())  # one lock order for every flusher (PostgreSQL row locks)
        try:
            for start in range(0, len(items), BATCH):
                with db.write() as c:
                    c.execute(forward_update(items[start:start + BATCH]))
        except Exception:
            self._give_back(dict(items[start:]))
            raise
        return len(items)

    async def run(self, db: Database, interval: float) -> None:
        """Flush every ``interval`` seconds until cancelled (the lifespan flushes once more after that). A
        flush runs in a thread: the event loop keeps answering polls while it waits for the database."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.flush, db)
            except Exception as e:  # kept for the next flush; never kill the task
                log.warning("could not write the last-seen times of %d device(s), will retry: %s", len(self),
                            str(e).splitlines()[0] if str(e) else type(e).__name__)


def forward_update(items: list[tuple[str, float]]) -> sa.Update:
    """One ``WITH seen(id, t) AS (VALUES ...) UPDATE devices ... FROM seen`` that sets each device's
    ``last_seen`` to its time unless the row already holds a newer one (SQLite >= 3.33 and PostgreSQL both take
    it; SQLite does not take a column list on a VALUES alias, hence the CTE)."""
    batch = sa.values(sa.column("id", sa.String), sa.column("t", sa.Double), name="seen").data(items).cte("seen")
    return (devices.update().add_cte(batch)
            .where(devices.c.id == batch.c.id, sa.or_(devices.c.last_seen.is_(None), devices.c.last_seen < batch.c.t))
            .values(last_seen=batch.c.t))


def lifespan(db: Database, last_seen: LastSeen, interval: float) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: the flusher runs while the worker serves; at shutdown (after uvicorn let the
    in-flight requests finish) it is stopped and whatever it still holds is written."""

    @contextlib.asynccontextmanager
    async def span(_app: Any) -> AsyncIterator[None]:
        task = asyncio.create_task(last_seen.run(db, interval), name="last-seen flusher")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            try:
                last_seen.flush(db)
            except Exception as e:
                log.error("could not write the last-seen times of %d device(s) at shutdown: %s", len(last_seen), e)

    return span


# ---------------------------------------------------------------------------------------------------------
# Stale devices


def stale_clause(cutoff: float) -> sa.ColumnElement[bool]:
    """SQL: the device is stale at ``cutoff`` (= now - stale_after). Never NULL, so ``not_()`` of it is the
    non-stale devices. The ``(status, last_seen)`` index answers it."""
    return sa.and_(devices.c.status == "accepted",
                   sa.or_(devices.c.last_seen < cutoff,
                          sa.and_(devices.c.last_seen.is_(None), devices.c.updated < cutoff)))


def is_stale(status: str, last_seen: float | None, updated: float, cutoff: float) -> bool:
    """:func:`stale_clause` for one row already read."""
    return status == "accepted" and (last_seen if last_seen is not None else updated) < cutoff
