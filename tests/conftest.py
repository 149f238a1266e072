"""Fixtures: an app for unit tests, and real servers (gunicorn + gevent) on
SQLite and on a throwaway PostgreSQL cluster for integration tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from flask import Flask

from chatapi import Settings, create_app
from tests.support.api import Api
from tests.support.postgres import PostgresCluster
from tests.support.server import REPO, ServerProcess

_LEFT_OUT = pytest.StashKey[str]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With CHATAPI_TESTS_ALL=1 (.ci/run), a run that skipped or left out a test is no pass:
    a stray PYTEST_ADDOPTS or a missing tool must not turn a smaller suite green."""
    if os.environ.get("CHATAPI_TESTS_ALL") != "1" or exitstatus != pytest.ExitCode.OK:
        return
    stats = session.config.pluginmanager.get_plugin("terminalreporter").stats
    left_out = {kind: len(stats.get(kind, [])) for kind in ("skipped", "deselected", "xfailed", "xpassed")}
    # A file never collected (--ignore, a path argument, --collect-only) counts in none of those.
    passed_in = {report.nodeid.split("::", 1)[0] for report in stats.get("passed", [])}
    not_run = sorted(
        name for path in Path(__file__).parent.glob("test_*.py") if (name := f"tests/{path.name}") not in passed_in
    )
    if any(left_out.values()) or not_run:
        session.config.stash[_LEFT_OUT] = (
            f"CHATAPI_TESTS_ALL=1: not every test ran and passed: {left_out}, files with no test passed: {not_run}"
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if _LEFT_OUT in config.stash:
        terminalreporter.write_sep("=", config.stash[_LEFT_OUT], red=True)


def alembic_config(database_url: str) -> Config:
    """alembic.ini's configuration on `database_url`, leaving the test run's logging as it is."""
    config = Config(str(REPO / "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'chat.sqlite3'}"


def make_app(database_url: str) -> Iterator[Flask]:
    """The Flask app on a fresh, migrated database, rate limits off (for unit tests)."""
    migrate(database_url)
    app = create_app(Settings.from_env({"CHATAPI_DATABASE_URL": database_url, "CHATAPI_RATE_LIMITS": "off"}))
    app.config["TESTING"] = True
    yield app
    app.extensions["chatapi"].notifier.stop()
    app.extensions["chatapi"].db.dispose()


@pytest.fixture
def app(sqlite_url: str) -> Iterator[Flask]:
    """The app on a fresh SQLite file."""
    yield from make_app(sqlite_url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def app_on_each_database(request) -> Iterator[Flask]:
    """The app once on SQLite and once on PostgreSQL, for modules whose
    `app` fixture returns it: on PostgreSQL the hot paths run as server-side
    functions (chat.py), on SQLite as Python steps, and both must behave the same."""
    yield from make_app(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url"))


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One throwaway cluster per test session; each test takes a fresh database."""
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> str:
    return postgres.new_database()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real servers; all are stopped at the end of the test."""
    servers: list[ServerProcess] = []

    def start(
        database_url: str | None,
        workers: int | None = 1,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        cwd: Path = REPO,
        ready_path: str = "/readyz",
    ) -> ServerProcess:
        log = tmp_path / f"server-{len(servers)}.log"
        server = ServerProcess(database_url, workers=workers, env=env, log_path=log, args=args, cwd=cwd)
        servers.append(server)
        return server.start(ready_path=ready_path)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def live_server(request, start_server, tmp_path: Path) -> ServerProcess:
    """A running server, once on SQLite (1 worker) and once on PostgreSQL (2 workers)."""
    if request.param == "sqlite":
        return start_server(f"sqlite:///{tmp_path / 'live.sqlite3'}", workers=1)
    url = request.getfixturevalue("postgres_url")
    return start_server(url, workers=2)


@pytest.fixture
def api(live_server: ServerProcess) -> Api:
    """An anonymous client of the live server."""
    return Api(live_server.base_url)


class Accounts:
    """Signs users up through the test client (flaskr's AuthActions)."""

    def __init__(self, client) -> None:
        self._client = client

    def sign_up(self, username: str, password: str = "password123") -> dict[str, str]:
        """Create `username`, sign in, and return its Authorization header."""
        response = self._client.post("/api/v1/users", json={"username": username, "password": password})
        assert response.status_code == 201, response.json
        response = self._client.post("/api/v1/tokens", json={"username": username, "password": password})
        assert response.status_code == 201, response.json
        return {"Authorization": f"Bearer {response.json['token']}"}


@pytest.fixture
def accounts(client) -> Accounts:
    return Accounts(client)
