"""Rate limits (Flask-Limiter), set by CHATAPI_RATE_LIMIT_* variables.

Counters live in CHATAPI_RATE_LIMIT_STORAGE_URI. The default, memory://,
keeps them per worker process, so with W workers on H hosts a client can
reach at most W x H times each limit; point the URI at a shared store
(redis://, memcached://) to make the limits exact across processes.
"""

from __future__ import annotations

import math
import time
from urllib.parse import urlsplit

import gevent.lock
from flask import Flask, Response, g, request
from flask_limiter import Limiter, RateLimitExceeded
from limits.errors import ConfigurationError

from chatapi import validation
from chatapi.api import current_caller
from chatapi.config import ConfigError, Settings
from chatapi.errors import ApiError, database_unavailable, error_response


def client_address() -> str:
    # ProxyFix (enabled by CHATAPI_TRUSTED_PROXIES) has already put the
    # forwarded address here when the proxy is trusted.
    return request.remote_addr or "unknown"


def _signin_username() -> str:
    # The body as the view will read it (parsed once, validation.json_body).
    try:
        username = validation.json_body(request).get("username")
    except ApiError:
        # Not JSON, not an object, or nested too deep: the view answers it 400 (or 415).
        username = None
    return f"signin:{username.lower()}" if isinstance(username, str) else f"signin-address:{client_address()}"


def _sending_user() -> str:
    return f"user:{current_caller().id}"


def _no_valid_caller() -> bool:
    """Exempts a send without a valid token from the per-user limit: the view answers it 401.

    Checked before `_sending_user`, which would otherwise raise inside
    Flask-Limiter, to be logged as an error and swallowed. With a valid
    token, the lookup is the extra query a limited send costs (the send
    itself checks its token in its own statement); load tests switch the
    limits off. A caller that cannot be looked up because the database is
    down is exempt too: the view then answers 503, logged in one line
    (errors.py), where Flask-Limiter would log a traceback per send.
    """
    try:
        current_caller()
    except ApiError:
        return True
    except Exception as error:
        if database_unavailable(error):
            return True
        raise
    return False


class OneAtATime:
    """Mutual exclusion by key, within this process; a key nobody holds or awaits is forgotten."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[gevent.lock.Semaphore, list[int]]] = {}

    def acquire(self, key: str) -> None:
        lock, users = self._locks.setdefault(key, (gevent.lock.Semaphore(), [0]))
        users[0] += 1
        try:
            lock.acquire()
        except BaseException:  # killed while waiting: it holds nothing, and is no longer a user
            self._leave(key)
            raise

    def release(self, key: str) -> None:
        self._locks[key][0].release()
        self._leave(key)

    def _leave(self, key: str) -> None:
        users = self._locks[key][1]
        users[0] -= 1
        if not users[0]:
            del self._locks[key]


def _failed_signin(response: Response) -> bool:
    return response.status_code == 401


def _created(response: Response) -> bool:
    return response.status_code == 201


def init_app(app: Flask, settings: Settings) -> Limiter:
    try:
        limiter = Limiter(
            key_func=client_address,
            app=app,
            storage_uri=settings.rate_limit_storage_uri,
            enabled=settings.rate_limits_enabled,
            headers_enabled=False,
            # A broken limit store must not take the chat down with it.
            swallow_errors=True,
        )
    except ConfigurationError as exc:
        # Made here (with the limits on): an unknown scheme, or one whose
        # client library is not installed. The URI may hold a password.
        uri = settings.rate_limit_storage_uri
        reason = str(exc).replace(uri, f"{urlsplit(uri).scheme}://...")
        raise ConfigError(f"CHATAPI_RATE_LIMIT_STORAGE_URI must be a storage Flask-Limiter can use: {reason}") from None
    if not settings.rate_limits_enabled:
        # Off: no view is wrapped. Disabled, Flask-Limiter's wrapper would
        # still identify and filter every request before finding it exempt
        # (3% of a worker's CPU under send load, docs/performance.md).
        return limiter
    views = app.view_functions
    # Flask-Limiter checks a decorated limit inside the wrapper it returns, so
    # the wrapper must replace the registered view (decorating alone does nothing).
    views["api.create_token"] = limiter.limit(
        settings.rate_limit_signin_per_username, key_func=_signin_username, deduct_when=_failed_signin
    )(limiter.limit(settings.rate_limit_signin_per_address, deduct_when=_failed_signin)(views["api.create_token"]))
    views["api.create_user"] = limiter.limit(settings.rate_limit_registration_per_address, deduct_when=_created)(
        views["api.create_user"]
    )
    views["api.send_message"] = limiter.limit(
        settings.rate_limit_send_per_user, key_func=_sending_user, exempt_when=_no_valid_caller
    )(views["api.send_message"])

    # A failed sign-in counts once its answer is known (after_request), so
    # attempts sent all at once would all be checked before any counted: a
    # burst of guesses for one username would pass its limit by as many as
    # were sent. Here each waits for the previous attempt on its username to
    # have counted (per process, like the memory:// counters).
    signin_turns = OneAtATime()

    @app.before_request
    def _take_signin_turn() -> None:
        if request.endpoint == "api.create_token":
            turn = _signin_username()
            signin_turns.acquire(turn)
            g.signin_turn = turn  # only once taken: the teardown gives back what this request holds

    @app.teardown_request
    def _end_signin_turn(error: BaseException | None) -> None:
        turn = g.pop("signin_turn", None)
        if turn is not None:
            signin_turns.release(turn)

    @app.errorhandler(RateLimitExceeded)
    def _rate_limited(error: RateLimitExceeded) -> Response:
        retry_after = 1
        current = limiter.current_limit
        if current is not None:
            retry_after = max(1, math.ceil(current.reset_at - time.time()))
        return error_response(
            429, "rate_limited", f"too many requests: {error.description}", {"Retry-After": str(retry_after)}
        )

    return limiter
