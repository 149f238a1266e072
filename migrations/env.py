"""Alembic environment: the same database URL as the app, and on PostgreSQL an
advisory lock so that several hosts starting at once migrate one at a time.

`-x newer_database=keep` (gunicorn.conf.py passes it at a start and a reload):
a database at a revision these migrations do not know was migrated by a
newer release (a rolling deploy, or the code rolled back). It is left as it
is, with a warning, rather than failing the start: the code serves it as
long as the schema still has what it uses (on PostgreSQL, /readyz tells
when it has not). Run by hand, without it, alembic refuses such a database.
"""

import logging
from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from chatapi.config import ConfigError, Settings
from chatapi.db import driver_message
from chatapi.models import Base

# Any constant works; it only has to be the same for every chatapi process.
MIGRATION_LOCK_ID = 7_302_615_001

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)
log = logging.getLogger("alembic.env")

target_metadata = Base.metadata


def run_migrations_online() -> None:
    given = config.attributes.get("database_url")
    try:
        # Every setting is read, not only the URL: a start (gunicorn.conf.py
        # migrates first) refuses a bad one before any worker is started.
        url = Settings.from_env({"CHATAPI_DATABASE_URL": given} if given else None).database_url
    except ConfigError as refused:
        # One line that names the variable, not a traceback around it.
        raise SystemExit(str(refused)) from None
    engine = create_engine(url)
    try:
        connection = engine.connect()
    except OperationalError as exc:
        # Why a start fails most (a wrong host or password, a database not
        # up yet): the driver's own line, without the URL's password.
        raise SystemExit(f"alembic upgrade head could not connect to the database: {driver_message(exc)}") from None
    with connection:
        is_postgresql = connection.dialect.name == "postgresql"
        if is_postgresql:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            connection.commit()
        try:
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                if not _kept_as_newer():
                    _run_migrations()
        finally:
            if is_postgresql:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
                connection.commit()
    engine.dispose()


def _run_migrations() -> None:
    """Run them; a failure is logged with its traceback, then raised again as one line: the
    driver's own, as the app logs database errors (never the statement, which may hold users' text).

    gunicorn.conf.py's master takes the last line alembic writes for the
    reason a reload stopped (its own log may be a file, not stderr); a
    traceback would end with the driver's "Background on this error" link.
    """
    try:
        context.run_migrations()
    except CommandError:
        raise  # alembic says it in one line ("FAILED: ...")
    except Exception as exc:
        log.exception("the migration failed")
        raise SystemExit(f"alembic upgrade head failed: {driver_message(exc)}") from None


def _kept_as_newer() -> bool:
    """With `-x newer_database=keep`: whether the database is at a revision these migrations do not know (warned)."""
    if context.get_x_argument(as_dictionary=True).get("newer_database") != "keep":
        return False
    known = {script.revision for script in context.script.walk_revisions()}
    newer = sorted(set(context.get_context().get_current_heads()) - known)
    if not newer:
        return False
    log.warning(
        "the database is at revision %(newer)s, which this code's migrations (head %(head)s) do not know: a newer "
        "release migrated it. Left as it is: this code serves it as long as the schema still has what the code "
        "uses. To go back to %(head)s, run `alembic downgrade %(head)s` with that newer release's code "
        '(docs/deploy.md, "Upgrades and rollbacks").',
        {"newer": ", ".join(newer), "head": context.script.get_current_head()},
    )
    return True


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run against a database")
run_migrations_online()
