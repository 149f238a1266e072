"""Settings come from the environment, with the documented defaults."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import gunicorn
import pytest

from chatapi.config import DEFAULT_DATABASE_URL, ConfigError, Settings
from tests.support.server import REPO


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.database_url == "sqlite:///chatapi.sqlite3"
    assert not settings.is_postgresql
    assert (settings.long_poll_default_secs, settings.long_poll_max_secs) == (25, 60)
    assert settings.rate_limits_enabled and settings.registration_open


@pytest.mark.parametrize("url", ["postgresql://u@h/db", "postgres://u@h/db", "postgresql+psycopg2://u@h/db"])
def test_postgresql_urls_use_psycopg2(url: str) -> None:
    settings = Settings.from_env({"CHATAPI_DATABASE_URL": url})
    assert settings.database_url == "postgresql+psycopg2://u@h/db" and settings.is_postgresql


def test_database_url_falls_back_to_database_url() -> None:
    assert Settings.from_env({"DATABASE_URL": "sqlite:///x.db"}).database_url == "sqlite:///x.db"
    both = {"DATABASE_URL": "sqlite:///x.db", "CHATAPI_DATABASE_URL": "sqlite:///y.db"}
    assert Settings.from_env(both).database_url == "sqlite:///y.db"


def test_each_worker_opens_its_whole_pool_at_start_unless_set() -> None:
    assert Settings.from_env({}).db_pool_warm == Settings().db_pool_size == 35
    assert Settings.from_env({"CHATAPI_DB_POOL_SIZE": "2"}).db_pool_warm == 2
    assert Settings.from_env({"CHATAPI_DB_POOL_SIZE": "50", "CHATAPI_DB_MAX_OVERFLOW": "5"}).db_pool_warm == 50
    assert Settings.from_env({"CHATAPI_DB_POOL_WARM": "0"}).db_pool_warm == 0


def test_settings_built_in_code_follow_the_pool_size_and_the_longest_wait_as_from_the_environment() -> None:
    """create_app(Settings(...)): an unset warm-up is the whole pool, an unset default wait at most the maximum."""
    settings = Settings(db_pool_size=10, long_poll_max_secs=5)
    assert (settings.db_pool_warm, settings.long_poll_default_secs) == (10, 5)
    assert Settings(long_poll_max_secs=90).long_poll_default_secs == 25
    assert Settings(db_pool_size=10, db_pool_warm=4).db_pool_warm == 4
    with pytest.raises(ConfigError, match="CHATAPI_DB_POOL_WARM"):
        Settings(db_pool_size=10, db_pool_warm=11)
    with pytest.raises(ConfigError, match="CHATAPI_LONG_POLL_DEFAULT_SECS"):
        Settings(long_poll_max_secs=5, long_poll_default_secs=6)


def test_switches_and_limits() -> None:
    settings = Settings.from_env(
        {"CHATAPI_RATE_LIMITS": "off", "CHATAPI_REGISTRATION": "OFF", "CHATAPI_RATE_LIMIT_SEND_PER_USER": "5/second"}
    )
    assert not settings.rate_limits_enabled and not settings.registration_open
    assert settings.rate_limit_send_per_user == "5/second"


@pytest.mark.parametrize(
    "env",
    [
        # Another database (which create_app would have failed on with a traceback), or no URL at all.
        {"CHATAPI_DATABASE_URL": "mysql://chatapi:secret@db/chatapi"},
        {"CHATAPI_DATABASE_URL": "postgresql+asyncpg://chatapi:secret@db/chatapi"},
        {"CHATAPI_DATABASE_URL": "chatapi.sqlite3"},
        # Served, every request answered 503: the migrated database was the master's child's.
        {"CHATAPI_DATABASE_URL": "sqlite://"},
        {"CHATAPI_DATABASE_URL": "sqlite:///:memory:"},
        {"DATABASE_URL": "mysql://chatapi:secret@db/chatapi"},
        {"CHATAPI_RATE_LIMITS": "maybe"},
        {"CHATAPI_REGISTRATION": "closed"},
        {"CHATAPI_LONG_POLL_MAX_SECS": "soon"},
        {"CHATAPI_DB_POOL_SIZE": "-1"},
        {"CHATAPI_DB_POOL_SIZE": "0"},
        {"CHATAPI_DB_POOL_SIZE": "2.5"},
        {"CHATAPI_DB_WRITE_POOL_SIZE": "0"},
        {"CHATAPI_DB_MAX_OVERFLOW": "-1"},
        {"CHATAPI_DB_POOL_WARM": "1.5"},
        {"CHATAPI_DB_POOL_SIZE": "3", "CHATAPI_DB_POOL_WARM": "4"},
        # A misspelt limit would otherwise be skipped on every request: off.
        {"CHATAPI_RATE_LIMIT_SIGNIN_PER_USERNAME": "2 per minuet"},
        {"CHATAPI_RATE_LIMIT_SEND_PER_USER": "5/fortnight"},
        # A limit of 0 refuses every request it covers, for ever.
        {"CHATAPI_RATE_LIMIT_SEND_PER_USER": "0/second"},
        {"CHATAPI_RATE_LIMIT_SIGNIN_PER_ADDRESS": "10/second;0/hour"},
        # A poll without `timeout` waited min(nan, 60) = nan: until gunicorn killed the worker.
        {"CHATAPI_LONG_POLL_DEFAULT_SECS": "nan"},
        {"CHATAPI_LONG_POLL_DEFAULT_SECS": "inf"},
        {"CHATAPI_LONG_POLL_MAX_SECS": "nan"},
        {"CHATAPI_LONG_POLL_MAX_SECS": "inf"},
        {"CHATAPI_LONG_POLL_DEFAULT_SECS": "-1"},
        # Was silently capped at the maximum.
        {"CHATAPI_LONG_POLL_DEFAULT_SECS": "120"},
        {"CHATAPI_LONG_POLL_DEFAULT_SECS": "20", "CHATAPI_LONG_POLL_MAX_SECS": "10"},
        # Were truncated to 2 and 1.
        {"CHATAPI_MAX_WAITERS_PER_USER": "2.7"},
        {"CHATAPI_TRUSTED_PROXIES": "1.5"},
        {"CHATAPI_MAX_WAITERS_PER_USER": "0"},
        {"CHATAPI_MAX_WAITERS_PER_USER": "many"},
        {"CHATAPI_TRUSTED_PROXIES": "-1"},
    ],
)
def test_bad_values_are_refused_at_start_naming_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    assert any(name in str(refused.value) for name in env), str(refused.value)
    assert "\n" not in str(refused.value)
    assert "secret" not in str(refused.value)


def test_an_empty_value_is_the_default() -> None:
    names = [
        "CHATAPI_REGISTRATION",
        "CHATAPI_RATE_LIMITS",
        "CHATAPI_RATE_LIMIT_STORAGE_URI",
        "CHATAPI_RATE_LIMIT_SEND_PER_USER",
        "CHATAPI_LONG_POLL_DEFAULT_SECS",
        "CHATAPI_LONG_POLL_MAX_SECS",
        "CHATAPI_MAX_WAITERS_PER_USER",
        "CHATAPI_TRUSTED_PROXIES",
        "CHATAPI_DB_POOL_SIZE",
        "CHATAPI_DB_MAX_OVERFLOW",
        "CHATAPI_DB_WRITE_POOL_SIZE",
        "CHATAPI_DB_POOL_WARM",
    ]
    assert Settings.from_env(dict.fromkeys(names, "")) == Settings.from_env({}) == Settings()


def test_usable_values_are_taken_as_given() -> None:
    settings = Settings.from_env(
        {
            "CHATAPI_LONG_POLL_DEFAULT_SECS": "0",
            "CHATAPI_LONG_POLL_MAX_SECS": "0.5",
            "CHATAPI_MAX_WAITERS_PER_USER": "1",
            "CHATAPI_TRUSTED_PROXIES": " 2 ",
            "CHATAPI_DB_POOL_SIZE": "20.0",  # a whole number, as earlier releases took it
        }
    )
    assert settings.db_pool_size == 20
    assert (settings.long_poll_default_secs, settings.long_poll_max_secs) == (0, 0.5)
    assert (settings.max_waiters_per_user, settings.trust_proxy_headers) == (1, 2)
    assert Settings.from_env({"CHATAPI_LONG_POLL_DEFAULT_SECS": "60"}).long_poll_default_secs == 60


def test_a_lower_maximum_alone_brings_the_default_down_with_it() -> None:
    """Only the maximum set (a proxy with a 20 s limit): the default 25 s follows it, as before."""
    settings = Settings.from_env({"CHATAPI_LONG_POLL_MAX_SECS": "20"})
    assert (settings.long_poll_default_secs, settings.long_poll_max_secs) == (20, 20)
    # 0: polls never wait (the schemathesis suite runs so).
    assert Settings.from_env({"CHATAPI_LONG_POLL_MAX_SECS": "0"}).long_poll_default_secs == 0


def server_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], reread: bool = False) -> dict:
    """gunicorn.conf.py's settings as gunicorn reads them, with `env` as the only CHATAPI_* variables:
    at a start, or (`reread`) again in the same master at a reload."""
    monkeypatch.setattr(gunicorn, "chatapi_conf_read", reread, raising=False)
    for name in os.environ:
        if name.startswith("CHATAPI_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(REPO / "gunicorn.conf.py"))


SERVER_DEFAULTS = {
    "bind": "127.0.0.1:8000",
    "workers": 1,
    "worker_connections": 10000,
    "keepalive": 5,
    "graceful_timeout": 20,
    "loglevel": "info",
    "BODY_TIMEOUT_SECS": 30,
}


def test_the_server_reads_an_empty_value_as_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    names = [
        "CHATAPI_BIND",
        "CHATAPI_WORKERS",
        "CHATAPI_WORKER_CONNECTIONS",
        "CHATAPI_KEEPALIVE_SECS",
        "CHATAPI_GRACEFUL_TIMEOUT_SECS",
        "CHATAPI_LOG_LEVEL",
        "CHATAPI_BODY_TIMEOUT_SECS",
    ]
    for env in [{}, dict.fromkeys(names, "")]:
        settings = server_settings(monkeypatch, env)
        assert {name: settings[name] for name in SERVER_DEFAULTS} == SERVER_DEFAULTS
    settings = server_settings(monkeypatch, {"CHATAPI_WORKERS": "3.0", "CHATAPI_KEEPALIVE_SECS": "0"})
    assert (settings["workers"], settings["keepalive"]) == (3, 0)


def test_the_server_and_the_app_default_to_the_same_sqlite_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The master, which locks that file, must not import the app: it keeps its own copy of the default."""
    assert server_settings(monkeypatch, {})["_database_url"] == DEFAULT_DATABASE_URL


@pytest.mark.parametrize(
    "env",
    [
        # 0 workers or 0 connections: gunicorn listened and never answered.
        {"CHATAPI_WORKERS": "0"},
        {"CHATAPI_WORKERS": "4.5"},
        {"CHATAPI_WORKERS": "two"},
        {"CHATAPI_WORKER_CONNECTIONS": "0"},
        {"CHATAPI_KEEPALIVE_SECS": "-1"},
        {"CHATAPI_KEEPALIVE_SECS": "2.5"},
        {"CHATAPI_GRACEFUL_TIMEOUT_SECS": "soon"},
        {"CHATAPI_BODY_TIMEOUT_SECS": "inf"},
        {"CHATAPI_BODY_TIMEOUT_SECS": "soon"},
        # gunicorn took a misspelt level for info.
        {"CHATAPI_LOG_LEVEL": "verbose"},
    ],
)
def test_the_server_refuses_bad_values_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    [name] = env
    with pytest.raises(SystemExit) as refused:
        server_settings(monkeypatch, env)  # a start, or gunicorn --check-config
    assert str(refused.value.code).startswith(f"{name} must be ")
    assert str(refused.value.code).endswith(f", not {env[name]!r}")  # as given
    # Read again at a reload: collected, for on_reload to stop the master gracefully.
    collected = server_settings(monkeypatch, env, reread=True)["_refused"]
    assert len(collected) == 1 and collected[0].startswith(f"{name} must be ")


@pytest.mark.parametrize(
    "env",
    [
        {"CHATAPI_WORKERS": "0"},
        {"CHATAPI_WORKER_CONNECTIONS": "4.5"},
        {"CHATAPI_LOG_LEVEL": "verbose"},
        # Refused by the migration at start, in the master...
        {"CHATAPI_LONG_POLL_DEFAULT_SECS": "nan"},
        # ...and without it, by each worker as it loads the app.
        {"CHATAPI_LONG_POLL_DEFAULT_SECS": "nan", "CHATAPI_MIGRATE": "off"},
        # The master took any URL but PostgreSQL's for SQLite, and locked a file named after its path.
        {"CHATAPI_DATABASE_URL": "mysql://chatapi:secret@db/chatapi"},
        {"CHATAPI_DATABASE_URL": "mysql://chatapi:secret@db/chatapi", "CHATAPI_MIGRATE": "off"},
        {"DATABASE_URL": "mysql://chatapi:secret@db/chatapi"},
        # A SQLite file where none can be made.
        {"CHATAPI_DATABASE_URL": "sqlite:////proc/chatapi/chatapi.sqlite3"},
        # Each failed as the worker booted, with a traceback (the first one's naming the password).
        {"CHATAPI_RATE_LIMIT_STORAGE_URI": "reddis://:secret@limits.internal:6379/0"},
        {"PROMETHEUS_MULTIPROC_DIR": "/proc/chatapi-metrics"},
    ],
)
def test_a_bad_value_stops_gunicorn_at_once_with_its_name(tmp_path: Path, env: dict[str, str]) -> None:
    output = refused_start(tmp_path, env)
    [name, *_] = env
    # One line that names it, not a traceback around it (the master's, the migration's or a worker's).
    assert output.count(f"{name} must be ") == 1, output


def test_a_database_that_does_not_answer_stops_gunicorn_with_the_drivers_line(tmp_path: Path) -> None:
    output = refused_start(tmp_path, {"CHATAPI_DATABASE_URL": "postgresql://chatapi:secret@127.0.0.1:1/chatapi"})
    assert output.count("alembic upgrade head could not connect to the database: OperationalError: ") == 1, output
    assert "Connection refused" in output


def refused_start(tmp_path: Path, env: dict[str, str]) -> str:
    """gunicorn started with the shipped settings and `env`, expected to stop at once: its output.

    Without a traceback or the password `secret`, and with nothing left in its working directory."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CHATAPI_") and name not in ("DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")
    }
    database = {} if "DATABASE_URL" in env else {"CHATAPI_DATABASE_URL": f"sqlite:///{tmp_path / 'x.sqlite3'}"}
    here = tmp_path / "run"
    here.mkdir()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", str(REPO / "gunicorn.conf.py"), "--pythonpath", str(REPO)]
        + ["--bind", "127.0.0.1:0", "wsgi:app"],
        cwd=here,
        env={**inherited, **database, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 15
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert "secret" not in output, output
    assert list(here.iterdir()) == []
    return output
