"""The Alembic migrations build exactly the schema the models describe, on
SQLite and on PostgreSQL."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, insert, select

from chatapi.config import Settings
from chatapi.db import MIGRATIONS_DIR, code_revisions
from chatapi.models import Base, User
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


def test_migrating_again_keeps_the_data(sqlite_url: str) -> None:
    """Every start migrates (CHATAPI_MIGRATE): a second run must leave schema and rows as they were."""
    migrate(sqlite_url)
    engine = create_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(insert(User).values(username="alice", password_hash="x", created_at=datetime(2026, 1, 1)))
    migrate(sqlite_url)
    with engine.connect() as connection:
        assert connection.scalars(select(User.username)).all() == ["alice"]
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


def test_the_app_reads_the_same_head_and_revisions_as_alembic() -> None:
    """/readyz compares the database's revision with these (read without alembic, see chatapi.db)."""
    scripts = ScriptDirectory(str(MIGRATIONS_DIR))
    assert code_revisions() == (scripts.get_current_head(), {script.revision for script in scripts.walk_revisions()})


def test_the_app_reads_revisions_written_as_alembics_own_template_writes_them(tmp_path: Path) -> None:
    (tmp_path / "versions").mkdir()
    (tmp_path / "versions" / "a1_first.py").write_text('revision: str = "a1"\ndown_revision: str | None = None\n')
    second = "revision: str = 'b2'\ndown_revision: Union[str, None] = 'a1'\n"
    (tmp_path / "versions" / "b2_second.py").write_text(second)
    (tmp_path / "versions" / "__init__.py").write_text("")  # not a migration; alembic skips it too
    assert code_revisions(tmp_path) == ("b2", {"a1", "b2"})
    # A merge names its parents in a list or a tuple.
    (tmp_path / "versions" / "c3_branch.py").write_text("revision = 'c3'\ndown_revision = 'a1'\n")
    (tmp_path / "versions" / "d4_merge.py").write_text("revision = 'd4'\ndown_revision = ['b2', 'c3']\n")
    assert code_revisions(tmp_path) == ("d4", {"a1", "b2", "c3", "d4"})
