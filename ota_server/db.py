"""Engine, connections and migrations.

SQLite is tuned for several worker processes sharing one file: WAL journal (readers never block the writer),
``busy_timeout`` (a writer waits for the lock instead of failing), ``synchronous=FULL`` (a commit survives a
power cut: a status report answered 204 is on disk), foreign keys on. Write transactions start with
``BEGIN IMMEDIATE`` so that two writers never deadlock on a read-then-write lock upgrade.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ota_common.errors import UserError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 (the driver we ship in the ``postgres`` extra)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as e:
        raise UserError(f"invalid database URL {url!r}: {e}") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise UserError("the SQLite database must be a file (sqlite:///PATH): several processes share it")
        Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": 30, "check_same_thread": False},
                                  pool_size=8, max_overflow=16)
        _tune_sqlite(engine)
        return engine
    if parsed.get_backend_name() != "postgresql":
        raise UserError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite:///PATH or postgresql://...")
    try:
        return sa.create_engine(parsed, pool_size=8, max_overflow=16, pool_pre_ping=True)
    except ModuleNotFoundError as e:
        raise UserError(f"PostgreSQL needs the psycopg driver (pip install 'vv-ota[postgres]'): {e}") from None


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=FULL", "foreign_keys=ON"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        if mode != "NONE":  # NONE: each statement is its own (implicit) transaction, as reads on the hot path
            conn.exec_driver_sql(f"BEGIN {mode}")


@contextmanager
def open_database(url: str) -> Iterator[Engine]:
    """An engine for one task of the command line (migrate, check, rotate, back up), disposed at the end.

    Raises:
        UserError: "cannot open the database" when it cannot be reached, or a statement of the block fails
            with an ``OperationalError``; what :func:`make_engine` raises for a bad URL.
    """
    engine = make_engine(url)
    try:
        yield engine
    except sa.exc.OperationalError as e:
        raise UserError(f"cannot open the database: {e.orig}") from None
    finally:
        engine.dispose()


class Database:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE") if self.is_sqlite else self.engine
        self._read_engine = self.engine.execution_options(sqlite_begin="NONE") if self.is_sqlite else self.engine
        self._local = threading.local()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reading. On SQLite no transaction is opened (one round trip less per query):
        every statement sees the latest commit, so use :meth:`write` when several reads must agree."""
        with self._read_engine.connect() as conn:
            yield conn

    def fetch(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Hot-path read through the driver directly (no statement building, no result processing):
        ``sql`` uses ``?`` placeholders, rewritten once per statement for drivers that want ``%s``.

        Each thread keeps one connection of its own for these reads (taken out of the pool once, with the
        pragmas applied on SQLite), in autocommit mode: a poll or a report's token check skips the pool's
        checkout, ping and reset (on PostgreSQL three round trips more than the query), and every statement sees
        the latest commit of any process. A PostgreSQL connection found broken (the server restarted) is
        replaced and the read asked once more."""
        if not self.is_sqlite:
            sql = _format_sql(sql)
        for attempt in (1, 2):
            fairy = getattr(self._local, "fairy", None)
            if fairy is None:
                fairy = self._local.fairy = self._own_connection()
            try:
                cur = fairy.cursor()
                try:
                    cur.execute(sql, params)
                    return list(cur.fetchall())
                finally:
                    cur.close()
            except Exception as e:
                self._local.fairy = None
                with contextlib.suppress(Exception):
                    fairy.close()
                dbapi = self.engine.dialect.dbapi
                if self.is_sqlite or attempt == 2 or dbapi is None or not isinstance(
                        e, dbapi.OperationalError | dbapi.InterfaceError):
                    raise
        raise AssertionError("unreachable")

    def _own_connection(self) -> Any:
        """A connection out of the pool for :meth:`fetch` (it lives as long as its thread), in autocommit mode."""
        fairy = self.engine.raw_connection()
        driver: Any = fairy.driver_connection
        fairy.detach()  # the pool forgets it
        if not self.is_sqlite:  # (SQLite's connections are in autocommit mode already: we issue BEGIN ourselves)
            driver.rollback()  # whatever the pool's ping opened
            driver.autocommit = True
        return fairy

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One short write transaction, committed when the block ends without an exception; then the
        :func:`after_commit` callbacks registered on it run."""
        conn: Connection | None = None
        try:
            with self._write_engine.begin() as conn:
                yield conn
        except BaseException:
            if conn is not None:
                _AFTER_COMMIT.pop(conn, None)
            raise
        for callback in _AFTER_COMMIT.pop(conn, ()):
            callback()

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """An ORM session; with ``write=True`` it commits at the end of the block."""
        with Session(self._write_engine if write else self.engine, expire_on_commit=False) as s:
            if write:
                with s.begin():
                    yield s
            else:
                yield s

    def dispose(self) -> None:
        self.engine.dispose()


#: what to do once a :meth:`Database.write` transaction committed (a rolled-back one forgets them)
_AFTER_COMMIT: weakref.WeakKeyDictionary[Connection, list[Callable[[], None]]] = weakref.WeakKeyDictionary()


@contextmanager
def savepoint(conn: Connection) -> Iterator[None]:
    """A savepoint inside a :meth:`Database.write` transaction: when the block raises, what it did is rolled
    back — and so are the :func:`after_commit` callbacks it registered (an outcome counted by a report that
    failed must not be counted) — while the rest of the transaction goes on."""
    registered = len(_AFTER_COMMIT.get(conn, ()))
    try:
        with conn.begin_nested():
            yield
    except BaseException:
        callbacks = _AFTER_COMMIT.get(conn)
        if callbacks is not None:
            del callbacks[registered:]
        raise


@functools.lru_cache(maxsize=512)
def _format_sql(sql: str) -> str:
    """``sql`` with ``?`` placeholders for psycopg (``%s``; a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def driver_execute(conn: Connection, sql: str, params: Sequence[Any] = ()) -> tuple[list[tuple[Any, ...]], int]:
    """Run one statement of the hot path on the driver connection under ``conn`` (inside its transaction), with
    no statement building and no result processing: what a status report in a group commit costs is mostly
    SQLAlchemy's per-statement work otherwise, several times the statement's own. ``sql`` uses ``?``
    placeholders (rewritten for psycopg) and portable SQL. Returns (the rows it returned, rows it changed)."""
    driver = conn.connection.driver_connection
    assert driver is not None, "driver_execute needs an open connection"
    cur = driver.cursor()
    try:
        cur.execute(sql if conn.dialect.name == "sqlite" else _format_sql(sql), tuple(params))
        return (list(cur.fetchall()) if cur.description is not None else []), cur.rowcount
    finally:
        cur.close()


def after_commit(conn: Connection, callback: Callable[[], None]) -> None:
    """Run ``callback`` when the :meth:`Database.write` transaction of ``conn`` has committed; never when it
    rolls back (nor for a connection that is not one of :meth:`Database.write`'s). For effects outside the
    database that must match what it holds, such as counting deployment outcomes."""
    _AFTER_COMMIT.setdefault(conn, []).append(callback)


SelectT = TypeVar("SelectT", bound=sa.Select[Any])


def where_given(query: SelectT, column: sa.ColumnElement[Any], value: Any) -> SelectT:
    """``query`` narrowed to the rows whose ``column`` equals ``value``; all its rows when ``value`` is None (a
    list's filter parameter left out)."""
    return query if value is None else query.where(column == value)


#: key of the PostgreSQL advisory lock held while migrating: two processes starting at once never both migrate
MIGRATION_LOCK = 0x76765F6F7461  # "vv_ota"


def advisory_xact_lock(conn: Connection, key: str) -> None:
    """Serialize transactions that work on ``key`` (e.g. one owner's configuration variables) until the end of
    the current transaction. PostgreSQL: ``pg_advisory_xact_lock``; SQLite needs nothing, its write
    transactions already run one at a time (``BEGIN IMMEDIATE``)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": key})


def _alembic_config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    """The newest migration this code knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return str(head)


def _current_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    rev = MigrationContext.configure(conn).get_current_revision()
    return None if rev is None else str(rev)


def _known(rev: str | None) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    if rev is None:
        return True
    try:
        return ScriptDirectory.from_config(_alembic_config()).get_revision(rev) is not None
    except CommandError:
        return False


def _newer_error(rev: str) -> UserError:
    return UserError(f"the database schema is at revision {rev}, which this server does not know (it knows up to "
                     f"{head_revision()}): it was migrated by a newer version; run that version")


def migrate(url: str, revision: str = "head") -> tuple[str | None, str]:
    """Bring the schema to ``revision`` (the newest by default). Safe when several processes start at once: on
    PostgreSQL the whole migration runs under an advisory lock (the others wait, then find nothing to do), on
    SQLite in one ``BEGIN IMMEDIATE`` transaction. Returns (revision before, revision after).

    Raises :class:`UserError` when the database cannot be opened, was migrated by a newer version, or a
    migration refuses the data it finds (its message says what to do)."""
    from alembic import command

    with open_database(url) as base:
        cfg = _alembic_config()
        with base.execution_options(sqlite_begin="IMMEDIATE").begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            before = _current_revision(conn)
            if not _known(before):
                raise _newer_error(str(before))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            after = _current_revision(conn)
        return before, str(after)


def check_schema(url: str) -> str:
    """For a server started without migrating: the schema must be exactly the one this code expects. Returns
    the revision; raises :class:`UserError` saying to run ``build.py server migrate`` (behind) or the newer
    version (ahead), or that the database cannot be opened."""
    with open_database(url) as engine, engine.connect() as conn:
        current = _current_revision(conn)
    head = head_revision()
    if current == head:
        return head
    if not _known(current):
        raise _newer_error(str(current))
    raise UserError(f"the database schema is at revision {current or '(empty)'}, this server needs {head}: run "
                    "`build.py server migrate` once (with the same --db), then start the servers")


def now() -> float:
    return time.time()
