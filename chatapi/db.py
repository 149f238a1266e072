"""The database engine and units of work.

SQLite (the zero-setup default) runs in one process; its writes are
serialised by one gevent lock per process, so a greenlet never sits in
SQLite's busy handler (which would block the whole gevent hub) while another
greenlet holds the write lock. PostgreSQL needs no such lock: the chat rules
take row locks inside each transaction.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent.lock
import psycopg2
from psycopg2.extras import NamedTupleCursor
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError

from chatapi.config import Settings

log = logging.getLogger(__name__)

# How long a SQLite connection waits for a lock held by another process
# (a migration, a backup) before giving up.
SQLITE_BUSY_TIMEOUT_MS = 10_000
# A pooled PostgreSQL connection that was idle longer than this is pinged
# before use, so a database restart does not surface as a failed request.
# One used more recently is assumed alive: pinging on every checkout
# (pool_pre_ping) took 16-18% of a busy worker's samples (docs/performance.md).
PING_IF_IDLE_SECS = 1.0
# How long a request waits for a pooled connection (the pool's checkout
# timeout), and at most for a connection slot of the server (_wait_for_slots).
POOL_TIMEOUT_SECS = 10
# Between attempts to connect while the server has no free connection slot:
# from the first pause, doubling, up to the last.
SLOT_RETRY_FIRST_SECS = 0.05
SLOT_RETRY_MAX_SECS = 0.5
# What PostgreSQL says when it refuses a connection for want of a slot, all
# SQLSTATE 53300 (too_many_connections): max_connections reached, the last
# slots reserved (for superusers, or pg_use_reserved_connections), or a
# role's or a database's CONNECTION LIMIT. psycopg2 gives no SQLSTATE for a
# failed connection attempt, only the server's message (in English unless
# the server's lc_messages says otherwise).
_OUT_OF_SLOTS = (
    "too many clients already",
    "remaining connection slots are reserved",
    "too many connections for role",
    "too many connections for database",
)
# False while the warm-up opens connections: it stops at the first refusal
# instead of holding the connections it opened while it waits for a slot.
_waits_for_slots = contextvars.ContextVar("waits_for_slots", default=True)
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
NOT_MIGRATED = "the database schema is not migrated (alembic upgrade head)"


class SchemaNotMigrated(Exception):
    """A new PostgreSQL connection found no tables to prepare its statements on (prepared.py).

    Requests answer 503, as while the database is down, and /readyz says why.
    The pool keeps no such connection, so once `alembic upgrade head` has run
    the next connection it opens is set up: no restart is needed.
    """

    def __init__(self) -> None:
        super().__init__(NOT_MIGRATED)


def driver_message(error: BaseException) -> str:
    """What the database driver said about `error`, on one line, for the log.

    The first line of the driver's own error (SQLAlchemy's `orig`), never the
    statement or its parameters, which may hold users' text.
    """
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def out_of_connection_slots(error: BaseException) -> bool:
    """Whether `error` is PostgreSQL refusing a new connection only because its connection slots are taken (53300)."""
    cause = getattr(error, "orig", None) or error
    if not isinstance(cause, psycopg2.OperationalError):
        return False
    if cause.pgcode is not None:
        return cause.pgcode == "53300"
    return any(message in str(cause) for message in _OUT_OF_SLOTS)


def code_revisions(migrations: Path = MIGRATIONS_DIR) -> tuple[str | None, set[str]]:
    """The head revision of migrations/versions (None unless there is exactly one), and every revision there.

    Read from each file's `revision` and `down_revision`, not by alembic's
    ScriptDirectory: importing that (with mako and pygments) cost each worker
    8 MB and 70 ms. tests/test_migrations.py checks the two agree.
    """
    revisions: set[str] = set()
    parents: set[str | None] = set()
    for path in (migrations / "versions").glob("*.py"):
        names = _assigned(path, ("revision", "down_revision"))
        if "revision" not in names:
            continue  # not a migration (an __init__.py, say): alembic skips it too
        revisions.add(names["revision"])
        down = names.get("down_revision")
        parents.update(down if isinstance(down, (tuple, list)) else (down,))
    heads = revisions - parents
    return (heads.pop() if len(heads) == 1 else None), revisions


def _assigned(path: Path, wanted: tuple[str, ...]) -> dict[str, Any]:
    """The literal values a module assigns to the `wanted` names at its top level."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        # `revision = "0002"`, or `revision: str = "0002"` as alembic's own template writes it.
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Assign):
            targets = node.targets
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id in wanted and node.value is not None:
                found[target.id] = ast.literal_eval(node.value)
    return found


class Database:
    def __init__(self, settings: Settings) -> None:
        self.is_postgresql = settings.is_postgresql
        if self.is_postgresql:
            # Two pools. Reads, and units of work that are one statement (the
            # hot paths call server-side functions, see chat.py), run in
            # autocommit: under READ COMMITTED every statement takes its own
            # snapshot anyway, and a single statement is its own transaction,
            # so BEGIN and COMMIT would only add round trips. Those
            # connections are autocommit from birth: switching connections of
            # one pool per checkout costs a call at every checkout and checkin,
            # and a reset that fails at checkin (the database just went away)
            # escapes SQLAlchemy unwrapped and loses the pool slot for good.
            self.engine = _make_postgresql_engine(settings, pool_size=settings.db_write_pool_size, max_overflow=0)
            self.autocommit_engine = _make_postgresql_engine(
                settings,
                pool_size=settings.db_pool_size,
                max_overflow=settings.db_max_overflow,
                isolation_level="AUTOCOMMIT",
            )
        else:
            self.engine = self.autocommit_engine = _make_sqlite_engine(settings)
        self._write_lock = None if self.is_postgresql else gevent.lock.BoundedSemaphore(1)
        # Read once, at start: /readyz is probed often.
        self.schema_head, self._known_revisions = code_revisions()

    @property
    def engines(self) -> tuple[Engine, ...]:
        """Every engine (one on SQLite; writes and reads on PostgreSQL)."""
        return (self.engine,) if self.engine is self.autocommit_engine else (self.engine, self.autocommit_engine)

    # Units of work get Core connections, not ORM sessions: the chat rules
    # select columns and write with Core statements, never entities, and a
    # session per unit of work cost more CPU than its queries.

    @contextlib.contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection for reads; it goes back to the pool at the end."""
        with self.autocommit_engine.connect() as connection:
            yield connection

    def fetch_all(self, statement: str, params: dict[str, Any]) -> list[Any]:
        """PostgreSQL only: run one statement in its own transaction; its rows, as named tuples.

        For the hottest calls (chat.py's server-side functions and its token
        lookup), on a bare psycopg2 cursor: for a textual statement
        SQLAlchemy's Connection rebuilds the result's column metadata on every
        call, which cost more Python than the rest of the request. Being
        autocommit, the statement is atomic and durable without a BEGIN and a
        COMMIT round trip. Errors are raised as SQLAlchemy's, and a connection
        that lost the server is invalidated, as a SQLAlchemy Connection does.
        """
        connection = self.autocommit_engine.raw_connection()
        try:
            with connection.cursor(cursor_factory=NamedTupleCursor) as cursor:
                cursor.execute(statement, params)
                return cursor.fetchall()
        except psycopg2.Error as exc:
            # Raised as SQLAlchemy's error classes, like every other query's.
            disconnected = self.autocommit_engine.dialect.is_disconnect(exc, connection.dbapi_connection, None)
            if disconnected:
                connection.invalidate(exc)
            raise DBAPIError.instance(
                statement, params, exc, psycopg2.Error, connection_invalidated=disconnected
            ) from exc
        finally:
            connection.close()

    @contextlib.contextmanager
    def writing(self) -> Iterator[Connection]:
        """One unit of work: commits at the end of the block, rolls back on error."""
        lock = self._write_lock or contextlib.nullcontext()
        with lock, self.engine.begin() as connection:
            yield connection

    def warm_up(self, count: int) -> None:
        """PostgreSQL: open autocommit connections until the pool holds `count`, and leave them in it.

        So that the first requests after a start find connections ready
        instead of each opening one (docs/performance.md, change 31). The
        connections requests hold count too: were the warm-up to wait for
        one of those, it would hold every other one meanwhile, and requests
        would queue behind it for up to the pool's timeout. While the pool
        holds fewer than its size plus overflow, a checkout never waits. A
        database that cannot be reached now is not an error here: requests
        open connections as they need them, and /readyz tells.
        """
        if not self.is_postgresql:
            return
        pool = self.autocommit_engine.pool
        opened = []
        # Without waiting for a slot (_wait_for_slots): meanwhile it would
        # hold the connections it has opened, idle, where requests need them.
        waits = _waits_for_slots.set(False)
        try:
            while pool.checkedin() + pool.checkedout() < count:  # the connections it holds
                opened.append(self.autocommit_engine.raw_connection())
        # The driver's errors too: the pool hands them over unwrapped when it
        # fails to open a connection (no free slots, the server is down).
        except (SQLAlchemyError, psycopg2.Error, SchemaNotMigrated) as exc:
            log.warning("could not open the pool's first connections: %s", driver_message(exc))
        finally:
            _waits_for_slots.reset(waits)
            for connection in opened:
                connection.close()

    def unready_reason(self) -> str | None:
        """Why requests cannot be served now, or None: the database must answer, migrated to this code's head.

        A revision this code does not know is taken for a newer one (a newer
        release migrated the database during a rolling deploy): ready.
        """
        usable = True
        try:
            with self.autocommit_engine.connect() as conn:
                if not inspect(conn).has_table("alembic_version"):
                    return NOT_MIGRATED
                revisions = set(conn.scalars(text("SELECT version_num FROM alembic_version")))
        except SchemaNotMigrated:
            # A pooled connection cannot be set up on this schema; ask on one that is not.
            usable = False
            revisions = self._revisions_without_set_up()
        except SQLAlchemyError:
            return "the database does not answer"
        if not revisions:
            return NOT_MIGRATED
        at = ", ".join(sorted(revisions))
        if self.schema_head and self.schema_head not in revisions and revisions <= self._known_revisions:
            return f"the database schema is at revision {at}, this code needs {self.schema_head} (alembic upgrade head)"
        if not usable:
            return f"the database schema (revision {at}) lacks tables or columns this code needs"
        return None

    def _revisions_without_set_up(self) -> set[str]:
        """PostgreSQL: alembic_version's rows, on a bare connection (no pool, no prepared statements)."""
        dialect = self.autocommit_engine.dialect
        cargs, cparams = dialect.create_connect_args(self.autocommit_engine.url)
        try:
            connection = dialect.connect(*cargs, **cparams)
        except psycopg2.Error:
            return set()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT version_num FROM alembic_version")
                return {row[0] for row in cursor.fetchall()}
        except psycopg2.Error:
            return set()
        finally:
            connection.close()

    def dispose(self) -> None:
        for engine in self.engines:
            engine.dispose()


def _make_postgresql_engine(settings: Settings, *, pool_size: int, max_overflow: int, **options: Any) -> Engine:
    engine = create_engine(
        settings.database_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=POOL_TIMEOUT_SECS,
        # The connection returned last is taken first: under light load the
        # work stays on the few connections whose plans and caches are hot,
        # and the rest (the warm-up's, or a past burst's) wait idle until
        # concurrency needs them. Taken in turn (FIFO), every connection made
        # its plans again on first use, and the short `wake` workload cost
        # PostgreSQL 0.44-0.49 s of CPU instead of 0.32-0.34 (docs/performance.md, change 31).
        pool_use_lifo=True,
        connect_args={"connect_timeout": 5},
        **options,
    )
    _ping_idle_connections(engine)
    _wait_for_slots(engine)
    return engine


def _make_sqlite_engine(settings: Settings) -> Engine:
    engine = create_engine(settings.database_url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before we acknowledge it, even in WAL mode.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    return engine


def _wait_for_slots(engine: Engine) -> None:
    """Retry a new connection the server refused for want of a free slot, for up to the pool's timeout.

    During a reload (or a binary upgrade) a host's new workers run beside its
    old ones, which hold their connections until they exit: with a budget
    sized for one set of workers (the defaults, 2 x 47 connections, on
    max_connections=100) the new ones found no slot for a moment, and the
    requests they took answered 503. Now such a request waits, as it waits
    for a busy pool, until the old workers hand their slots back, and fails
    (503) only after POOL_TIMEOUT_SECS. Any other failure (a wrong password, a
    server that is down or starting) is raised at once, as before. The pause
    is time.sleep, which gevent patches in the workers: other greenlets run.
    """

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: tuple, cparams: dict) -> Any:
        deadline = time.monotonic() + POOL_TIMEOUT_SECS
        pause = SLOT_RETRY_FIRST_SECS
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except psycopg2.OperationalError as exc:
                if not (_waits_for_slots.get() and out_of_connection_slots(exc)) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, SLOT_RETRY_MAX_SECS)


def _ping_idle_connections(engine: Engine) -> None:
    """Ping a pooled connection at checkout only if it sat idle for `PING_IF_IDLE_SECS`.

    A failed ping raises DisconnectionError, on which the pool discards the
    connection and checks out (or opens) another one, as pool_pre_ping does.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_IF_IDLE_SECS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"pooled connection is dead: {exc}") from exc
