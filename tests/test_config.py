"""Settings come from the environment, with the documented defaults."""

from __future__ import annotations

import pytest

from chatapi.config import ConfigError, Settings


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


def test_switches_and_limits() -> None:
    settings = Settings.from_env(
        {"CHATAPI_RATE_LIMITS": "off", "CHATAPI_REGISTRATION": "OFF", "CHATAPI_RATE_LIMIT_SEND_PER_USER": "5/second"}
    )
    assert not settings.rate_limits_enabled and not settings.registration_open
    assert settings.rate_limit_send_per_user == "5/second"


@pytest.mark.parametrize(
    "env",
    [
        {"CHATAPI_RATE_LIMITS": "maybe"},
        {"CHATAPI_LONG_POLL_MAX_SECS": "soon"},
        {"CHATAPI_DB_POOL_SIZE": "-1"},
        {"CHATAPI_DB_WRITE_POOL_SIZE": "0"},
        {"CHATAPI_DB_POOL_SIZE": "3", "CHATAPI_DB_POOL_WARM": "4"},
        # A misspelt limit would otherwise be skipped on every request: off.
        {"CHATAPI_RATE_LIMIT_SIGNIN_PER_USERNAME": "2 per minuet"},
        {"CHATAPI_RATE_LIMIT_SEND_PER_USER": "5/fortnight"},
    ],
)
def test_bad_values_are_refused_at_start(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)
