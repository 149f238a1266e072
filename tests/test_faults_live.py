"""Real faults against real servers on PostgreSQL: kill -9 of every process
during a send burst, a database restart under load, SIGTERM with waiting
long-polls and a send in flight, and a crashed worker. Nothing acknowledged
may be lost or duplicated, and the service must come back by itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import psycogreen.gevent
import psycopg2
import psycopg2.extensions
import pytest
import requests
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from chatapi.config import Settings
from chatapi.db import PING_IF_IDLE_SECS, Database
from tests.support.api import Api
from tests.support.faults import (
    Background,
    SendLog,
    post_numbered,
    retry_unacked,
    send_until_failure,
    stored_messages,
    wait_until,
)
from tests.support.metrics import wait_for_waiting_polls
from tests.support.postgres import PostgresCluster, database_connections, execute, query_value

pytestmark = pytest.mark.postgres

LONG = os.environ.get("CHATAPI_LONG_TESTS") == "1"
# Crash-and-restart rounds of the kill -9 test.
KILL_ROUNDS = 6 if LONG else 1


def _assert_exactly_once_and_gapless(database_url: str, logs: list[SendLog]) -> None:
    """Every client_id a client tried is stored exactly once, with the acknowledged seq, and seqs have no gaps."""
    stored = stored_messages(database_url)
    for log in logs:
        rows = stored.get(log.conversation_id, [])
        assert [seq for seq, _, _ in rows] == list(range(1, len(rows) + 1)), "seqs have a gap or a duplicate"
        mine = [(seq, client_id, text) for seq, client_id, text in rows if client_id.startswith(log.prefix + "-")]
        client_ids = [client_id for _, client_id, _ in mine]
        assert len(client_ids) == len(set(client_ids)), f"{log.prefix}: a client_id is stored twice"
        tried = set(log.acked) | set(log.unacked)
        assert set(client_ids) == tried, f"{log.prefix}: stored {len(client_ids)} messages, tried {len(tried)}"
        by_client_id = {client_id: (seq, text) for seq, client_id, text in mine}
        for client_id, message in log.acked.items():
            assert by_client_id[client_id] == (message["seq"], message["text"]), f"{client_id} changed after its ack"


def _pairs(api: Api, count: int) -> list[tuple[Api, Api, int]]:
    pairs = []
    for _ in range(count):
        alice, bob = api.signed_up(), api.signed_up()
        pairs.append((alice, bob, alice.start(bob.username)["id"]))
    return pairs


def test_kill_9_of_every_process_during_a_send_burst_loses_no_acknowledged_message(
    postgres_url: str, start_server
) -> None:
    server = start_server(postgres_url, workers=2)
    api = Api(server.base_url)
    clients: list[tuple[str, SendLog]] = []
    for n, (alice, bob, conversation_id) in enumerate(_pairs(api, 4)):
        for side, who in (("a", alice), ("b", bob)):
            clients.append((who.token, SendLog(conversation_id, f"c{n}{side}")))
    for _ in range(KILL_ROUNDS):
        acked_so_far = sum(len(log.acked) for _, log in clients)
        stop = threading.Event()
        threads = [
            threading.Thread(target=send_until_failure, args=(Api(server.base_url, token), log, stop), daemon=True)
            for token, log in clients
        ]
        for thread in threads:
            thread.start()
        # Let the burst run until plenty is acknowledged, then pull the plug.
        wait_until(
            lambda n=acked_so_far: sum(len(log.acked) for _, log in clients) >= n + 150,
            timeout=60,
            what="150 acknowledged sends",
        )
        server.kill()
        for thread in threads:
            thread.join(30)
        stop.set()
        assert not any(t.is_alive() for t in threads)
        acked_before_kill = {log.prefix: dict(log.acked) for _, log in clients}
        assert all(log.unacked for _, log in clients), "every client was mid-burst when the server died"
        # Killed processes answer nothing: the clients lost connections, and were never answered an error.
        assert [log.answered_errors() for _, log in clients] == [[]] * len(clients)

        # What the server acknowledged before it died is in the database, untouched.
        stored = stored_messages(postgres_url)
        for _, log in clients:
            rows = {client_id: seq for seq, client_id, _ in stored[log.conversation_id]}
            for client_id, message in acked_before_kill[log.prefix].items():
                assert rows.get(client_id) == message["seq"], f"acknowledged {client_id} lost by kill -9"

        # After a restart the clients retry what was never acknowledged, with the same client_id.
        server = start_server(postgres_url, workers=2)
        for token, log in clients:
            retry_unacked(Api(server.base_url, token), log)
            assert {k: log.acked[k] for k in acked_before_kill[log.prefix]} == acked_before_kill[log.prefix]
            log.unacked.clear()
        _assert_exactly_once_and_gapless(postgres_url, [log for _, log in clients])


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A cluster of this test's own, because the test restarts it."""
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.destroy()


def _listening_connections(cluster: PostgresCluster) -> int:
    return query_value(
        cluster.url(),
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chatapi-listener' "
        "AND (query ILIKE 'LISTEN%' OR query = 'SELECT 1')",
    )


def _json_error_code(response: requests.Response) -> str:
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.text[:300]
    return response.json()["error"]["code"]


def test_postgres_restart_under_load_503s_cleanly_and_recovers_by_itself(own_postgres, start_server) -> None:
    url = own_postgres.new_database()
    # Bob holds ten long-polls below: with the default cap of 8 per user and process, a ninth
    # on one worker would (rightly) answer the oldest early, which is not what this test is about.
    server = start_server(url, workers=2, env={"CHATAPI_MAX_WAITERS_PER_USER": "16"})
    api = Api(server.base_url)
    (alice, bob, conversation), (carol, dave, load_conversation) = _pairs(api, 2)
    head = bob.events()["last_pos"]

    # Background load between two other users, recording every answer.
    answers: list[tuple[int, str]] = []
    load_log = SendLog(load_conversation, "load")
    stop = threading.Event()

    def load() -> None:
        client = Api(server.base_url, carol.token)
        for number in range(100_000):
            if stop.is_set():
                return
            client_id = f"load-{number}"
            try:
                response = post_numbered(client, load_conversation, client_id, timeout=15)
            except requests.RequestException:
                load_log.unacked.append(client_id)
                time.sleep(0.05)
                continue
            answers.append((response.status_code, response.headers.get("Content-Type", "")))
            if response.status_code in (200, 201):
                load_log.acked[client_id] = response.json()
            else:
                assert response.status_code == 503 and _json_error_code(response) == "service_unavailable"
                load_log.unacked.append(client_id)
                time.sleep(0.05)

    loader = Background(load)

    # Long-polls of bob's that wait through the whole outage (several, to land on both workers).
    def waiting_poll(kind: str) -> tuple[dict, float]:
        client = Api(server.base_url, bob.token)
        if kind == "events":
            body = client.events(after=head, timeout=50)
        else:
            body = client.messages(conversation, after=0, timeout=50)
        return body, time.monotonic()

    waiting = [Background(lambda k=kind: waiting_poll(k)) for kind in ("events", "messages") * 3]
    wait_until(lambda: len(answers) >= 20, timeout=30, what="load before the outage")

    own_postgres.stop("fast")
    try:
        # (A Response is falsy when its status is an error: hand back a tuple.)
        (readyz,) = wait_until(
            lambda: (r := requests.get(server.base_url + "/readyz", timeout=10)).status_code == 503 and (r,),
            timeout=15,
            what="/readyz 503",
        )
        assert _json_error_code(readyz) == "service_unavailable"
        assert requests.get(server.base_url + "/healthz", timeout=10).status_code == 200
        me = bob.get("/api/v1/me", timeout=15)
        assert me.status_code == 503 and _json_error_code(me) == "service_unavailable"
        assert me.headers.get("Retry-After")
        send = alice.post(f"/api/v1/conversations/{conversation}/messages", {"text": "during"}, timeout=15)
        assert send.status_code == 503 and _json_error_code(send) == "service_unavailable"
        time.sleep(1)
        assert not any(w.done for w in waiting), "a waiting long-poll gave up during the outage"
    finally:
        own_postgres.pg_ctl("start")
    restarted_at = time.monotonic()

    wait_until(
        lambda: requests.get(server.base_url + "/readyz", timeout=10).status_code == 200,
        timeout=15,
        what="/readyz 200 after the restart",
    )
    assert time.monotonic() - restarted_at < 10
    wait_until(lambda: _listening_connections(own_postgres) >= 2, timeout=20, what="both workers LISTENing again")

    # Long-polls started after recovery, and those that waited through it, get what is sent now.
    fresh = [Background(lambda k=kind: waiting_poll(k)) for kind in ("events", "messages") * 2]
    time.sleep(0.5)
    sent = alice.send(conversation, "after recovery")
    sent_at = time.monotonic()
    for poll in waiting + fresh:
        body, returned_at = poll.join(30)
        items = body["events"] if "events" in body else body["messages"]
        texts = [i["message"]["text"] if "message" in i else i.get("text") for i in items]
        assert "after recovery" in texts, body
        assert returned_at - sent_at < 5, f"woken {returned_at - sent_at:.2f} s after the send"
    assert sent["seq"] == 1

    stop.set()
    loader.join(30)
    assert all(status in (200, 201, 503) for status, _ in answers), sorted({s for s, _ in answers})
    assert all(ctype.startswith("application/json") for _, ctype in answers)
    assert any(status == 201 for status, _ in answers[-5:]), "the load did not recover"
    # The load's unacknowledged sends are retried; everything is stored once, gapless.
    retry_unacked(Api(server.base_url, carol.token), load_log)
    _assert_exactly_once_and_gapless(url, [load_log])


def _send_slowly(port: int, path: str, token: str, body: bytes) -> socket.socket:
    """Open a connection and send a request with only half of its body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def _finish(sock: socket.socket, body: bytes) -> tuple[int, dict]:
    sock.sendall(body[len(body) // 2 :])
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_sigterm_answers_waiting_long_polls_at_once_and_finishes_sends_in_flight(
    postgres_url: str, start_server
) -> None:
    server = start_server(postgres_url, workers=2)
    api = Api(server.base_url)
    ((alice, bob, conversation),) = _pairs(api, 1)
    head = bob.events()["last_pos"]
    polls = [
        Background(lambda: (Api(server.base_url, bob.token).events(after=head, timeout=50), time.monotonic()))
        for _ in range(4)
    ]
    wait_for_waiting_polls(server.base_url, 4)
    body = json.dumps({"text": "in flight at SIGTERM", "client_id": "inflight-1"}).encode()
    in_flight = _send_slowly(server.port, f"/api/v1/conversations/{conversation}/messages", alice.token, body)
    time.sleep(0.5)

    signalled_at = time.monotonic()
    server.signal(signal.SIGTERM)
    for poll in polls:
        page, returned_at = poll.join(10)
        assert page["events"] == [] and page["last_pos"] == head
        assert returned_at - signalled_at < 2, f"long-poll answered {returned_at - signalled_at:.2f} s after SIGTERM"

    time.sleep(0.5)
    status, message = _finish(in_flight, body)
    assert status == 201 and message["seq"] == 1 and message["text"] == "in flight at SIGTERM"
    # Within gunicorn's graceful timeout (20 s), and cleanly.
    assert server.process.wait(25) == 0
    assert [(seq, cid) for seq, cid, _ in stored_messages(postgres_url)[conversation]] == [(1, "inflight-1")]


def test_a_killed_worker_is_replaced_and_clients_carry_on(postgres_url: str, start_server) -> None:
    server = start_server(postgres_url, workers=2)
    api = Api(server.base_url)
    ((alice, bob, conversation),) = _pairs(api, 1)
    logs = [SendLog(conversation, "alice"), SendLog(conversation, "bob")]
    stop = threading.Event()

    def keep_sending(who: Api, log: SendLog) -> None:
        client = Api(server.base_url, who.token)
        for _ in range(1000):
            if stop.is_set():
                return
            send_until_failure(client, log, stop)
            if log.unacked:
                # A retry with the same client_id, as a real client would do.
                retry_unacked(client, log)
                log.unacked.clear()

    def read_everything() -> list[dict]:
        client = Api(server.base_url, bob.token)
        seen: list[dict] = []
        pos = 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                page = client.events(after=pos, timeout=2)
            except requests.RequestException:  # its worker was killed; any other answer than 200 fails
                time.sleep(0.1)
                continue
            seen.extend(e["message"] for e in page["events"] if e["type"] == "message")
            pos = page["events"][-1]["pos"] if page["events"] else pos
            if stop.is_set() and not page["events"] and len(seen) >= sum(len(log.acked) for log in logs):
                return seen
        raise AssertionError("the reader never caught up")

    senders = [Background(lambda w=w, log=log: keep_sending(w, log)) for w, log in zip((alice, bob), logs, strict=True)]
    reader = Background(read_everything)
    wait_until(lambda: sum(len(log.acked) for log in logs) >= 30, timeout=30, what="traffic before the crash")

    before = set(server.worker_pids())
    # The worker that serves most of the clients' connections, so that the crash is theirs to survive.
    connections = server.client_connections()
    victim = max(connections, key=connections.get)
    assert connections[victim] >= 1, connections
    os.kill(victim, signal.SIGKILL)
    replaced = wait_until(
        lambda: (pids := set(server.worker_pids())) and len(pids) == 2 and victim not in pids and pids,
        timeout=30,
        what="a replacement worker",
    )
    assert len(replaced - before) == 1
    acked_at_replacement = sum(len(log.acked) for log in logs)
    wait_until(
        lambda: sum(len(log.acked) for log in logs) >= acked_at_replacement + 30,
        timeout=30,
        what="traffic after the crash",
    )
    stop.set()
    for sender in senders:
        sender.join(60)
    seen = reader.join(90)
    # The surviving worker answered every request it got: only the victim's connections failed.
    assert [log.answered_errors() for log in logs] == [[], []]
    _assert_exactly_once_and_gapless(postgres_url, logs)
    total = sum(len(log.acked) for log in logs)
    assert [m["seq"] for m in seen] == list(range(1, total + 1)), "the reader missed or repeated a message"


@pytest.mark.parametrize("unit_of_work", ["reading", "writing"])
def test_a_connection_returned_while_the_database_is_down_keeps_its_pool_slot(own_postgres, unit_of_work) -> None:
    """With one pooled connection, a slot lost at the outage would leave every later request waiting."""
    settings = Settings.from_env(
        {
            "CHATAPI_DATABASE_URL": own_postgres.new_database(),
            "CHATAPI_DB_POOL_SIZE": "1",
            "CHATAPI_DB_MAX_OVERFLOW": "0",
            "CHATAPI_DB_WRITE_POOL_SIZE": "1",
        }
    )
    # As in a gunicorn worker (gunicorn.conf.py): psycopg2 waits through gevent.
    psycogreen.gevent.patch_psycopg()
    db = Database(settings)
    engine = db.autocommit_engine if unit_of_work == "reading" else db.engine
    try:
        # The database goes away after the work and before the connection is returned.
        with contextlib.suppress(DBAPIError), getattr(db, unit_of_work)() as connection:
            connection.execute(text("SELECT 1"))
            own_postgres.stop("fast")
        own_postgres.pg_ctl("start")
        assert engine.pool.checkedout() == 0
        # Idle this long, the dead pooled connection is pinged and replaced at checkout.
        time.sleep(PING_IF_IDLE_SECS + 0.1)
        with getattr(db, unit_of_work)() as connection:
            assert connection.scalar(text("SELECT 1")) == 1
    finally:
        db.dispose()
        psycopg2.extensions.set_wait_callback(None)


@pytest.fixture
def postgres_of_100() -> Iterator[str]:
    """A cluster with PostgreSQL's default max_connections (100, 3 of them reserved
    for superusers), and a database of a role that is no superuser, as in production: its URL."""
    cluster = PostgresCluster(max_connections=100)
    cluster.start()
    try:
        execute(cluster.url(), "CREATE ROLE chatapi LOGIN")
        execute(cluster.url(), "CREATE ROLE monitor LOGIN")
        execute(cluster.url(), "CREATE DATABASE chatapi OWNER chatapi")
        yield cluster.url("chatapi").replace("postgres@", "chatapi@")
    finally:
        cluster.destroy()


def test_a_reload_with_the_default_pools_on_100_connections_fails_no_request(
    postgres_of_100: str, start_server, tmp_path
) -> None:
    """The defaults (2 workers x 47 connections) fit max_connections=100, but a
    reload runs 2 new workers beside the old 2 until those are gone: the new
    ones must wait for the slots the old ones hand back, not answer 503."""
    url = postgres_of_100
    server = start_server(url, workers=None)  # the shipped default: 2 workers
    in_use = "usename = 'chatapi'"
    # Each worker opens its autocommit pool and its 2 wake-up connections at start (the write pool as needed).
    wait_until(lambda: database_connections(url, in_use) >= 74, timeout=20, what="both workers' pools warm")
    api = Api(server.base_url)
    pairs = _pairs(api, 3)
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def record(call) -> None:
        try:
            response = call()
        except requests.RequestException as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)
            return
        answered[0] += 1
        if not 200 <= response.status_code < 300:
            failures.append(f"{response.status_code} {response.text[:200]}")
            time.sleep(0.05)

    def sender(client: Api, conversation: int) -> None:
        while not stop.is_set():
            record(lambda: client.post(f"/api/v1/conversations/{conversation}/messages", {"text": "hi"}, timeout=30))
            time.sleep(0.02)

    def poller(client: Api) -> None:
        after = 0
        while not stop.is_set():

            def poll() -> requests.Response:
                nonlocal after
                response = client.get("/api/v1/events", params={"after": after, "timeout": 2}, timeout=30)
                if response.status_code == 200:
                    after = response.json()["last_pos"]
                return response

            record(poll)

    threads = []
    for alice, bob, conversation in pairs:
        threads += [Background(lambda a=alice, c=conversation: sender(a, c)), Background(lambda b=bob: poller(b))]
    time.sleep(2)
    # Other clients (monitoring, a psql) take every slot but one, which the
    # reload's migration needs: whatever the pools held at rest, the new
    # workers then find no free slot until the old ones hand theirs back.
    others = []
    try:
        while True:
            others.append(psycopg2.connect(url.replace("chatapi@", "monitor@")))
    except psycopg2.OperationalError as exc:
        assert "remaining connection slots are reserved" in str(exc), exc
    others.pop().close()
    try:
        old = set(server.worker_pids())
        server.signal(signal.SIGHUP)
        wait_until(lambda: not set(server.worker_pids()) & old, timeout=30, what="the old workers gone")
        time.sleep(3)
        stop.set()
        for thread in threads:
            thread.join(40)
    finally:
        for other in others:
            other.close()
    log = (tmp_path / "server-0.log").read_text()
    print(
        f"answered {answered[0]}, failed {len(failures)}: {failures[:5]}; monitor connections {len(others)};"
        f" warm-up warnings {log.count('could not open the pool')},"
        f" 'database unavailable' {log.count('database unavailable')}"
    )
    assert answered[0] > 50
    # No request is answered with an error: not 503 for want of a connection
    # slot, nor 500 from a request cut off by its old worker's graceful stop
    # (ChatapiWorker._close_if_still_idle). A connection the old worker closes
    # as the client sends its next request on it is HTTP/1.1's keep-alive race,
    # which clients retry (nginx in front does), and is not counted here.
    assert [failure for failure in failures if failure[:1].isdigit()] == [], log[-5000:]
    assert "database unavailable" not in log
    assert "Traceback" not in log, log[-5000:]


def test_a_connection_refused_for_want_of_a_slot_waits_for_one_within_the_pool_timeout(
    postgres_of_100: str, monkeypatch
) -> None:
    """A new connection refused only because every slot is taken (53300) is tried again until the
    pool's timeout; a server that does not answer is reported at once, as before."""
    import chatapi.db

    monkeypatch.setattr(chatapi.db, "POOL_TIMEOUT_SECS", 1.5)
    db = Database(Settings.from_env({"CHATAPI_DATABASE_URL": postgres_of_100}))
    others = []
    try:
        while True:
            others.append(psycopg2.connect(postgres_of_100))
    except psycopg2.OperationalError as exc:
        assert chatapi.db.out_of_connection_slots(exc), exc
    try:
        started = time.monotonic()
        with pytest.raises(DBAPIError, match="remaining connection slots are reserved"):
            db.autocommit_engine.connect()
        assert 1.0 < time.monotonic() - started < 2.5  # it waited, and no longer than the timeout
        threading.Timer(0.5, others.pop().close).start()  # a slot comes free meanwhile
        with db.autocommit_engine.connect() as connection:
            assert connection.scalar(text("SELECT 1")) == 1
    finally:
        for other in others:
            other.close()
        db.dispose()
    down = Database(Settings.from_env({"CHATAPI_DATABASE_URL": "postgresql://chatapi@127.0.0.1:1/chatapi"}))
    started = time.monotonic()
    with pytest.raises(DBAPIError) as refused:
        down.autocommit_engine.connect()
    assert time.monotonic() - started < 0.5 and not chatapi.db.out_of_connection_slots(refused.value)
