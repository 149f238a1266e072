"""Abuse limits on a live server: rate limits (Flask-Limiter) answer 429
rate_limited with Retry-After, key on the real client address only when the
proxy is trusted, and one user's waiting long-polls are capped."""

from __future__ import annotations

import http.client
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
import requests
from sqlalchemy import event

from chatapi import Settings, create_app
from chatapi.limits import OneAtATime
from tests.conftest import migrate
from tests.support.api import PASSWORD, Api, unique_name
from tests.support.faults import Background, at_once
from tests.support.metrics import wait_for_waiting_polls, waiting_polls
from tests.support.nginx import NginxProcess
from tests.support.server import ServerProcess

LIMITS = {
    "CHATAPI_RATE_LIMITS": "on",
    "CHATAPI_RATE_LIMIT_SIGNIN_PER_USERNAME": "3/minute",
    "CHATAPI_RATE_LIMIT_SIGNIN_PER_ADDRESS": "5/minute",
    "CHATAPI_RATE_LIMIT_REGISTRATION_PER_ADDRESS": "4/hour",
    "CHATAPI_RATE_LIMIT_SEND_PER_USER": "5/minute",
}


@pytest.fixture
def limited_server(start_server, tmp_path: Path) -> ServerProcess:
    return start_server(f"sqlite:///{tmp_path / 'limits.sqlite3'}", env=LIMITS)


def _assert_rate_limited(response: requests.Response, max_retry_after: int) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= max_retry_after


def _sign_in(api: Api, username: str, password: str) -> requests.Response:
    return api.post("/api/v1/tokens", {"username": username, "password": password})


def test_every_rate_limit_answers_429_with_retry_after(limited_server: ServerProcess) -> None:
    api = Api(limited_server.base_url)
    alice, bob = api.signed_up(), api.signed_up()
    conversation = alice.start(bob.username)["id"]

    # Registrations per address: 4 per hour, counting only accounts created.
    assert api.post("/api/v1/users", {"username": alice.username, "password": PASSWORD}).status_code == 409
    for _ in range(2):
        assert api.post("/api/v1/users", {"username": unique_name(), "password": PASSWORD}).status_code == 201
    _assert_rate_limited(api.post("/api/v1/users", {"username": unique_name(), "password": PASSWORD}), 3601)

    # Failed sign-ins per username: 3 per minute; then even the right password waits.
    for _ in range(3):
        assert _sign_in(api, alice.username, "wrong password").status_code == 401
    _assert_rate_limited(_sign_in(api, alice.username.upper(), PASSWORD), 61)
    # Successful sign-ins do not count, and other accounts are not affected.
    for _ in range(2):
        assert _sign_in(api, bob.username, PASSWORD).status_code == 201

    # Failed sign-ins per address: 5 per minute, whichever usernames are tried.
    for _ in range(2):
        assert _sign_in(api, unique_name(), "wrong password").status_code == 401
    _assert_rate_limited(_sign_in(api, unique_name(), "wrong password"), 61)
    _assert_rate_limited(_sign_in(api, bob.username, PASSWORD), 61)

    # Sends per user: 5 per minute; the other party is not affected.
    for n in range(5):
        assert alice.send(conversation, f"message {n}")["seq"] == n + 1
    _assert_rate_limited(alice.post(f"/api/v1/conversations/{conversation}/messages", {"text": "one more"}), 61)
    # The limit comes before the body and the conversation (docs/api.md, "Order of checks").
    _assert_rate_limited(alice.post(f"/api/v1/conversations/{conversation}/messages", {"text": ""}), 61)
    _assert_rate_limited(alice.post("/api/v1/conversations/999999/messages", {"text": "lost"}), 61)
    assert bob.send(conversation, "my own budget")["seq"] == 6
    # Only acknowledged messages exist: the refused send stored nothing.
    assert [m["text"] for m in bob.messages(conversation)["messages"]][-1] == "my own budget"


def test_a_burst_of_guesses_for_one_username_gets_no_more_than_its_limit(start_server, tmp_path: Path) -> None:
    """Each failure counts once answered; attempts sent at the same moment must not all be
    checked before the first one counts. (One worker: the memory:// counters are per process.)"""
    server = start_server(
        f"sqlite:///{tmp_path / 'burst.sqlite3'}",
        env={
            **LIMITS,
            "CHATAPI_RATE_LIMIT_SIGNIN_PER_USERNAME": "5/minute",
            "CHATAPI_RATE_LIMIT_SIGNIN_PER_ADDRESS": "1000/minute",
        },
    )
    victim = Api(server.base_url).signed_up()
    guessers = [Api(server.base_url) for _ in range(20)]
    answers = at_once(
        [lambda g=g, n=n: _sign_in(g, victim.username.upper(), f"guess number {n}") for n, g in enumerate(guessers)]
    )
    assert sorted(answer.status_code for answer in answers) == [401] * 5 + [429] * 15


def test_sends_without_a_valid_token_are_refused_401_not_limited_nor_logged(limited_server) -> None:
    """The per-user send limit needs a user: without one the send is the view's to refuse.
    Flask-Limiter's errors reach the server's error log (gunicorn.conf.py): a key it could
    not make would be one there per request."""
    alice, bob = Api(limited_server.base_url).signed_up(), Api(limited_server.base_url).signed_up()
    conversation = alice.start(bob.username)["id"]
    strangers = [Api(limited_server.base_url), Api(limited_server.base_url, "not-a-token", "nobody")]
    for _ in range(4):  # together more than the 5 a minute a user may send
        for stranger in strangers:
            response = stranger.post(f"/api/v1/conversations/{conversation}/messages", {"text": "hi"})
            assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    # The limit still holds for a real sender.
    for n in range(5):
        assert alice.send(conversation, f"message {n}")["seq"] == n + 1
    _assert_rate_limited(alice.post(f"/api/v1/conversations/{conversation}/messages", {"text": "one more"}), 61)
    log = limited_server.log_path.read_text()
    assert "Failed to rate limit" not in log and "Traceback" not in log, log


def test_a_send_without_a_token_never_fails_inside_the_rate_limiter(tmp_path: Path, caplog) -> None:
    """Flask-Limiter logs and swallows any error of a limit's key: a send without a
    valid token has no user to key on, so it must be exempt, not an error per request."""
    url = f"sqlite:///{tmp_path / 'keys.sqlite3'}"
    migrate(url)
    app = create_app(Settings.from_env({"CHATAPI_DATABASE_URL": url, **LIMITS}))
    client = app.test_client()
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        answer = client.post("/api/v1/conversations/1/messages", json={"text": "hi"}, headers=headers)
        assert answer.status_code == 401
    assert [record.getMessage() for record in caplog.records if record.name == "flask-limiter"] == []
    app.extensions["chatapi"].db.dispose()


def test_a_send_while_the_database_is_down_is_503_with_one_line_not_a_limiter_traceback(tmp_path: Path, caplog) -> None:
    """The per-user send limit looks its caller up before the view runs. With the
    database down, that lookup failed inside Flask-Limiter, which logged "Failed to rate
    limit" with a traceback of some sixty lines for every send until the database was
    back (docs/deploy.md promises one line per 503, "database unavailable: ...")."""
    url = f"sqlite:///{tmp_path / 'down.sqlite3'}"
    migrate(url)
    app = create_app(Settings.from_env({"CHATAPI_DATABASE_URL": url, **LIMITS}))
    client = app.test_client()
    assert client.post("/api/v1/users", json={"username": "alice", "password": PASSWORD}).status_code == 201
    token = client.post("/api/v1/tokens", json={"username": "alice", "password": PASSWORD}).json["token"]
    engine = app.extensions["chatapi"].db.engine

    def refuse(_connection, _record) -> None:
        raise sqlite3.OperationalError("unable to open database file")

    event.listen(engine, "connect", refuse)
    engine.dispose()
    answer = client.post(
        "/api/v1/conversations/1/messages", json={"text": "hi"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 503 and answer.json["error"]["code"] == "service_unavailable"
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == [
        "database unavailable: OperationalError: unable to open database file"
    ]
    app.extensions["chatapi"].db.dispose()


def test_a_sign_in_body_nested_too_deep_is_400_with_the_limits_on(tmp_path: Path) -> None:
    """The per-username sign-in limit reads the body's username before the view does:
    a body it cannot parse must reach the view, which answers it 400 like /users does."""
    url = f"sqlite:///{tmp_path / 'deep.sqlite3'}"
    migrate(url)
    app = create_app(Settings.from_env({"CHATAPI_DATABASE_URL": url, **LIMITS}))
    client = app.test_client()
    for body in ("[" * 3000 + "]" * 3000, '{"a": ' * 5000 + "1" + "}" * 5000):
        for path in ("/api/v1/tokens", "/api/v1/users"):
            answer = client.post(path, data=body, content_type="application/json")
            assert answer.status_code == 400 and answer.json["error"]["code"] == "invalid_json", (path, answer.data)
    app.extensions["chatapi"].db.dispose()


def test_a_failed_sign_in_counts_for_its_username_however_deep_its_body_nests(tmp_path: Path) -> None:
    """How deep a JSON body may nest depends on how deep the call stack is where it is
    parsed. Parsed apart, a depth could fail in the limit's key (which then fell back to
    the address) and pass in the view: a 401 not counted for the username it tried, so
    every address could make the username's whole limit of guesses again."""
    url = f"sqlite:///{tmp_path / 'depths.sqlite3'}"
    migrate(url)
    env = {"CHATAPI_DATABASE_URL": url, **LIMITS, "CHATAPI_RATE_LIMIT_SIGNIN_PER_ADDRESS": "100000/minute"}
    app = create_app(Settings.from_env(env))
    client = app.test_client()
    answers = []
    for depth in range(1100, 0, -1):  # from too deep for any parse to easily parsed
        body = '{"username": "victim", "password": "wrong password", "x": ' + "[" * depth + "]" * depth + "}"
        answers.append(client.post("/api/v1/tokens", data=body, content_type="application/json").status_code)
    assert set(answers) == {400, 401, 429}
    assert answers.count(401) == 3  # CHATAPI_RATE_LIMIT_SIGNIN_PER_USERNAME
    app.extensions["chatapi"].db.dispose()


def test_rate_limits_off_switches_every_limit_off(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'off.sqlite3'}"
    migrate(url)
    app = create_app(Settings.from_env({"CHATAPI_DATABASE_URL": url, **LIMITS, "CHATAPI_RATE_LIMITS": "off"}))
    client = app.test_client()
    for n in range(8):
        assert client.post("/api/v1/users", json={"username": f"user{n}", "password": PASSWORD}).status_code == 201
    for _ in range(8):
        answer = client.post("/api/v1/tokens", json={"username": "user0", "password": "wrong password"})
        assert answer.status_code == 401
    token = client.post("/api/v1/tokens", json={"username": "user0", "password": PASSWORD}).get_json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    conversation = client.post("/api/v1/conversations", json={"peer": "user1"}, headers=headers).get_json()["id"]
    for n in range(8):
        answer = client.post(f"/api/v1/conversations/{conversation}/messages", json={"text": f"{n}"}, headers=headers)
        assert answer.status_code == 201
    app.extensions["chatapi"].db.dispose()


# Trusted proxies --------------------------------------------------------------

ADDRESS_LIMIT = {**LIMITS, "CHATAPI_RATE_LIMIT_SIGNIN_PER_USERNAME": "100/minute", "CHATAPI_MAX_WAITERS_PER_USER": "8"}


@pytest.fixture(scope="module")
def proxied_and_direct(tmp_path_factory) -> Iterator[tuple[NginxProcess, ServerProcess, ServerProcess]]:
    """nginx in front of an instance that trusts it, and an instance that trusts nobody."""
    root = tmp_path_factory.mktemp("proxies")
    trusting = ServerProcess(
        f"sqlite:///{root / 'trusting.sqlite3'}",
        env={**ADDRESS_LIMIT, "CHATAPI_TRUSTED_PROXIES": "1"},
        log_path=root / "trusting.log",
    )
    direct = ServerProcess(f"sqlite:///{root / 'direct.sqlite3'}", env=ADDRESS_LIMIT, log_path=root / "direct.log")
    nginx = None
    try:
        trusting.start()
        direct.start()
        nginx = NginxProcess([trusting.port]).start()
        yield nginx, trusting, direct
    finally:
        if nginx is not None:
            nginx.stop()
        trusting.stop()
        direct.stop()


def _failed_sign_in_from(source: str, port: int, forwarded_for: str | None = None) -> int:
    """A failed sign-in sent from loopback address `source` (127.0.0.2, ...); returns the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    headers = {"Content-Type": "application/json"}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    try:
        body = json.dumps({"username": unique_name(), "password": "wrong password"})
        conn.request("POST", "/api/v1/tokens", body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def test_behind_a_trusted_proxy_limits_key_on_the_real_client_address(proxied_and_direct) -> None:
    nginx, _, _ = proxied_and_direct
    for _ in range(5):
        assert _failed_sign_in_from("127.0.0.2", nginx.port) == 401
    assert _failed_sign_in_from("127.0.0.2", nginx.port) == 429
    # Another client behind the same proxy is not limited...
    assert _failed_sign_in_from("127.0.0.3", nginx.port) == 401
    # ...and cannot borrow (or burn) someone else's budget with a made-up header:
    # nginx appends the real address, and the app takes only the entry it added.
    assert _failed_sign_in_from("127.0.0.3", nginx.port, forwarded_for="127.0.0.2") == 401
    for _ in range(3):
        assert _failed_sign_in_from("127.0.0.4", nginx.port, forwarded_for="127.0.0.9") == 401
    assert _failed_sign_in_from("127.0.0.9", nginx.port) == 401


def test_without_trusted_proxies_forwarded_headers_are_ignored(proxied_and_direct) -> None:
    _, _, direct = proxied_and_direct
    # Every request claims another address; all count against the real one.
    for n in range(5):
        assert _failed_sign_in_from("127.0.0.5", direct.port, forwarded_for=f"10.0.0.{n}") == 401
    assert _failed_sign_in_from("127.0.0.5", direct.port, forwarded_for="10.0.0.99") == 429
    assert _failed_sign_in_from("127.0.0.6", direct.port) == 401


# Long-poll abuse ------------------------------------------------------------------


def test_a_users_ninth_waiting_long_poll_answers_the_oldest(proxied_and_direct) -> None:
    _, _, server = proxied_and_direct  # CHATAPI_MAX_WAITERS_PER_USER=8 (ADDRESS_LIMIT)
    api = Api(server.base_url)
    alice, bob = api.signed_up(), api.signed_up()
    conversation = bob.start(alice.username)["id"]
    head = alice.events()["last_pos"]

    def poll() -> tuple[dict, float]:
        return Api(server.base_url, alice.token).events(after=head, timeout=50), time.monotonic()

    polls = []
    for n in range(8):
        polls.append(Background(poll))
        wait_for_waiting_polls(server.base_url, n + 1)
    time.sleep(0.3)
    assert not any(p.done for p in polls)

    ninth_at = time.monotonic()
    polls.append(Background(poll))
    oldest, returned_at = polls[0].join(10)
    assert oldest == {"events": [], "last_pos": head}
    assert returned_at - ninth_at < 1
    time.sleep(0.3)
    assert not any(p.done for p in polls[1:]), "only the oldest may be answered"
    assert waiting_polls(server.base_url) == 8

    # Another user's long-polls are not affected by alice's cap.
    bob_head = bob.events()["last_pos"]
    bob_poll = Background(lambda: Api(server.base_url, bob.token).events(after=bob_head, timeout=50))
    wait_for_waiting_polls(server.base_url, 9)

    bob.send(conversation, "for everyone")
    for p in polls[1:]:
        page, _ = p.join(10)
        assert page["events"][0]["message"]["text"] == "for everyone"
    assert bob_poll.join(10)["events"][0]["message"]["text"] == "for everyone"


def test_a_sign_in_killed_while_waiting_its_turn_holds_none_and_is_forgotten() -> None:
    # A greenlet killed while it waits (a worker shutting down) holds no turn:
    # it must give none back (two attempts on a username would run at once),
    # and must not keep its username's entry alive.
    turns = OneAtATime()
    order: list[str] = []

    def attempt(name: str) -> None:
        turns.acquire("alice")
        order.append(f"{name} in")
        gevent.sleep(0.05)
        order.append(f"{name} out")
        turns.release("alice")

    first = gevent.spawn(attempt, "first")
    gevent.sleep(0)
    killed = gevent.spawn(attempt, "killed")
    gevent.sleep(0.01)
    killed.kill()
    last = gevent.spawn(attempt, "last")
    gevent.joinall([first, last], timeout=5)
    assert order == ["first in", "first out", "last in", "last out"]
    assert turns._locks == {}, "a key nobody holds or awaits is forgotten"
