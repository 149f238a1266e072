"""Settings, read once from environment variables by the app factory.

The app's variables are read here with their defaults; the HTTP server's
(CHATAPI_BIND, CHATAPI_WORKERS, ...) in gunicorn.conf.py. The README's
Configuration table lists both, and tests/test_readme.py checks that it
misses none.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from limits import parse_many

DEFAULT_DATABASE_URL = "sqlite:///chatapi.sqlite3"
# The databases chatapi runs on: SQLite, and PostgreSQL through psycopg2.
DATABASE_URL_SCHEMES = ("sqlite", "sqlite+pysqlite", "postgresql", "postgres", "postgresql+psycopg2")

# What a variable reads as when unset: its default, or None where Settings works it out.
Default = TypeVar("Default")

# A long-poll answers with an empty page after this long; 25 s stays under the
# 30-60 s idle limits that common proxies and NAT boxes apply.
LONG_POLL_DEFAULT_SECS = 25.0
# Clients may ask for longer waits, but never longer than this: it bounds how
# long a request can pin a worker connection slot.
LONG_POLL_MAX_SECS = 60.0


RATE_LIMIT_SETTINGS = (
    "rate_limit_signin_per_username",
    "rate_limit_signin_per_address",
    "rate_limit_registration_per_address",
    "rate_limit_send_per_user",
)


class ConfigError(ValueError):
    """A setting has a value chatapi cannot use."""


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    registration_open: bool = True
    # Unset (None), LONG_POLL_DEFAULT_SECS, or the maximum if that is lower.
    long_poll_default_secs: float | None = None
    long_poll_max_secs: float = LONG_POLL_MAX_SECS
    # Waiting requests one user may hold at once; a new one beyond this
    # answers the oldest, so a runaway client cannot exhaust a worker.
    max_waiters_per_user: int = 32
    rate_limits_enabled: bool = True
    rate_limit_storage_uri: str = "memory://"
    rate_limit_signin_per_username: str = "20/minute"
    rate_limit_signin_per_address: str = "100/minute"
    rate_limit_registration_per_address: str = "200/hour"
    rate_limit_send_per_user: str = "100/second"
    trust_proxy_headers: int = 0
    # Autocommit connections per worker: reads, and the hot paths (a send,
    # an event poll), which are one function call each. No overflow by
    # default: an overflow connection is closed when it comes back, and
    # re-opening it per burst (a new PostgreSQL backend, its functions and
    # prepared statements) cost more than the queries it served: with
    # 25 + 10, `throughput` opened about 6 backends a second and PostgreSQL
    # spent 1.9-2.2 ms of CPU per message, with 35 + 0 1.6-1.7 ms
    # (docs/performance.md, "Pool churn"). A request that finds the pool
    # busy waits for a connection in the worker, which costs nothing.
    # 35 autocommit and 10 writes, plus 2 for wake-ups, keep two workers
    # within PostgreSQL's default max_connections of 100.
    db_pool_size: int = 35
    db_max_overflow: int = 0
    # Multi-statement write transactions (sign-up, tokens, conversations,
    # read marks) are short (about a millisecond) and take row locks:
    # a bounded pool without overflow queues a burst of them in the worker
    # instead of opening connections that would only wait on each other.
    db_write_pool_size: int = 10
    # Autocommit connections each worker opens as it starts, in the
    # background: by default the whole pool (unset, None, it follows
    # CHATAPI_DB_POOL_SIZE, but not its overflow: overflow connections are
    # closed on return, not worth opening). A pool otherwise grows on
    # demand, and a new connection (a PostgreSQL backend, then its
    # functions and prepared statements) took 10-50 ms: the first requests
    # after a start waited for them, and under load they came all at once,
    # on a machine busy with the load itself. In `bin/bench latency`
    # R=1000, warming 4 left the first 3 s at delivery p99 0.26-1.9 s; the
    # whole pool, 0.27-0.39 s
    # (docs/performance.md, changes 31 and 34). The connections are the
    # ones the pool would hold under load anyway: the connection budget
    # (docs/deploy.md) is the same, and is met from the start.
    db_pool_warm: int | None = None

    def __post_init__(self) -> None:
        # Unset (from the environment too), these follow the settings they
        # depend on: create_app(Settings(db_pool_size=10)) must not be refused
        # for a warm-up of the default 35 that nobody asked for. Set, a
        # default wait above the maximum or a warm-up above the pool plus its
        # overflow is refused below.
        if self.long_poll_default_secs is None:
            object.__setattr__(self, "long_poll_default_secs", min(LONG_POLL_DEFAULT_SECS, self.long_poll_max_secs))
        if self.db_pool_warm is None:
            object.__setattr__(self, "db_pool_warm", self.db_pool_size)
        if self.long_poll_default_secs > self.long_poll_max_secs:
            raise ConfigError(
                "CHATAPI_LONG_POLL_DEFAULT_SECS must not exceed CHATAPI_LONG_POLL_MAX_SECS"
                f" ({self.long_poll_max_secs:g}), not {self.long_poll_default_secs:g}"
            )
        if self.db_pool_warm > self.db_pool_size + self.db_max_overflow:
            raise ConfigError("CHATAPI_DB_POOL_WARM must not exceed CHATAPI_DB_POOL_SIZE + CHATAPI_DB_MAX_OVERFLOW")
        # Flask-Limiter reads a limit only when a request needs it, and
        # (swallow_errors, limits.py) would then skip a misspelt one for
        # ever: a limit the operator set would silently be off. And a limit
        # of 0 would refuse every request it covers, for ever.
        for name in RATE_LIMIT_SETTINGS:
            try:
                usable = all(item.amount >= 1 for item in parse_many(getattr(self, name)))
            except ValueError:
                usable = False
            if not usable:
                raise ConfigError(
                    f"CHATAPI_{name.upper()} must be a rate limit of 1 or more (like 20/minute),"
                    f" not {getattr(self, name)!r}"
                )

    @property
    def is_postgresql(self) -> bool:
        return self.database_url.startswith(("postgresql", "postgres"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        get = env.get
        default = cls()

        def limit(name: str) -> str:
            """CHATAPI_RATE_LIMIT_<name>; unset or empty, the default."""
            return get(f"CHATAPI_RATE_LIMIT_{name}") or getattr(default, f"rate_limit_{name.lower()}")

        return cls(
            database_url=_database_url(env),
            registration_open=_flag(env, "CHATAPI_REGISTRATION"),
            long_poll_default_secs=_number(env, "CHATAPI_LONG_POLL_DEFAULT_SECS", None),  # None: __post_init__
            long_poll_max_secs=_number(env, "CHATAPI_LONG_POLL_MAX_SECS", LONG_POLL_MAX_SECS),
            max_waiters_per_user=_count(env, "CHATAPI_MAX_WAITERS_PER_USER", default.max_waiters_per_user, low=1),
            rate_limits_enabled=_flag(env, "CHATAPI_RATE_LIMITS"),
            rate_limit_storage_uri=get("CHATAPI_RATE_LIMIT_STORAGE_URI") or default.rate_limit_storage_uri,
            rate_limit_signin_per_username=limit("SIGNIN_PER_USERNAME"),
            rate_limit_signin_per_address=limit("SIGNIN_PER_ADDRESS"),
            rate_limit_registration_per_address=limit("REGISTRATION_PER_ADDRESS"),
            rate_limit_send_per_user=limit("SEND_PER_USER"),
            trust_proxy_headers=_count(env, "CHATAPI_TRUSTED_PROXIES", default.trust_proxy_headers),
            # A SQLAlchemy pool of size 0 has no limit at all: never what was meant.
            db_pool_size=_count(env, "CHATAPI_DB_POOL_SIZE", default.db_pool_size, low=1),
            db_max_overflow=_count(env, "CHATAPI_DB_MAX_OVERFLOW", default.db_max_overflow),
            db_write_pool_size=_count(env, "CHATAPI_DB_WRITE_POOL_SIZE", default.db_write_pool_size, low=1),
            db_pool_warm=_count(env, "CHATAPI_DB_POOL_WARM", None),  # None: __post_init__
        )


def _database_url(env: Mapping[str, str]) -> str:
    """CHATAPI_DATABASE_URL, else DATABASE_URL, else the default; a database chatapi runs on."""
    name = next((name for name in ("CHATAPI_DATABASE_URL", "DATABASE_URL") if env.get(name)), None)
    if name is None:
        return DEFAULT_DATABASE_URL
    url = env[name]
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in DATABASE_URL_SCHEMES:
        # The scheme only: the rest of a URL may hold a password.
        given = f"a URL of scheme {scheme!r}" if separator else "a value without a scheme://"
        raise ConfigError(f"{name} must be sqlite:///FILE or postgresql://USER:PASSWORD@HOST/DATABASE, not {given}")
    if scheme.startswith("sqlite") and rest in ("", "/", "/:memory:"):
        # Each process would have a database of its own, and the one migrated (by the master's child) is gone.
        raise ConfigError(f"{name} must be sqlite:///FILE: a SQLite database in memory is empty in every process")
    return _with_driver(url)


def _with_driver(url: str) -> str:
    """Pin PostgreSQL URLs to psycopg2 (SQLAlchemy 2.1 would pick psycopg 3)."""
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg2://" + url[len(scheme) :]
    return url


def _flag(env: Mapping[str, str], name: str) -> bool:
    """An on/off switch, default on; unset or empty, on."""
    value = env.get(name) or "on"
    lowered = value.strip().lower()
    if lowered in ("1", "on", "true", "yes"):
        return True
    if lowered in ("0", "off", "false", "no"):
        return False
    raise ConfigError(f"{name} must be on or off, not {value!r}")


def _number(env: Mapping[str, str], name: str, default: Default) -> float | Default:
    """A finite number, 0 or more; unset or empty, the default."""
    value, number = _read_number(env, name)
    if number is None:
        return default
    if not 0 <= number < math.inf:
        raise ConfigError(f"{name} must be a number, 0 or more, not {value!r}")
    return number


def _count(env: Mapping[str, str], name: str, default: Default, low: int = 0) -> int | Default:
    """A whole number, `low` or more; unset or empty, the default."""
    value, number = _read_number(env, name)
    if number is None:
        return default
    if not (number >= low and number.is_integer()):  # 20.0 is 20
        raise ConfigError(f"{name} must be a whole number, {low} or more, not {value!r}")
    return int(number)


def _read_number(env: Mapping[str, str], name: str) -> tuple[str, float | None]:
    """The variable's text, and its value: None when unset or empty, NaN when not a number."""
    value = env.get(name, "").strip()
    if not value:
        return value, None
    try:
        return value, float(value)
    except ValueError:
        return value, math.nan
