"""Group commit of device reports: many concurrent status reports (and log uploads) share one write transaction
and one commit, and each is still acknowledged only once it is durable.

Why: a status report is a tiny write, and its cost is the commit (an fsync with SQLite's ``synchronous=FULL``,
a WAL flush on PostgreSQL): one transaction per report caps a worker at a few hundred reports/s. Here a
report's operation is queued; a flusher (one per event loop, i.e. per worker, running while there is work)
takes everything queued, runs it in one write transaction on a thread of its own (the event loop goes on
reading requests during the commit: that is what fills the next batch), commits once, and only then resolves
each request's future with its own result or error. So a 204 still means "on disk". The batch first runs
without savepoints (one costs about as much as a report's own statements); when an operation raises (a 409 for
an aborted deployment, a 400, a bug), that try is rolled back and the batch runs again with each operation in
its own savepoint (:func:`.db.savepoint`), so the failing report fails alone and the others are stored. A
commit that fails fails every report of the batch (none was acknowledged). Status reports (:meth:`report`) go
further on PostgreSQL: the first try stores all of them with a few set-based statements (:mod:`.reportbatch`),
and one that must fail (404, 409, 400) is decided before anything of it is written, so it fails alone without a
second try.

Lock order (see :mod:`.deployments`): every operation locks device rows (``deployment_devices``) before the
deployment row. One transaction doing many of them would break that order (report 1 locks deployment D, report
2 then locks a device row of D), so a batch first locks all its device rows in (deployment id, device id) order
in one statement (a batch of status reports only: the statement that reads their rows), and runs its
operations in that order, which takes the deployment rows in id order. Two
batches (two workers on PostgreSQL), or a batch and an abort, thus take locks in one global order and cannot
deadlock. On SQLite write transactions are serial anyway (``BEGIN IMMEDIATE``) and the lock statement is left
out.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .db import Database, savepoint
from .deployments import Report, report_status
from .errors import APIError
from .models import deployment_devices as dd
from .reportbatch import ReportBatch

T = TypeVar("T")
#: operations per transaction at most: a long batch delays the first report's answer for little gain
MAX_BATCH = 512


@dataclass
class _Op:
    key: tuple[str, str]
    fn: Callable[[Connection], Any]
    future: asyncio.Future[Any]
    #: a status report's (status, substate): applied through the batch's :class:`.reportbatch.ReportBatch`
    #: (``fn`` does the same alone: the second try, with savepoints)
    report: tuple[str, str | None] | None = None


@dataclass
class _LoopState:
    pending: list[_Op] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None


class GroupCommitter:
    """Runs operations of device reports in shared transactions (see the module's docstring)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        #: per event loop (a worker has one; a test client may run a loop per request)
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        #: batches committed and operations in them, for the tests and the bench
        self.batches = 0
        self.operations = 0
        #: batches run a second time, with savepoints, because an operation in them failed
        self.retried = 0
        #: store status reports with set-based statements (:mod:`.reportbatch`): on PostgreSQL, where each
        #: statement is a round trip from the commit thread; SQLite's statements cost no round trip, and its
        #: report path was measured as fast or faster one report at a time (the tests turn it on there too)
        self.set_based = not db.is_sqlite
        #: statements of the batches' reports (:class:`.reportbatch.ReportBatch`; their lock statement and
        #: commit not counted), for the tests and the bench
        self.statements = 0

    async def run(self, deployment_id: str, device_id: str, fn: Callable[[Connection], T]) -> T:
        """``fn(conn)`` inside a shared write transaction; returns its result once the transaction committed,
        or raises what it raised (nothing of it stored) or what the commit raised. ``fn`` touches only the rows
        of this device in this deployment (and, after them, the deployment's row), runs on another thread, and
        may run twice (a batch in which an operation failed runs again, see the module's docstring): it acts on
        the database only, and on anything else through :func:`.db.after_commit`."""
        result: T = await self._queue(_Op((deployment_id, device_id), fn, asyncio.get_running_loop().create_future()))
        return result

    async def report(self, deployment_id: str, device_id: str, status: str, substate: str | None) -> Report:
        """A device's status report (:func:`.deployments.report_status`) in a shared write transaction, where
        the batch's reports are read, decided and written together (:mod:`.reportbatch`); returns once committed.

        Raises:
            APIError: 404, 409, 400 as :func:`.deployments.report_status` (this report is not stored; the others
                of its batch are); what the commit raised.
        """
        result: Report = await self._queue(_Op(
            (deployment_id, device_id), lambda c: report_status(c, deployment_id, device_id, status, substate),
            asyncio.get_running_loop().create_future(), (status, substate)))
        return result

    async def _queue(self, op: _Op) -> Any:
        """Queue ``op`` for this event loop's next batch (starting its flusher); its result once committed."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _LoopState()
        state.pending.append(op)
        if state.flusher is None or state.flusher.done():
            state.flusher = loop.create_task(self._flush(state))
        return await op.future

    async def _flush(self, state: _LoopState) -> None:
        while state.pending:
            batch, state.pending = state.pending[:MAX_BATCH], state.pending[MAX_BATCH:]
            batch.sort(key=lambda op: op.key)  # stable: one device's reports keep their order
            try:
                results = await asyncio.to_thread(self._commit, batch)
            except BaseException as e:  # noqa: BLE001 - every waiting request gets the error (cancelled: the loop ends)
                results = [(False, e)] * len(batch)
            for op, (ok, value) in zip(batch, results, strict=True):
                if op.future.done():  # the request went away; its operation is stored all the same
                    continue
                if ok:
                    op.future.set_result(value)
                else:
                    op.future.set_exception(value)

    def _commit(self, batch: Sequence[_Op]) -> list[tuple[bool, Any]]:
        """Run the batch in one transaction and commit: first without savepoints (a savepoint costs about as
        much as a report); when an operation raises, that attempt is rolled back and the batch runs again with
        each operation in its own savepoint, so that the failing one fails alone. Returns (ok, result or error)
        for each operation, in order; every operation gets the error when the commit fails."""
        try:
            try:
                results = self._attempt(batch, savepoints=False)
            except _OperationFailed:
                results = self._attempt(batch, savepoints=True)
                self.retried += 1
        except Exception as e:  # noqa: BLE001 - the commit failed: nothing of the batch is stored
            return [(False, e)] * len(batch)
        self.batches += 1
        self.operations += len(batch)
        return results

    def _attempt(self, batch: Sequence[_Op], savepoints: bool) -> list[tuple[bool, Any]]:
        """One try at the batch's transaction. Without ``savepoints`` an operation that raises rolls the whole
        transaction back (:class:`_OperationFailed`); with them it fails alone, its savepoint rolled back."""
        results: list[tuple[bool, Any]] = []
        with self.db.write() as conn:
            reports = None if savepoints or not self.set_based else [op.key for op in batch if op.report is not None]
            if not reports or len(reports) < len(batch):  # (the reports' read locks their rows in this order)
                lock_device_rows(conn, [op.key for op in batch])
            rb = ReportBatch(conn, reports) if reports else None
            for op in batch:
                if rb is not None and op.report is not None:
                    try:
                        results.append((True, rb.report(*op.key, *op.report)))
                    except APIError as e:  # decided before anything of it was written: it fails alone
                        results.append((False, e))
                    except Exception as e:
                        raise _OperationFailed from e
                    continue
                if rb is not None:
                    rb.touched(op.key)
                if not savepoints:
                    try:
                        results.append((True, op.fn(conn)))
                    except Exception as e:
                        raise _OperationFailed from e  # out of the block: the transaction rolls back
                    continue
                try:
                    with savepoint(conn):
                        results.append((True, op.fn(conn)))
                except Exception as e:  # noqa: BLE001 - this operation's answer; the others go on
                    results.append((False, e))
            if rb is not None:
                try:
                    rb.flush()
                except Exception as e:
                    raise _OperationFailed from e
                self.statements += rb.statements
        return results


class _OperationFailed(Exception):
    """An operation of a batch run without savepoints raised: that try is rolled back."""


def lock_device_rows(conn: Connection, keys: Sequence[tuple[str, str]]) -> None:
    """Lock the ``deployment_devices`` rows of ``keys`` ((deployment id, device id)) in that order, the lock
    order of a batch (PostgreSQL; SQLite's write transactions are serial anyway)."""
    if conn.dialect.name != "postgresql" or not keys:
        return
    wanted = sorted(set(keys))
    conn.execute(sa.select(dd.c.deployment_id, dd.c.device_id)
                 .where(sa.tuple_(dd.c.deployment_id, dd.c.device_id).in_(wanted))
                 .order_by(dd.c.deployment_id, dd.c.device_id).with_for_update())
