"""The status reports of one group commit (:mod:`.groupcommit`) stored with a few set-based statements.

One report alone (:func:`.deployments.report_status`) reads and locks its row, then writes it: two statements,
and on PostgreSQL two round trips from the commit thread, each of which also waits for the GIL while the event
loop is busy. A batch of N reports paid 2N of them. :class:`ReportBatch` instead reads and locks the rows of
all the batch's reports in one statement, in (deployment id, device id) order (the lock order of
:mod:`.groupcommit`), decides each report on its row with the same rules (:func:`.deployments.classify_report`:
pure), and writes the progress reports and substates of the batch with one statement (several reports of one
device merge into one row of it), a deployment still ``pending`` marked started once.

Exactness: a report that must fail (404, 409, 400) is decided on its row before anything is written, so it
fails alone and the batch goes on (no rollback, no second try). A report that needs the database (a final
status, a failure with a retry left: the deployment's row, its statistics and failure accounting) first
flushes the writes queued so far, so what it counts is what reports one by one would have left, then runs as
:func:`.deployments.write_report`; its device's later reports in the batch read their row again. Anything else
that touches a device's row in the batch (a log upload) goes through :meth:`ReportBatch.touched` first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Connection

from .db import driver_execute
from .deployments import (
    Report,
    ReportRow,
    Step,
    classify_report,
    mark_started,
    report_status,
    write_report,
)
from .errors import found_or_404
from .timeutil import now

Key = tuple[str, str]

_ROWS_COLUMNS = ("SELECT dd.deployment_id, dd.device_id, dd.status, dd.active, dd.attempts, dd.delivered_attempt, "
                 "d.status, d.retries FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id ")
#: the rows of the batch's reports, locked in (deployment id, device id) order; PostgreSQL: two arrays
ROWS_PG_SQL = (_ROWS_COLUMNS + "JOIN unnest(?::text[], ?::text[]) AS k(deployment_id, device_id) "
               "ON dd.deployment_id = k.deployment_id AND dd.device_id = k.device_id "
               "ORDER BY dd.deployment_id, dd.device_id FOR UPDATE OF dd")
#: the same on SQLite (its write transactions are serial: no lock), ``{}``: one ``(?, ?)`` per key
ROWS_SQLITE_SQL = _ROWS_COLUMNS + "WHERE (dd.deployment_id, dd.device_id) IN (VALUES {})"
#: the batch's progress and substate writes, one row each: status, substate, and whether the device moved
#: forward (``started`` set when it was not)
WRITE_PG_SQL = (
    "UPDATE deployment_devices AS dd SET status = v.status, substate = v.substate, "
    "started = CASE WHEN v.progress THEN COALESCE(dd.started, ?) ELSE dd.started END "
    "FROM unnest(?::text[], ?::text[], ?::text[], ?::text[], ?::boolean[]) "
    "AS v(deployment_id, device_id, status, substate, progress) "
    "WHERE dd.deployment_id = v.deployment_id AND dd.device_id = v.device_id")
WRITE_SQLITE_SQL = ("UPDATE deployment_devices SET status = ?, substate = ?, "
                    "started = CASE WHEN ? THEN COALESCE(started, ?) ELSE started END "
                    "WHERE deployment_id = ? AND device_id = ?")
#: at most this many keys per read on SQLite (two bound parameters each; SQLite allows 32766)
SQLITE_CHUNK = 4096


class ReportBatch:
    """The reports of one write transaction (see the module's docstring). Create it with the keys of every
    report the transaction will apply (their rows are read and locked here), call :meth:`report` for each in
    key order, :meth:`touched` before anything else writes a device's row, and :meth:`flush` before the
    commit."""

    def __init__(self, conn: Connection, keys: Sequence[Key]) -> None:
        self.conn = conn
        self.pg = conn.dialect.name == "postgresql"
        self._rows: dict[Key, ReportRow] = {}
        #: keys whose row changed other than through the queued writes: their reports read it again
        self._stale: set[Key] = set()
        #: queued writes: key -> [status, substate, moved forward]
        self._writes: dict[Key, list[Any]] = {}
        self._started: set[str] = set()
        #: statements run, for the tests and the bench
        self.statements = 0
        self._read(sorted(set(keys)))

    def _read(self, keys: list[Key]) -> None:
        if not keys:
            return
        if self.pg:
            rows = self._driver(ROWS_PG_SQL, ([k[0] for k in keys], [k[1] for k in keys]))
        else:
            rows = []
            for i in range(0, len(keys), SQLITE_CHUNK):
                chunk = keys[i:i + SQLITE_CHUNK]
                rows += self._driver(ROWS_SQLITE_SQL.format(", ".join(["(?, ?)"] * len(chunk))),
                                     tuple(v for k in chunk for v in k))
        for r in rows:
            self._rows[(r[0], r[1])] = ReportRow(*r[2:])

    def _driver(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """One statement on the driver connection (:func:`.db.driver_execute`, counted); its rows."""
        self.statements += 1
        return driver_execute(self.conn, sql, params)[0]

    def report(self, deployment_id: str, device_id: str, status: str, substate: str | None) -> Report:
        """Apply one report (its key given to the constructor), as :func:`.deployments.report_status` would at
        this point of the transaction.

        Raises:
            APIError: 404, 409, 400 as :func:`.deployments.report_status`; nothing of the report was written.
        """
        key = (deployment_id, device_id)
        if key in self._stale:
            self.flush()
            return report_status(self.conn, deployment_id, device_id, status, substate)
        row = found_or_404(self._rows.get(key), "deployment for this device")
        step = classify_report(row, status, substate)
        if step == Step.IGNORE:
            return Report("ignored", row.status)
        if step == Step.WRITE:
            self.flush()
            self._stale.add(key)
            return write_report(self.conn, row, deployment_id, device_id, status, substate)
        queued = self._writes.setdefault(key, [row.status, None, False])
        queued[1] = substate
        if step == Step.SUBSTATE:
            return Report("ignored", row.status)
        assert step == Step.FORWARD
        queued[0], queued[2] = status, True
        self._rows[key] = row._replace(status=status)
        if row.dep_status == "pending" and deployment_id not in self._started:  # never goes back to pending
            self._started.add(deployment_id)
            mark_started(self.conn, deployment_id)
            self.statements += 1
        return Report("stored", status)

    def touched(self, key: Key) -> None:
        """Something else is about to write the row of ``key`` (queued writes go first); the key's later
        reports read it again."""
        self.flush()
        self._stale.add(key)

    def flush(self) -> None:
        """Write the queued progress and substate writes (one statement)."""
        if not self._writes:
            return
        writes, self._writes = self._writes, {}
        t = now()
        if self.pg:
            keys = list(writes)
            self._driver(WRITE_PG_SQL, (t, [k[0] for k in keys], [k[1] for k in keys], [writes[k][0] for k in keys],
                                        [writes[k][1] for k in keys], [writes[k][2] for k in keys]))
            return
        self.statements += 1
        driver = self.conn.connection.driver_connection
        assert driver is not None
        driver.executemany(WRITE_SQLITE_SQL, [(w[0], w[1], w[2], t, k[0], k[1]) for k, w in writes.items()])
