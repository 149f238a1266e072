"""Operational behaviour of a real server: metrics across workers, readiness,
registration switch, shutdown of waiting long-polls."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests

from tests.support.api import Api
from tests.support.metrics import metric


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
            route="/api/v1/conversations/<id:conversation_id>/messages",
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
    deadline = time.monotonic() + 10
    while metric(requests.get(server.base_url + "/metrics").text, "chatapi_longpolls_waiting") < 1:
        assert time.monotonic() < deadline, "the waiting long-poll never showed in the gauge"
        time.sleep(0.05)
    alice.send(conversation_id, "wake")
    waiter.join(10)
    text = requests.get(server.base_url + "/metrics").text
    assert metric(text, "chatapi_longpolls_waiting") == 0
    assert metric(text, "chatapi_wakeups_total") >= 1


def test_registration_can_be_switched_off(start_server, tmp_path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'r.sqlite3'}", env={"CHATAPI_REGISTRATION": "off"})
    response = requests.post(server.base_url + "/api/v1/users", json={"username": "alice", "password": "password1"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "registration_closed"


def test_sigterm_answers_waiting_long_polls_at_once(start_server, tmp_path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 's.sqlite3'}")
    alice = Api(server.base_url).signed_up()
    head = alice.events()["last_pos"]
    answers: list[tuple[int, float]] = []

    def wait() -> None:
        response = Api(server.base_url, alice.token).get("/api/v1/events", params={"after": head, "timeout": 60})
        answers.append((response.status_code, time.monotonic()))

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for w in waiters:
        w.start()
    time.sleep(1)
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    for w in waiters:
        w.join(10)
    assert [status for status, _ in answers] == [200, 200, 200]
    assert max(at for _, at in answers) - signalled < 2.0
    assert server.process.wait(15) == 0


def test_sqlite_runs_exactly_one_worker(start_server, tmp_path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'one.sqlite3'}", workers=3)
    time.sleep(1)
    assert len(server.worker_pids()) == 1
