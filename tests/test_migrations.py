"""The Alembic migrations build exactly the schema the models describe, on
SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from chatapi.config import Settings
from chatapi.models import Base
from tests.conftest import migrate


def assert_schema_matches_models(url: str) -> None:
    migrate(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []


def test_migrations_match_models_on_sqlite(sqlite_url: str) -> None:
    assert_schema_matches_models(sqlite_url)


@pytest.mark.postgres
def test_migrations_match_models_on_postgresql(postgres_url: str) -> None:
    assert_schema_matches_models(Settings.from_env({"CHATAPI_DATABASE_URL": postgres_url}).database_url)


def test_migrating_twice_is_harmless(sqlite_url: str) -> None:
    migrate(sqlite_url)
    migrate(sqlite_url)
