"""Hot-path statements, planned once per PostgreSQL connection.

Building and running an ORM statement per call cost several times the
database's own time, and planning these statements cost PostgreSQL about
as much as running them, while psycopg2 never prepares on its own
(docs/performance.md). So each is built once as a Core statement, every
pooled PostgreSQL connection PREPAREs it when it opens (`set_up_connection`,
which also installs pg_functions.py's functions), and calls run
`EXECUTE name (...)`. SQLite runs the Core statement.
"""

from __future__ import annotations

from typing import Any

from psycopg2 import errors
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from chatapi import pg_functions
from chatapi.db import SchemaNotMigrated

_PG_NUMBERED = postgresql.psycopg2.dialect(paramstyle="numeric_dollar")
# Every statement made, for each new connection to prepare. They are
# constants built at import, like the statements themselves.
_ALL: list[PreparedStatement] = []


class PreparedStatement:
    """A Core statement, and the PREPARE and EXECUTE that run it on PostgreSQL."""

    def __init__(self, name: str, statement: Any) -> None:
        self.statement = statement
        compiled = statement.compile(dialect=_PG_NUMBERED)
        self.prepare = f"PREPARE {name} AS {compiled.string}"
        # Literal values in the statement (e.g. a kind) became parameters too.
        self.defaults = {key: value for key, value in compiled.params.items() if value is not None}
        self.execute = text(f"EXECUTE {name} (" + ", ".join(f":{key}" for key in compiled.positiontup) + ")")
        # The same for `Database.fetch_all` (psycopg2's parameter style).
        self.call = f"EXECUTE {name} (" + ", ".join(f"%({key})s" for key in compiled.positiontup) + ")"
        _ALL.append(self)


def run_prepared(connection: Connection, prepared: PreparedStatement, **params: Any) -> Any:
    """Run a hot-path statement: its prepared plan on PostgreSQL, the Core statement on SQLite."""
    if connection.dialect.name == "postgresql":
        return connection.execute(prepared.execute, {**prepared.defaults, **params})
    return connection.execute(prepared.statement, params)


def set_up_connection(dbapi_connection: Any, _record: Any) -> None:
    """On each new PostgreSQL connection (an engine's "connect" event): create
    the functions and prepare the statements; both live as long as it does.

    Before the schema is migrated there is nothing to prepare on: the
    connection fails with SchemaNotMigrated (and SQLAlchemy closes it).
    """
    try:
        with dbapi_connection.cursor() as cursor:
            pg_functions.install(cursor)
            for prepared in _ALL:
                cursor.execute(prepared.prepare)
    except (errors.UndefinedTable, errors.UndefinedColumn) as exc:
        raise SchemaNotMigrated() from exc
    # psycopg2 opened a transaction for these on a non-autocommit connection; end it.
    dbapi_connection.commit()
