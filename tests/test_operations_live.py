"""Operational behaviour of a real server: metrics across workers, readiness,
registration switch, shutdown of waiting long-polls."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from chatapi.config import Settings
from chatapi.db import Database
from tests.conftest import migrate
from tests.support.api import Api
from tests.support.faults import wait_until
from tests.support.metrics import metric, scrape, wait_for_waiting_polls
from tests.support.ports import free_port
from tests.support.postgres import database_connections, execute, query_value
from tests.support.server import REPO, ServerProcess, children


@pytest.mark.postgres
def test_metrics_add_up_across_workers(postgres_url: str, start_server) -> None:
    server = start_server(postgres_url, workers=2)
    alice = Api(server.base_url).signed_up()
    bob = Api(server.base_url).signed_up()
    conversation_id = alice.start(bob.username)["id"]
    for i in range(10):
        # New connections, so both workers serve some of them.
        Api(server.base_url, alice.token).send(conversation_id, f"m{i}")
    text = requests.get(server.base_url + "/metrics", timeout=5).text
    assert metric(text, "chatapi_messages_sent_total") == 10
    assert (
        metric(
            text,
            "chatapi_http_requests_total",
            method="POST",
            route="/api/v1/conversations/{id}/messages",
            status="201",
        )
        == 10
    )
    for name in ("chatapi_http_request_duration_seconds_bucket", "chatapi_longpolls_waiting", "chatapi_wakeups_total"):
        assert name in text


def test_waiting_gauge_and_wakeups_counter(start_server, tmp_path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'm.sqlite3'}")
    alice = Api(server.base_url).signed_up()
    bob = Api(server.base_url).signed_up()
    conversation_id = alice.start(bob.username)["id"]
    head = bob.events()["last_pos"]
    waiter = threading.Thread(target=bob.events, kwargs={"after": head, "timeout": 20})
    waiter.start()
    wait_for_waiting_polls(server.base_url, 1)
    alice.send(conversation_id, "wake")
    waiter.join(10)
    text = scrape(server.base_url)
    assert metric(text, "chatapi_longpolls_waiting") == 0
    assert metric(text, "chatapi_wakeups_total") >= 1


def test_registration_can_be_switched_off(start_server, tmp_path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'r.sqlite3'}", env={"CHATAPI_REGISTRATION": "off"})
    response = requests.post(server.base_url + "/api/v1/users", json={"username": "alice", "password": "password1"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "registration_closed"


@pytest.mark.parametrize("access_log", ["-", None])
def test_the_access_log_is_written_only_when_switched_on(start_server, tmp_path, access_log: str | None) -> None:
    env = {"CHATAPI_ACCESS_LOG": access_log} if access_log else None
    server = start_server(f"sqlite:///{tmp_path / 'a.sqlite3'}", env=env)
    assert requests.get(server.base_url + "/api/v1/me", timeout=5).status_code == 401
    server.stop()
    lines = [line for line in server.log_path.read_text().splitlines() if '"GET /api/v1/me HTTP/1.1" 401' in line]
    assert len(lines) == (1 if access_log else 0), server.log_path.read_text()


def test_malformed_http_is_in_the_access_log_not_a_traceback(start_server, tmp_path) -> None:
    """pywsgi refuses a malformed request before it has an environ, and gunicorn's access
    log reads one: each such request (a few bytes from anyone) wrote a traceback to the
    error log, and none to the access log."""
    server = start_server(f"sqlite:///{tmp_path / 'l.sqlite3'}", env={"CHATAPI_ACCESS_LOG": "-"})
    for request_head in (b"HELLO\r\n\r\n", b"GET / HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n"):
        assert _send_until_closed(server.port, request_head).startswith(b"HTTP/1.1 400 ")
    server.stop()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "AttributeError" not in log, log
    assert sum('"- - -" 400 ' in line for line in log.splitlines()) == 2, log


# The contract lets the command line choose another worker class; the
# shutdown promise must hold for gunicorn's own gevent workers too. (Their
# one difference: connections idle between requests keep them alive until
# `graceful_timeout`, where ChatapiWorker closes them at once.)
@pytest.mark.parametrize("worker_class", [None, "gevent", "gevent_pywsgi"])
def test_sigterm_answers_waiting_long_polls_at_once(start_server, tmp_path, worker_class: str | None) -> None:
    args = ["--worker-class", worker_class] if worker_class else None
    server = start_server(f"sqlite:///{tmp_path / 's.sqlite3'}", args=args)
    alice = Api(server.base_url).signed_up()
    head = alice.events()["last_pos"]
    answers: list[tuple[int, dict, float]] = []
    closed: list[str | None] = []

    def wait() -> None:
        response = Api(server.base_url, alice.token).get("/api/v1/events", params={"after": head, "timeout": 60})
        answers.append((response.status_code, response.json(), time.monotonic()))
        closed.append(response.headers.get("Connection"))

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for w in waiters:
        w.start()
    wait_for_waiting_polls(server.base_url, 3)
    alice.http.close()  # no idle kept-alive connection (see above)
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    for w in waiters:
        w.join(10)
    # Answered with what they have: nothing new, and the head to carry on from.
    assert [(status, body) for status, body, _ in answers] == [(200, {"events": [], "last_pos": head})] * 3
    # And not on a connection to keep: the clients' next requests must reach a live process.
    # (gunicorn's own `gevent` worker decides that as each request arrives, so
    # it closes a client's connection one request later, whatever the app says.)
    if worker_class != "gevent":
        assert closed == ["close"] * 3
    assert max(at for _, _, at in answers) - signalled < 2.0
    assert server.process.wait(15) == 0


def test_chunked_bodies_are_held_to_the_size_limit(start_server, tmp_path) -> None:
    # Without a Content-Length, Werkzeug cuts the body at the limit without
    # an error; a longer body must still get 413, not a 400 for cut JSON,
    # and before anything else is checked.
    server = start_server(f"sqlite:///{tmp_path / 'b.sqlite3'}")
    alice = Api(server.base_url).signed_up()
    bob = Api(server.base_url).signed_up()
    url = f"{server.base_url}/api/v1/conversations/{alice.start(bob.username)['id']}/messages"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {alice.token}"}
    padding = '{"text": "ok", "pad": "%s"}'
    exact = (padding % ("x" * (65_536 - len(padding % "")))).encode()

    def post_chunked(body: bytes) -> requests.Response:
        # A generator body makes requests send it chunked.
        return requests.post(url, data=(body[i : i + 8192] for i in range(0, len(body), 8192)), headers=headers)

    assert post_chunked(exact).status_code == 201
    too_large = post_chunked(exact[:-2] + b'x"}')
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "payload_too_large"
    # Body size is checked first (docs/api.md), before the token, as with a Content-Length.
    headers["Authorization"] = "Bearer not-a-token"
    assert post_chunked(exact[:-2] + b'x"}').status_code == 413
    assert post_chunked(exact).status_code == 401


_MALFORMED_HEADS = {
    "request-line": b"HELLO\r\n\r\n",
    "content-length": b"POST /api/v1/users HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n",
    "huge-header": b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    "long-uri": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: test\r\n\r\n",
}


# Whatever worker class the command line chooses (the contract lets it):
# gunicorn's own `gevent` worker parses HTTP with gunicorn's parser, which
# wrote its refusals as an HTML page, and its `gevent_pywsgi` with an empty
# body. (Not the long line on gunicorn's parser: it stops reading at its 4 KiB
# limit and closes with the rest unread, and the reset that makes can lose
# its answer before the client reads it.)
@pytest.mark.parametrize(
    ("worker_class", "case"),
    [
        (worker_class, case)
        for worker_class in (None, "gevent", "gevent_pywsgi")
        for case in _MALFORMED_HEADS
        if (worker_class, case) != ("gevent", "long-uri")
    ],
)
def test_malformed_http_gets_a_json_error(start_server, tmp_path, worker_class: str | None, case: str) -> None:
    # Refused by the HTTP server before the app sees it: still the contract's error shape.
    args = ["--worker-class", worker_class] if worker_class else None
    server = start_server(f"sqlite:///{tmp_path / 'm.sqlite3'}", args=args)
    answer = _send_until_closed(server.port, _MALFORMED_HEADS[case])
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0]
    if worker_class == "gevent":
        # gunicorn's parser, with its own statuses (431 for a header too large).
        assert status.split(b" ")[1] in (b"400", b"431"), head
    else:
        assert status in (b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 414 URI Too Long"), head
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "invalid_request"


def test_a_request_target_in_absolute_form_is_served_by_its_path(start_server, tmp_path) -> None:
    """RFC 9112, section 3.2.2: a server must accept a whole URL as the request target."""
    server = start_server(f"sqlite:///{tmp_path / 'a.sqlite3'}")
    for target, status in (
        (b"http://chat.example/healthz", b"200"),
        (b"HTTPS://chat.example:8443/api/v1/openapi.json?x=1", b"200"),
        (b"http://chat.example/nowhere", b"404"),
    ):
        head = b"GET " + target + b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        answer = _send_until_closed(server.port, head)
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:300]


_USERS_HEAD = b"POST /api/v1/users HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
_SMUGGLED = b"GET /api/v1/smuggled HTTP/1.1\r\nHost: test\r\n\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        _USERS_HEAD + b"Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n" + _SMUGGLED,
        _USERS_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n" + _SMUGGLED,
        _USERS_HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        _USERS_HEAD + b"Content-Length: 2\r\nContent-Length: 47\r\n\r\n{}" + _SMUGGLED,
        # Not 1*DIGIT (RFC 9110, section 8.6), though Python's int() reads them as 2 and 10.
        _USERS_HEAD + b"Content-Length: +2\r\n\r\n{}" + _SMUGGLED,
        _USERS_HEAD + b"Content-Length: 1_0\r\n\r\n{}        " + _SMUGGLED,
    ],
    ids=[
        "length-and-chunked",
        "not-only-chunked",
        "chunked-twice",
        "two-lengths",
        "signed-length",
        "length-with-underscore",
    ],
)
def test_a_body_of_ambiguous_length_is_refused_and_the_connection_closed(
    start_server, tmp_path, request_bytes: bytes
) -> None:
    """Read one way here and another way by a proxy in front, the body's end
    would decide what the next request is (request smuggling, RFC 9112 section 6)."""
    server = start_server(f"sqlite:///{tmp_path / 's.sqlite3'}")
    answer = _send_until_closed(server.port, request_bytes)
    # One answer, then the server closed the connection: nothing after the head was taken for a request.
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head, head
    assert json.loads(body)["error"]["code"] == "invalid_request"


# A field that holds one value, given twice, is read as the first value here
# and may be read as the last by a proxy in front: the request is refused
# (RFC 9110 section 5.3; RFC 9112 section 3.2 for Host), as gunicorn's own
# parser (`--worker-class gevent`) refuses it, whatever the worker class.
@pytest.mark.parametrize("worker_class", [None, "gevent", "gevent_pywsgi"])
def test_a_host_or_content_type_given_twice_is_refused(start_server, tmp_path, worker_class: str | None) -> None:
    args = ["--worker-class", worker_class] if worker_class else None
    server = start_server(f"sqlite:///{tmp_path / 'd.sqlite3'}", args=args)
    body = b'{"username": "twice", "password": "long enough"}'
    framed = b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    for head in (
        b"POST /api/v1/users HTTP/1.1\r\nHost: test\r\nHost: other\r\nContent-Type: application/json\r\n",
        b"POST /api/v1/users HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Type: text/plain\r\n",
    ):
        answer = _send_until_closed(server.port, head + framed)
        status, _, body_sent = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 400 "), answer
        assert json.loads(body_sent)["error"]["code"] == "invalid_request"
    # Neither was taken: the name is still free.
    json_type = {"Content-Type": "application/json"}
    registered = requests.post(server.base_url + "/api/v1/users", data=body, headers=json_type)
    assert registered.status_code == 201


# Under gunicorn's own workers too (the contract lets the command line choose
# one): `gevent_pywsgi` kept the connection and answered the bytes after the bad
# chunk as a second request, and `gevent` (gunicorn's parser) answered 500.
@pytest.mark.parametrize("worker_class", [None, "gevent", "gevent_pywsgi"])
def test_a_malformed_chunked_body_closes_the_connection(start_server, tmp_path, worker_class: str | None) -> None:
    args = ["--worker-class", worker_class] if worker_class else None
    server = start_server(f"sqlite:///{tmp_path / 'c.sqlite3'}", args=args)
    chunked = _USERS_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        # A well-formed chunked body: answered, and the connection kept for the next request.
        sock.sendall(chunked + b"2\r\n{}\r\n0\r\n\r\n")
        assert b"'username' is required" in _read_response(sock)
        assert _closed_within(sock, 0.5) is None
        sock.settimeout(10)
        sock.sendall(chunked + b"zz\r\n{}\r\n0\r\n\r\n" + _SMUGGLED)
        answer = _read_response(sock)
        assert answer.startswith(b"HTTP/1.1 400 ") and b"connection: close" in answer.lower(), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "invalid_request"
        assert sock.recv(65536) == b"", "a second answer: the bytes after the bad chunk were read as a request"


@pytest.mark.parametrize(
    "request_bytes",
    [
        _USERS_HEAD + b'Content-Length: 60\r\n\r\n{"username": ',
        _USERS_HEAD + b'Transfer-Encoding: chunked\r\n\r\n40\r\n{"username": ',
        _USERS_HEAD + b"Content-Length: 60\r\n\r\n",
    ],
    ids=["cut-short", "chunked-cut-short", "never-sent"],
)
def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(
    start_server, tmp_path, request_bytes: bytes
) -> None:
    """Otherwise a client announcing a body it never sends holds a connection for as long as it likes."""
    server = start_server(f"sqlite:///{tmp_path / 't.sqlite3'}", env={"CHATAPI_BODY_TIMEOUT_SECS": "1"})
    started = time.monotonic()
    answer = _send_until_closed(server.port, request_bytes)
    assert 0.9 < time.monotonic() - started < 2.5
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head, head
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_a_body_within_its_deadline_is_read_however_it_arrives(start_server, tmp_path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 't.sqlite3'}", env={"CHATAPI_BODY_TIMEOUT_SECS": "1"})
    body = json.dumps({"username": "slowpoke", "password": "correct horse"}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_USERS_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        time.sleep(0.5)
        sock.sendall(body[10:])
        assert _read_response(sock).startswith(b"HTTP/1.1 201 ")
        # The deadline is each request's own: a kept-alive connection carries on.
        time.sleep(0.7)
        assert _raw_get(sock).startswith(b"HTTP/1.1 200 ")


def test_a_body_the_app_did_not_read_closes_the_connection_at_the_deadline(start_server, tmp_path) -> None:
    # No route reads this body; pywsgi reads it after the answer to reach the
    # next request, and that read has the same deadline.
    server = start_server(f"sqlite:///{tmp_path / 't.sqlite3'}", env={"CHATAPI_BODY_TIMEOUT_SECS": "1"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/nowhere HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{}")
        assert _read_response(sock).startswith(b"HTTP/1.1 404 ")
        closed_after = _closed_within(sock, 5)
        assert closed_after is not None and closed_after < 2, closed_after


def test_a_request_asking_for_an_upgrade_is_answered_like_any_other(start_server, tmp_path) -> None:
    # As a client asking for HTTP/2 may. pywsgi hands such a request the
    # bare socket (for WebSockets, which chatapi does not serve), and
    # Werkzeug then read a POST's body until the client closed the
    # connection: it was never answered before that.
    server = start_server(f"sqlite:///{tmp_path / 'u.sqlite3'}")
    body = json.dumps({"username": "upgrader", "password": "correct horse"}).encode()
    upgrade = b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(_USERS_HEAD + upgrade + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        answer = _read_response(sock)
        assert answer.startswith(b"HTTP/1.1 201 ") and b'"username":"upgrader"' in answer, answer
        assert _raw_get(sock).startswith(b"HTTP/1.1 200 ")


def _send_until_closed(port: int, request_bytes: bytes) -> bytes:
    """All the server answers to `request_bytes` on a new connection, until it closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request_bytes)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (head and body) from a kept-alive socket."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        assert chunk, "closed before the response"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    while len(body) < int(lengths[0]):
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def _raw_get(sock: socket.socket, path: str = "/healthz") -> bytes:
    """One GET on a kept-alive socket; the whole response (head and body)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return _read_response(sock)


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed the connection, or None if it was still open."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        return time.monotonic() - started if sock.recv(1) == b"" else None
    except TimeoutError:
        return None


def test_keep_alive_serves_many_requests_and_closes_idle_connections(start_server, tmp_path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'k.sqlite3'}", env={"CHATAPI_KEEPALIVE_SECS": "1"})
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        for _ in range(3):
            answer = _raw_get(sock)
            assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" not in answer.lower()
        idle_for = _closed_within(sock, 5)
        assert idle_for is not None and 0.5 < idle_for < 3, idle_for
    # A connection that never sends a request is closed too.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        assert _closed_within(sock, 5) is not None


def test_with_keep_alive_off_a_stalled_request_head_is_still_closed(start_server, tmp_path) -> None:
    """CHATAPI_KEEPALIVE_SECS=0 turns keep-alive off, not the limit on a request's head:
    without one, a client that sends half a head (or nothing) held its connection for ever."""
    server = start_server(f"sqlite:///{tmp_path / 'h.sqlite3'}", env={"CHATAPI_KEEPALIVE_SECS": "0"})
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        answer = _raw_get(sock)
        assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower()
    for sent in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(sent)
            sock.settimeout(10)
            answer = b""
            while chunk := sock.recv(4096):  # a stalled head is answered 400, then closed
                answer += chunk
            assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer


def test_sigterm_closes_kept_alive_connections(start_server, tmp_path) -> None:
    # CHATAPI_KEEPALIVE_SECS=30: without the worker's shutdown rule, the idle
    # connection below would hold the stop for graceful_timeout (20 s).
    server = start_server(f"sqlite:///{tmp_path / 'c.sqlite3'}", env={"CHATAPI_KEEPALIVE_SECS": "30"})
    alice = Api(server.base_url).signed_up()
    head = alice.events()["last_pos"]
    idle = socket.create_connection(("127.0.0.1", server.port))
    assert _raw_get(idle).startswith(b"HTTP/1.1 200")
    answers: list[requests.Response] = []
    waiter = threading.Thread(
        target=lambda: answers.append(
            Api(server.base_url, alice.token).get("/api/v1/events", params={"after": head, "timeout": 60})
        )
    )
    waiter.start()
    time.sleep(1)
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    waiter.join(10)
    assert answers[0].status_code == 200 and answers[0].headers["Connection"] == "close"
    assert server.process.wait(15) == 0
    assert time.monotonic() - signalled < 10
    idle.close()


def test_sqlite_runs_exactly_one_worker(start_server, tmp_path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'one.sqlite3'}", workers=3)
    time.sleep(1)
    assert len(server.worker_pids()) == 1


def _server_sessions(database_url: str) -> int:
    """Sessions on the database other than this one and the wake-up connections."""
    return query_value(
        database_url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND application_name NOT IN ('chatapi-listener', 'chatapi-publisher')",
    )


@pytest.mark.postgres
def test_each_worker_opens_its_first_connections_as_it_starts(postgres_url: str, start_server) -> None:
    # Without this, the first requests after a start each waited for a new
    # backend and its functions (10-50 ms): the pool is ready before load comes.
    start_server(postgres_url, workers=2, env={"CHATAPI_DB_POOL_WARM": "3"})
    deadline = time.monotonic() + 10
    while _server_sessions(postgres_url) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    # Three each; a readiness check that held its connection while the
    # warm-up ran adds one more to that worker. Six or more is only
    # possible when both workers warmed up.
    assert 6 <= _server_sessions(postgres_url) <= 8


@pytest.mark.postgres
def test_the_warm_up_counts_the_connections_requests_hold_and_never_waits_for_one(postgres_url: str, caplog) -> None:
    # A warm-up that waited for a connection in use (here, one held by a
    # send waiting on a row lock) held all the others meanwhile, and every
    # request of the worker queued behind it for the pool's timeout (10 s).
    migrate(postgres_url)
    settings = Settings.from_env(
        {"CHATAPI_DATABASE_URL": postgres_url, "CHATAPI_DB_POOL_SIZE": "3", "CHATAPI_DB_MAX_OVERFLOW": "0"}
    )
    db = Database(settings)
    pool = db.autocommit_engine.pool
    try:
        held_by_a_request = db.autocommit_engine.raw_connection()
        db.warm_up(3)
        assert (pool.checkedout(), pool.checkedin()) == (1, 2)
        assert "could not open the pool's first connections" not in caplog.text
        held_by_a_request.close()
        db.warm_up(3)  # the pool holds three already: nothing to open
        assert (pool.checkedout(), pool.checkedin()) == (0, 3)
    finally:
        db.dispose()


@pytest.mark.postgres
def test_each_worker_connects_for_wake_ups_as_it_starts(postgres_url: str, start_server) -> None:
    # Not at the first send: its wake-ups to the other processes would
    # wait for a new backend first (10-50 ms).
    start_server(postgres_url, workers=2, env={"CHATAPI_DB_POOL_WARM": "0"})

    def connected(role: str) -> int:
        return database_connections(postgres_url, f"application_name = 'chatapi-{role}'")

    wait_until(lambda: connected("listener") == connected("publisher") == 2, 10, what="a listener and a publisher each")
    time.sleep(0.5)
    assert connected("listener") == connected("publisher") == 2


@pytest.mark.postgres
def test_no_connections_are_opened_ahead_when_warming_is_off(postgres_url: str, start_server) -> None:
    # Ready when it answers /healthz, which needs no database: /readyz checks
    # would open connections, more than one per worker when a slow one overlaps the next.
    start_server(postgres_url, workers=2, env={"CHATAPI_DB_POOL_WARM": "0"}, ready_path="/healthz")
    time.sleep(1)
    assert _server_sessions(postgres_url) == 0


@pytest.mark.parametrize(("value", "migrated"), [("off", False), ("false", False), ("0", False), ("yes", True)])
def test_migrating_at_start_is_a_switch(start_server, tmp_path: Path, value: str, migrated: bool) -> None:
    """Operators who migrate as a separate deploy step switch it off, in the words every switch takes."""
    database = tmp_path / "switch.sqlite3"
    server = start_server(f"sqlite:///{database}", env={"CHATAPI_MIGRATE": value}, ready_path="/healthz")
    tables = {name for (name,) in sqlite3.connect(database).execute("SELECT name FROM sqlite_master")}
    assert ("alembic_version" in tables) is migrated
    # Not ready until migrated, and it says why.
    readyz = requests.get(server.base_url + "/readyz", timeout=10)
    if migrated:
        assert readyz.status_code == 200
    else:
        assert readyz.status_code == 503 and readyz.headers["Retry-After"] == "1"
        assert readyz.json()["error"]["message"] == "the database schema is not migrated (alembic upgrade head)"
        # Migrated as a separate step (from the repository root, as the README says): ready.
        env = {**os.environ, "CHATAPI_DATABASE_URL": f"sqlite:///{database}"}
        subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=REPO, env=env, check=True)
        assert requests.get(server.base_url + "/readyz", timeout=10).status_code == 200


def _unavailable(response: requests.Response) -> str:
    """The message of a 503 the client is told to retry, as during a database outage."""
    assert response.status_code == 503 and response.headers["Retry-After"] == "1", response.text
    assert response.json()["error"]["code"] == "service_unavailable"
    return response.json()["error"]["message"]


@pytest.mark.postgres
def test_an_unmigrated_postgresql_database_is_unready_and_503_until_migrated(postgres_url: str, start_server) -> None:
    """Each new connection prepares statements on the tables: before they exist the requests
    are a clean 503 (not a 500), /readyz says why, and `alembic upgrade head` alone brings it back."""
    env = {"CHATAPI_MIGRATE": "off", "CHATAPI_DB_POOL_WARM": "2"}
    server = start_server(postgres_url, env=env, ready_path="/healthz")
    wait_until(lambda: "pool's first connections" in server.log_path.read_text(), 10, what="the warm-up's warning")
    readyz = requests.get(server.base_url + "/readyz", timeout=10)
    assert _unavailable(readyz) == "the database schema is not migrated (alembic upgrade head)"
    _unavailable(requests.post(server.base_url + "/api/v1/users", json={"username": "alice", "password": "pass1234"}))
    _unavailable(Api(server.base_url, "not-a-token").get("/api/v1/events"))  # the hot path's bare cursor
    migrate(postgres_url)
    assert requests.get(server.base_url + "/readyz", timeout=10).status_code == 200
    alice = Api(server.base_url).signed_up()
    bob = Api(server.base_url).signed_up()
    conversation_id = alice.start(bob.username)["id"]
    alice.send(conversation_id, "migrated")
    assert [message["text"] for message in bob.messages(conversation_id)["messages"]] == ["migrated"]
    log = server.log_path.read_text()
    assert "could not open the pool's first connections: SchemaNotMigrated" in log
    assert "Traceback" not in log and "failed with" not in log, log


@pytest.mark.postgres
def test_a_database_at_an_older_revision_is_unready_and_a_newer_one_is_not(postgres_url: str, start_server) -> None:
    migrate(postgres_url, "0001")
    server = start_server(postgres_url, env={"CHATAPI_MIGRATE": "off"}, ready_path="/healthz")
    readyz = requests.get(server.base_url + "/readyz", timeout=10)
    needs = "the database schema is at revision 0001, this code needs 0002 (alembic upgrade head)"
    assert _unavailable(readyz) == needs
    migrate(postgres_url)
    assert requests.get(server.base_url + "/readyz", timeout=10).status_code == 200
    # A revision this code does not know: a newer release migrated the database
    # during a rolling deploy, and this one still serves until it is replaced.
    execute(postgres_url, "UPDATE alembic_version SET version_num = '0003'")
    assert requests.get(server.base_url + "/readyz", timeout=10).status_code == 200


@pytest.mark.postgres
def test_a_schema_no_connection_can_be_set_up_on_is_named_by_its_revision(postgres_url: str, start_server) -> None:
    """A revision behind whose next migration adds a column the code prepares on, or a newer
    release's that renamed one: new connections fail their set-up, and /readyz says which."""
    migrate(postgres_url)
    execute(postgres_url, "ALTER TABLE users RENAME COLUMN acked_pos TO acked_position")
    execute(postgres_url, "UPDATE alembic_version SET version_num = '0001'")
    env = {"CHATAPI_MIGRATE": "off", "CHATAPI_DB_POOL_WARM": "0"}
    server = start_server(postgres_url, env=env, ready_path="/healthz")
    readyz = requests.get(server.base_url + "/readyz", timeout=10)
    needs = "the database schema is at revision 0001, this code needs 0002 (alembic upgrade head)"
    assert _unavailable(readyz) == needs
    execute(postgres_url, "UPDATE alembic_version SET version_num = '0003'")
    readyz = requests.get(server.base_url + "/readyz", timeout=10)
    assert _unavailable(readyz) == "the database schema (revision 0003) lacks tables or columns this code needs"


@pytest.mark.postgres
def test_a_worker_that_finds_no_free_connection_slots_warns_in_one_line(postgres, start_server) -> None:
    """The pool opens connections without SQLAlchemy wrapping the driver's errors: the
    warm-up's warning must catch those too, not die as an unhandled greenlet."""
    url = postgres.new_database()
    role, database = f"limited_{url.rsplit('_', 1)[1]}", url.rsplit("/", 1)[1]
    execute(postgres.url(), f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 3")
    execute(postgres.url(), f"ALTER DATABASE {database} OWNER TO {role}")
    role_url = url.replace("postgres@", f"{role}@", 1)
    migrate(role_url)
    # Its two wake-up connections and the warm-up's ten share three slots.
    server = start_server(role_url, env={"CHATAPI_DB_POOL_WARM": "10"}, ready_path="/healthz")
    warning = "could not open the pool's first connections: OperationalError: "
    wait_until(lambda: warning in server.log_path.read_text(), 10, what="the warm-up's warning")
    log = server.log_path.read_text()
    assert f'too many connections for role "{role}"' in log.split(warning, 1)[1].splitlines()[0], log
    assert "Traceback" not in log and "failed with" not in log, log


def test_the_default_database_is_in_the_working_directory_wherever_that_is(start_server, tmp_path: Path) -> None:
    """Started from another directory, the schema is migrated in the file the app then uses (API.md: the
    working directory), not in one beside gunicorn.conf.py."""
    here = tmp_path / "run"
    here.mkdir()
    server = start_server(None, cwd=here, args=["--pythonpath", str(REPO)])
    alice = Api(server.base_url).signed_up()
    assert alice.get("/api/v1/me").json()["username"] == alice.username
    users = sqlite3.connect(here / "chatapi.sqlite3").execute("SELECT username FROM users").fetchall()
    assert users == [(alice.username,)]


def _gunicorn(database_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A start of gunicorn.conf.py that is expected to be refused: its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", "127.0.0.1:0", *args, "wsgi:app"],
        cwd=REPO,
        env={**os.environ, "CHATAPI_DATABASE_URL": database_url, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_misspelt_migrate_switch_stops_the_start(tmp_path: Path) -> None:
    result = _gunicorn(f"sqlite:///{tmp_path / 'x.sqlite3'}", env={"CHATAPI_MIGRATE": "nope"})
    assert result.returncode != 0 and "CHATAPI_MIGRATE must be on or off" in result.stderr


def test_preloading_the_app_in_the_master_is_refused(tmp_path: Path) -> None:
    """With --preload every worker would share the master's wake-up origin and skip the others'
    wake-ups as its own, and /metrics would be empty: refused, with the reason."""
    result = _gunicorn(f"sqlite:///{tmp_path / 'x.sqlite3'}", "--preload")
    assert result.returncode != 0 and "cannot run with --preload" in result.stderr


def test_the_metrics_directory_goes_with_the_server(start_server, tmp_path: Path) -> None:
    """Prometheus' files of the workers live in a directory made at start; it is removed
    when the master exits, also when it never got to serve (gunicorn's on_exit is not called then)."""
    env = {"TMPDIR": str(tmp_path)}
    server = start_server(f"sqlite:///{tmp_path / 'm.sqlite3'}", env=env)
    assert len(list(tmp_path.glob("chatapi-metrics-*"))) == 1
    assert server.stop() == 0
    assert list(tmp_path.glob("chatapi-metrics-*")) == []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "gunicorn.conf.py",
                "--bind",
                f"127.0.0.1:{taken.getsockname()[1]}",
            ]
            + ["wsgi:app"],
            cwd=REPO,
            env={**os.environ, **env, "CHATAPI_DATABASE_URL": f"sqlite:///{tmp_path / 'm.sqlite3'}"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0 and "Address already in use" in result.stderr
    assert list(tmp_path.glob("chatapi-metrics-*")) == []


@pytest.mark.postgres
def test_database_url_is_read_when_chatapi_database_url_is_unset(postgres_url: str, start_server) -> None:
    """As hosting platforms set it, also in their postgres:// spelling; PostgreSQL brings the default 2 workers."""
    heroku_style = postgres_url.replace("postgresql://", "postgres://", 1)
    server = start_server(None, workers=None, env={"DATABASE_URL": heroku_style})
    alice = Api(server.base_url).signed_up()
    assert query_value(postgres_url, f"SELECT count(*) FROM users WHERE username = '{alice.username}'") == 1
    wait_until(lambda: len(server.worker_pids()) == 2, timeout=15, what="the default 2 workers on PostgreSQL")


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_a_worker_class_without_gevent_is_refused(tmp_path: Path, worker_class: str) -> None:
    """Under them requests hung (sync) or answered 500 after committing (gthread)."""
    result = _gunicorn(f"sqlite:///{tmp_path / 'x.sqlite3'}", "--worker-class", worker_class)
    assert result.returncode != 0 and "chatapi needs gevent workers" in result.stderr


def test_a_second_instance_on_the_same_sqlite_file_is_refused(start_server, tmp_path: Path) -> None:
    """Wake-ups on SQLite stay in their process: a second instance's sends left
    the first one's long-polls asleep until their timeout. (The URL is
    percent-encoded, as SQLAlchemy reads it: the lock goes next to the file.)"""
    (tmp_path / "a dir").mkdir()
    url = f"sqlite:///{tmp_path / 'a%20dir' / 'one.sqlite3'}"
    first = start_server(url)
    assert (tmp_path / "a dir" / "one.sqlite3.lock").exists()
    result = _gunicorn(url)
    assert result.returncode != 0 and "another chatapi instance serves" in result.stderr
    Api(first.base_url).signed_up()  # the first one serves on
    assert first.stop() == 0
    Api(start_server(url).base_url).signed_up()  # and once it is gone, the file is free


def test_sqlite_keeps_one_worker_through_a_reload_and_sigttin(start_server, tmp_path: Path) -> None:
    """A reload reads `workers` again (here 3, from the command line); SIGTTIN adds one."""
    server = start_server(f"sqlite:///{tmp_path / 'w.sqlite3'}", workers=3)
    before = server.worker_pids()
    assert len(before) == 1
    server.signal(signal.SIGHUP)
    wait_until(lambda: server.worker_pids() and not set(server.worker_pids()) & set(before), 30, what="a new worker")
    server.signal(signal.SIGTTIN)
    counts = set()
    deadline = time.monotonic() + 3  # new workers would have started by then
    while time.monotonic() < deadline:
        counts.add(len(server.worker_pids()))
        time.sleep(0.05)
    assert counts == {1}
    Api(server.base_url).signed_up()


@pytest.mark.postgres
def test_a_database_url_given_with_gunicorns_e_option_is_the_one_the_master_uses(
    postgres_url: str, start_server, tmp_path: Path
) -> None:
    """gunicorn applies -e after reading gunicorn.conf.py: the master took the
    default SQLite file for the database, held PostgreSQL to one worker and
    locked a SQLite file nobody used."""
    here = tmp_path / "here"
    here.mkdir()
    server = start_server(
        None, workers=2, args=["-e", f"CHATAPI_DATABASE_URL={postgres_url}", "--pythonpath", str(REPO)], cwd=here
    )
    wait_until(lambda: len(server.worker_pids()) == 2, timeout=15, what="2 workers")
    assert list(here.iterdir()) == []  # no SQLite file, no lock


def _downgrade_one_revision(database: Path) -> None:
    """The SQLite database one release behind, as new code finds it on disk."""
    subprocess.run(
        [sys.executable, "-m", "alembic", "downgrade", "-1"],
        cwd=REPO,
        env={**os.environ, "CHATAPI_DATABASE_URL": f"sqlite:///{database}"},
        check=True,
        capture_output=True,
    )


def test_a_reload_migrates_the_schema_before_new_workers_start(start_server, tmp_path: Path) -> None:
    """`systemctl reload` is how new code is deployed (docs/deploy.md): its migrations must run too."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(Config(str(REPO / "alembic.ini"))).get_current_head()
    database = tmp_path / "r.sqlite3"
    server = start_server(f"sqlite:///{database}")

    def version() -> str:
        with sqlite3.connect(database) as conn:
            return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]

    assert version() == head
    _downgrade_one_revision(database)
    assert version() != head
    server.signal(signal.SIGHUP)
    wait_until(lambda: version() == head, 30, what="the reload's migration")


def test_a_reload_whose_migration_fails_stops_with_the_reason_in_the_error_log(start_server, tmp_path: Path) -> None:
    """New code must not serve an old schema: the master stops (exit status 1). The operator reads why
    in gunicorn's error log, which may be a file: not only in the migration's stderr."""
    database = tmp_path / "r.sqlite3"
    error_log = tmp_path / "error.log"
    server = start_server(f"sqlite:///{database}", args=["--error-logfile", str(error_log)])
    _downgrade_one_revision(database)
    # What the head migration creates, already there: its upgrade fails.
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE secrets (name TEXT)")
    server.signal(signal.SIGHUP)
    assert server.process is not None and server.process.wait(30) == 1
    reason = "reload stopped: alembic upgrade head failed: OperationalError: table secrets already exists"
    assert reason in error_log.read_text()


def test_a_metrics_directory_given_by_the_operator_is_emptied_at_start(start_server, tmp_path: Path) -> None:
    """prometheus_client needs it wiped before a start: a killed run's files kept counting."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    url = f"sqlite:///{tmp_path / 'p.sqlite3'}"
    first = start_server(url, env=env)
    alice, bob = Api(first.base_url).signed_up(), Api(first.base_url).signed_up()
    alice.send(alice.start(bob.username)["id"], "counted once")
    assert metric(scrape(first.base_url), "chatapi_messages_sent_total") == 1
    first.kill()  # no clean exit: its files stay
    second = start_server(url, env=env)
    assert metric(scrape(second.base_url), "chatapi_messages_sent_total") == 0


def test_a_sqlite_database_in_the_metrics_directory_is_refused_and_kept(tmp_path: Path) -> None:
    """Both in a unit's one writable directory, say: prometheus_client reads every *.db
    there as its own (/metrics answered 500), and the start's wipe deleted the database."""
    database = tmp_path / "chatapi.db"
    database.write_bytes(b"the operator's data")
    result = _gunicorn(f"sqlite:///{database}", env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert result.returncode != 0 and "PROMETHEUS_MULTIPROC_DIR must not hold the database" in result.stderr
    assert database.read_bytes() == b"the operator's data"


def _alive(pid: int) -> bool:
    """Running: not gone, and not a zombie (whose reaping, by whatever adopted it, may lag)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.postgres
def test_a_binary_upgrade_serves_throughout_and_leaves_no_metrics_directory(
    postgres_url: str, start_server, tmp_path: Path
) -> None:
    """gunicorn's SIGUSR2 starts a new master beside the old one (on the same
    listening socket) with the environment the old one started with: it makes
    its own metrics directory, counts from 0, and each master removes its own."""
    pidfile = tmp_path / "gunicorn.pid"
    old = start_server(postgres_url, workers=2, env={"TMPDIR": str(tmp_path)}, args=["--pid", str(pidfile)])
    alice, bob = Api(old.base_url).signed_up(), Api(old.base_url).signed_up()
    conversation_id = alice.start(bob.username)["id"]
    alice.send(conversation_id, "before")

    old.signal(signal.SIGUSR2)
    # The new master writes <pidfile>.2 until the old one is gone.
    new_master = wait_until(
        lambda: int(Path(f"{pidfile}.2").read_text() or 0), timeout=30, what="the new master's pid file"
    )
    wait_until(
        lambda: len(children(new_master)) == 2,
        timeout=30,
        what="the new master's two workers",
    )
    assert len(list(tmp_path.glob("chatapi-metrics-*"))) == 2
    assert old.stop() == 0
    assert len(list(tmp_path.glob("chatapi-metrics-*"))) == 1

    for i in range(3):
        Api(old.base_url, alice.token).send(conversation_id, f"after {i}")
    assert [m["text"] for m in bob.messages(conversation_id)["messages"]] == ["before", "after 0", "after 1", "after 2"]
    assert metric(scrape(old.base_url), "chatapi_messages_sent_total") == 3

    os.kill(new_master, signal.SIGTERM)
    wait_until(lambda: not _alive(new_master), timeout=30, what="the new master's exit")
    assert list(tmp_path.glob("chatapi-metrics-*")) == []


def test_a_binary_upgrade_on_sqlite_is_refused_and_the_old_master_serves_on(start_server, tmp_path: Path) -> None:
    """Two masters on one SQLite file would not wake each other's long-polls (docs/deploy.md)."""
    old = start_server(f"sqlite:///{tmp_path / 'u.sqlite3'}")
    old.signal(signal.SIGUSR2)
    wait_until(
        lambda: "another chatapi instance serves" in old.log_path.read_text(),
        timeout=30,
        what="the new master's refusal",
    )
    alice, bob = Api(old.base_url).signed_up(), Api(old.base_url).signed_up()
    assert alice.send(alice.start(bob.username)["id"], "still served")["seq"] == 1


def _warn_of_an_unavailable_database(start_server, args: list[str]) -> ServerProcess:
    """A server on a database nothing listens for, whose sign-up answers 503 and logs
    "database unavailable" (a chatapi warning); started with gunicorn's `args`."""
    server = start_server(
        f"postgresql://chatapi@127.0.0.1:{free_port()}/chatapi",
        env={"CHATAPI_MIGRATE": "off"},
        args=args,
        ready_path="/healthz",
    )
    signup = requests.post(
        server.base_url + "/api/v1/users", json={"username": "alice", "password": "password123"}, timeout=10
    )
    assert signup.status_code == 503
    return server


def test_chatapis_warnings_are_written_to_gunicorns_error_log(start_server, tmp_path: Path) -> None:
    """Where --error-logfile says, in gunicorn's format: they went to stderr, bare."""
    error_log = tmp_path / "error.log"
    _warn_of_an_unavailable_database(start_server, ["--error-logfile", str(error_log)])
    wait_until(
        lambda: re.search(r"\[\d+\] \[WARNING\] database unavailable: OperationalError", error_log.read_text()),
        timeout=10,
        what="the warning in the error log",
    )


def test_a_logging_configuration_of_the_operators_keeps_chatapis_warnings_where_it_says(
    start_server, tmp_path: Path
) -> None:
    """gunicorn's --log-config-json: a chatapi logger it sets up is not redirected to the error log."""
    own_log = tmp_path / "chatapi.log"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        # gunicorn replaces its defaults top-level key by top-level key, so the root handler is given again.
        "handlers": {
            "own": {"class": "logging.FileHandler", "filename": str(own_log)},
            "console": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
        },
        "root": {"level": "INFO", "handlers": ["console"]},
        "loggers": {"chatapi": {"handlers": ["own"], "level": "WARNING", "propagate": False}},
    }
    (tmp_path / "logging.json").write_text(json.dumps(config))
    server = _warn_of_an_unavailable_database(start_server, ["--log-config-json", str(tmp_path / "logging.json")])
    wait_until(lambda: "database unavailable: OperationalError" in own_log.read_text(), timeout=10, what="the warning")
    assert "database unavailable" not in server.log_path.read_text()


@pytest.mark.postgres
def test_a_dump_taken_while_messages_are_sent_restores_into_an_empty_database_as_the_guide_says(
    postgres, start_server, tmp_path: Path
) -> None:
    """docs/deploy.md, "Backups": `pg_dump --format=custom` while sends commit, then
    `pg_restore --clean --if-exists` into an empty database (exit 0) and chatapi on it.
    The restore holds the acknowledged messages up to some moment of the dump, gapless;
    a client whose cursor is past the restored head is answered at once with the head;
    one at or below it resumes exactly; and the numbers used after the dump are given
    again to new messages, which is why the guide says how to make clients start over."""
    pg_dump, pg_restore = str(postgres.bin / "pg_dump"), str(postgres.bin / "pg_restore")
    source = postgres.new_database()
    env = {"CHATAPI_RATE_LIMITS": "off"}
    server = start_server(source, workers=2, env=env)
    alice, bob = Api(server.base_url).signed_up(), Api(server.base_url).signed_up()
    conversation = alice.start(bob.username)["id"]
    acknowledged: list[dict] = []
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            acknowledged.append(alice.send(conversation, f"m{len(acknowledged)}", client_id=f"m{len(acknowledged)}"))

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_until(lambda: len(acknowledged) >= 20, timeout=30, what="sends before the dump")
        before_dump = len(acknowledged)
        dump = tmp_path / "chatapi.dump"
        subprocess.run([pg_dump, "--format=custom", f"--file={dump}", "--dbname", source], check=True)
        after_dump = len(acknowledged)
        wait_until(lambda: len(acknowledged) >= after_dump + 20, timeout=30, what="sends after the dump")
    finally:
        stop.set()
        sender.join()
    bob_cursor = bob.events(timeout=0, limit=1)["last_pos"]
    server.stop()

    restored = postgres.new_database()
    subprocess.run([pg_restore, "--clean", "--if-exists", "--dbname", restored, str(dump)], check=True)
    server = start_server(restored, workers=2, env=env)
    alice, bob = (Api(server.base_url, api.token, api.username) for api in (alice, bob))
    kept = alice.messages(conversation, after=0, limit=1000)["messages"]
    assert before_dump <= len(kept) <= after_dump
    assert [(m["seq"], m["text"]) for m in kept] == [(m["seq"], m["text"]) for m in acknowledged[: len(kept)]]

    started = time.monotonic()
    page = bob.events(after=bob_cursor, timeout=20)
    assert time.monotonic() - started < 5
    head = page["last_pos"]
    assert page["events"] == [] and head < bob_cursor
    resumed = bob.events(after=head - 3, timeout=0)
    assert [event["pos"] for event in resumed["events"]] == [head - 2, head - 1, head]
    assert [event["message"]["text"] for event in resumed["events"] if event["type"] == "message"][-1:] == [
        kept[-1]["text"]
    ]

    # The next message takes the seq of one acknowledged after the dump, and lost with it.
    again = alice.send(conversation, "after the restore")
    assert again["seq"] == len(kept) + 1 and acknowledged[len(kept)]["text"] != again["text"]
    # The guide's way to make every client start over.
    execute(restored, "DELETE FROM tokens")
    assert bob.get("/api/v1/events", params={"after": 0, "timeout": 0}).status_code == 401
