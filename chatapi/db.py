"""The database engine and units of work.

SQLite (the zero-setup default) runs in one process; its writes are
serialised by one gevent lock per process, so a greenlet never sits in
SQLite's busy handler (which would block the whole gevent hub) while another
greenlet holds the write lock. PostgreSQL needs no such lock: the chat rules
take row locks inside each transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import gevent.lock
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from chatapi.config import Settings

# How long a SQLite connection waits for a lock held by another process
# (a migration, a backup) before giving up.
SQLITE_BUSY_TIMEOUT_MS = 10_000


class Database:
    def __init__(self, settings: Settings) -> None:
        self.is_postgresql = settings.is_postgresql
        self.engine = _make_engine(settings)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Reads run in autocommit on PostgreSQL: under READ COMMITTED every
        # statement takes its own snapshot anyway, so a transaction around
        # them only adds a BEGIN and a ROLLBACK round trip per unit of work.
        reads_engine = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT") if self.is_postgresql else self.engine
        )
        self._read_sessions = sessionmaker(reads_engine, expire_on_commit=False)
        self._write_lock = None if self.is_postgresql else gevent.lock.BoundedSemaphore(1)

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads; its connection goes back to the pool at the end."""
        with self._read_sessions() as session:
            yield session

    @contextlib.contextmanager
    def writing(self) -> Iterator[Session]:
        """One unit of work: commits at the end of the block, rolls back on error."""
        lock = self._write_lock or contextlib.nullcontext()
        with lock, self._sessions() as session, session.begin():
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def _make_engine(settings: Settings) -> Engine:
    if settings.is_postgresql:
        return create_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_pre_ping=True,
            pool_timeout=10,
            connect_args={"connect_timeout": 5},
        )
    engine = create_engine(settings.database_url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection, _record) -> None:
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
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN")

    return engine
