"""Alembic environment: the same database URL as the app, and on PostgreSQL an
advisory lock so that several hosts starting at once migrate one at a time."""

from logging.config import fileConfig

from alembic import context
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
                context.run_migrations()
        finally:
            if is_postgresql:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
                connection.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run against a database")
run_migrations_online()
