"""Two chatapi instances (each its own gunicorn with 2 gevent workers) on one
PostgreSQL database, behind the shipped nginx site: wake-ups cross instances,
and the whole contract works through the proxy."""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import time
from collections.abc import Iterator

import psycopg2
import pytest
import requests

from chatapi.notify_pg import CHANNEL
from tests.conftest import migrate
from tests.support.api import Api
from tests.support.faults import Background, wait_until
from tests.support.metrics import metric, scrape, wait_for_waiting_polls
from tests.support.nginx import NginxProcess
from tests.support.postgres import database_connections, query_value
from tests.support.server import ServerProcess

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def instances(postgres, tmp_path_factory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Shared by this module's tests (starting them is the slow part); the last test stops them."""
    url = postgres.new_database()
    logs = tmp_path_factory.mktemp("instances")
    env = {"CHATAPI_TRUSTED_PROXIES": "1"}
    servers = [ServerProcess(url, workers=2, env=env, log_path=logs / f"instance-{n}.log") for n in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def proxy(instances: tuple[ServerProcess, ServerProcess]) -> Iterator[NginxProcess]:
    nginx = NginxProcess([server.port for server in instances]).start()
    yield nginx
    nginx.stop()


def _wait_and_send(waiter: Api, sender: Api, conversation: int, text: str, kind: str) -> float:
    """Start a long-poll on `waiter`'s server, send through `sender`'s; return the wake-up delay."""
    if kind == "events":
        head = waiter.events()["last_pos"]
        poll = Background(lambda: (waiter.events(after=head, timeout=30), time.monotonic()))
    else:
        head = waiter.messages(conversation)["last_seq"]
        poll = Background(lambda: (waiter.messages(conversation, after=head, timeout=30), time.monotonic()))
    time.sleep(0.5)
    assert not poll.done, "the long-poll answered before anything was sent"
    sender.send(conversation, text)
    sent_at = time.monotonic()
    body, returned_at = poll.join(30)
    items = body.get("events") or body.get("messages")
    assert text in json.dumps(items), body
    return returned_at - sent_at


def _assert_wakeups_cross_instances(a: ServerProcess, b: ServerProcess) -> None:
    alice_a = Api(a.base_url).signed_up()
    bob_a = Api(a.base_url).signed_up()
    conversation = alice_a.start(bob_a.username)["id"]
    alice_b = Api(b.base_url, alice_a.token, alice_a.username)
    # Both directions, both kinds of long-poll, a few times (each instance has 2 workers).
    for round_ in range(3):
        for waiter, sender, kind in ((alice_b, bob_a, "events"), (bob_a, alice_b, "messages")):
            delay = _wait_and_send(waiter, sender, conversation, f"cross {round_} {kind}", kind)
            # The benchmark measures "within milliseconds"; this rules out the timeout or a polling fallback.
            assert delay < 2.5, f"woken {delay:.3f} s after the send on the other instance"


def test_a_send_on_one_instance_wakes_a_long_poll_on_the_other(instances) -> None:
    _assert_wakeups_cross_instances(*instances)


def test_instances_reach_the_database_through_its_unix_socket(postgres, start_server) -> None:
    """On the database's host its Unix socket may be named instead of 127.0.0.1 (docs/deploy.md):
    the app, the migrations and the wake-up connections all take a URL that names it."""
    database = postgres.new_database().rsplit("/", 1)[1]
    url = f"postgresql://postgres@/{database}?host={postgres.root}&port={postgres.port}"
    a, b = start_server(url, workers=1), start_server(url, workers=1)
    _assert_wakeups_cross_instances(a, b)
    assert database_connections(url, "application_name = 'chatapi-listener'") == 2
    assert database_connections(url) >= 4
    assert database_connections(url, "client_addr IS NOT NULL") == 0, "a connection went over TCP"


def test_instances_started_before_the_migrations_push_wake_up_events_once_migrated(postgres, start_server) -> None:
    """With CHATAPI_MIGRATE=off the schema, and the wake-ups' key with it, can come after the
    workers: they look for the key again, and then push events across instances."""
    url = postgres.new_database()
    env = {"CHATAPI_MIGRATE": "off"}
    a, b = (start_server(url, workers=1, env=env, ready_path="/healthz") for _ in range(2))
    # Both instances have looked for the key, and found no table.
    wake_up_connections = "application_name IN ('chatapi-listener', 'chatapi-publisher')"
    wait_until(lambda: database_connections(url, wake_up_connections) == 4, 10, what="the wake-up connections")
    migrate(url)
    _assert_wakeups_cross_instances(a, b)
    # The event polls waited on b: each answered from the events its wake-up carried.
    woken = scrape(b.base_url)
    assert metric(woken, "chatapi_woken_polls_total", answer="pushed") == 3, woken
    assert metric(woken, "chatapi_woken_polls_total", answer="query") == 0, woken
    assert "no valid signature" not in b.log_path.read_text()


def test_foreign_notifications_on_the_channel_leave_the_listeners_working(instances) -> None:
    """Anyone who can connect to the database can NOTIFY on the wake-up channel.
    A payload that is not ours wakes every waiter once; no listener dies of it."""
    a, b = instances
    listeners = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chatapi-listener'"
    deadline = time.monotonic() + 10
    while query_value(a.database_url, listeners) < a.workers + b.workers:
        assert time.monotonic() < deadline, "not every worker is listening"
        time.sleep(0.1)
    backends = (
        "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity"
        " WHERE application_name = 'chatapi-listener'"
    )
    listening = query_value(a.database_url, backends)
    for payload in ("not ours", "x|u:x", 'x|u:1,{"1": 5}', 'x|u:1,{"1": [{"pos": "5"}]}'):
        query_value(a.database_url, f"SELECT pg_notify('{CHANNEL}', '{payload}')::text")
    time.sleep(0.5)
    _assert_wakeups_cross_instances(a, b)
    # The same listening connections: none failed and was replaced (which would also wake everyone).
    assert query_value(a.database_url, backends) == listening


def test_a_role_listening_on_the_channel_cannot_read_the_messages(instances) -> None:
    """Any role that can connect to the database can LISTEN on the wake-up channel.
    The events pushed on it are sealed (notify_pg.py): it hears which users are
    woken, not what was said, nor by whom."""
    a, b = instances
    alice = Api(a.base_url).signed_up()
    bob = Api(a.base_url).signed_up()
    conversation = alice.start(bob.username)["id"]
    eavesdropper = psycopg2.connect(a.database_url)
    eavesdropper.autocommit = True
    try:
        with eavesdropper.cursor() as cur:
            cur.execute(f"LISTEN {CHANNEL}")
        text = f"the vault code is {os.urandom(4).hex()}"
        # Bob waits on the other instance: the message reaches him through the channel.
        _wait_and_send(Api(b.base_url, bob.token, bob.username), alice, conversation, text, "events")
        heard: list[str] = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            select.select([eavesdropper], [], [], 0.2)
            eavesdropper.poll()
            heard += [notification.payload for notification in eavesdropper.notifies]
            eavesdropper.notifies.clear()
    finally:
        eavesdropper.close()
    assert any(",~" in payload for payload in heard), f"no pushed events heard: {heard}"
    assert not [payload for payload in heard if text in payload or alice.username in payload or bob.username in payload]


def test_events_forged_on_the_channel_never_reach_a_client(instances) -> None:
    """A well-formed notification from another database role, pushing a message
    bob never got, in the clear or sealed without our key: his poll is woken,
    re-queries, and answers only what the database holds (notify_pg.py)."""
    a, _ = instances
    alice = Api(a.base_url).signed_up()
    bob = Api(a.base_url).signed_up()
    conversation = alice.start(bob.username)["id"]
    bob_id, head = bob.get("/api/v1/me").json()["id"], bob.events()["last_pos"]
    forged = {
        "pos": head + 1,
        "type": "message",
        "message": {
            "id": 1,
            "conversation_id": conversation,
            "seq": 1,
            "sender": alice.username,
            "text": "forged",
            "client_id": None,
            "created_at": "2026-11-25T00:00:00.000000Z",
        },
    }
    events = json.dumps({str(bob_id): [forged]})
    sealed = "~" + base64.urlsafe_b64encode(os.urandom(12) + events.encode() + os.urandom(16)).decode()
    for signature in ("", ".0123456789abcdef0123456789abcdef"):
        for pushed in (events, sealed):
            poll = Background(lambda: bob.events(after=head, timeout=3))
            wait_for_waiting_polls(a.base_url, 1)
            payload = f"forger{signature}|u:{bob_id},{pushed}"
            query_value(a.database_url, f"SELECT pg_notify('{CHANNEL}', '{payload}')::text")
            assert poll.join(10) == {"events": [], "last_pos": head}


def test_the_contract_works_through_nginx(proxy: NginxProcess, instances) -> None:
    api = Api(proxy.base_url)
    alice, bob = api.signed_up(), api.signed_up()
    assert alice.get("/api/v1/me").json() == {"id": alice.get("/api/v1/me").json()["id"], "username": alice.username}
    created = alice.post("/api/v1/conversations", {"peer": bob.username})
    assert created.status_code == 201
    conversation = created.json()["id"]
    assert bob.post("/api/v1/conversations", {"peer": alice.username}).status_code == 200

    # Long-polls through the proxy wake at once (requests land on either instance).
    for n in range(4):
        assert _wait_and_send(bob, alice, conversation, f"via nginx {n}", "events") < 2.5
        assert _wait_and_send(alice, bob, conversation, f"reply {n}", "messages") < 2.5

    history = bob.get(f"/api/v1/conversations/{conversation}/messages", params={"limit": 100})
    assert history.status_code == 200 and history.headers["Cache-Control"] == "no-store"
    assert [m["seq"] for m in history.json()["messages"]] == list(range(1, 9))
    read = bob.post(f"/api/v1/conversations/{conversation}/read", {"seq": 8})
    assert read.status_code == 200 and read.json()["unread"] == 0
    replay = alice.post(f"/api/v1/conversations/{conversation}/messages", {"text": "once", "client_id": "k1"})
    again = alice.post(f"/api/v1/conversations/{conversation}/messages", {"text": "once", "client_id": "k1"})
    assert (replay.status_code, again.status_code) == (201, 200) and again.json() == replay.json()

    # Body size: 65,536 bytes reach the app (400: text too long), 65,537 get a JSON 413.
    path = f"/api/v1/conversations/{conversation}/messages"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {alice.token}"}
    filler = '{"text": "' + "x" * (65_536 - 12) + '"}'
    assert len(filler.encode()) == 65_536
    at_limit = requests.post(proxy.base_url + path, data=filler, headers=headers, timeout=30)
    assert at_limit.status_code == 400 and at_limit.json()["error"]["code"] == "invalid_text"
    over = '{"text": "' + "x" * (65_537 - 12) + '"}'
    too_large = requests.post(proxy.base_url + path, data=over, headers=headers, timeout=30)
    assert too_large.status_code == 413
    assert too_large.headers["Content-Type"].startswith("application/json")
    assert too_large.json()["error"]["code"] == "payload_too_large"

    # Errors stay the app's JSON.
    missing = api.get("/api/v1/no-such-thing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    stranger = api.get(f"/api/v1/conversations/{conversation}", headers={"Authorization": "Bearer nope"})
    assert stranger.status_code == 401 and stranger.headers["WWW-Authenticate"] == "Bearer"

    # Metrics are for the monitoring system, which asks the instances; the proxy says neither what nor which.
    hidden = api.get("/metrics")
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
    assert hidden.headers["Cache-Control"] == "no-store"  # as every error, and /metrics (docs/api.md)
    assert "nginx/" not in hidden.headers.get("Server", "")
    assert requests.get(instances[0].base_url + "/metrics", timeout=10).status_code == 200
    assert api.get("/api/v1/openapi.json").json()["openapi"].startswith("3.")
    assert api.get("/healthz").status_code == 200
    page = api.get("/")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]

    # Sign-out through the proxy reaches every instance at once.
    assert alice.request("DELETE", "/api/v1/tokens/current").status_code == 204
    for _ in range(4):
        assert alice.get("/api/v1/me").status_code == 401


def test_requests_nginx_refuses_itself_get_the_contracts_json(proxy: NginxProcess) -> None:
    """Never an HTML error page, through the shipped proxy too: nginx answered the
    requests it refuses before any instance sees them with its own HTML pages."""
    for request_bytes, status, code in (
        (b"HELLO\r\n\r\n", 400, "invalid_request"),
        (b"GET /api/v1/me HTTP/1.1\r\n\r\n", 400, "invalid_request"),  # no Host
        (b"GET /api/v1/me HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n", 400, "invalid_request"),
        (b"GET /api/v1/me HTTP/1.1\r\nHost: t\r\nCookie: " + b"a" * 10_000 + b"\r\n\r\n", 400, "invalid_request"),
        (b"GET /api/v1/%zz HTTP/1.1\r\nHost: t\r\n\r\n", 400, "invalid_request"),
        (b"GET /api/v1/me HTTP/2.0\r\nHost: t\r\n\r\n", 400, "invalid_request"),
        (b"POST /api/v1/users HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "invalid_request"),
        (
            b"POST /api/v1/users HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
            400,
            "invalid_request",
        ),
        (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "invalid_request"),
        (b"TRACE /api/v1/me HTTP/1.1\r\nHost: t\r\n\r\n", 405, "method_not_allowed"),
        (b"GET /.chatapi-errors/invalid_request HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 404, "not_found"),
    ):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(request_bytes)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), (request_bytes[:60], answer[:300])
        assert b"Content-Type: application/json" in head and b"Cache-Control: no-store" in head, head
        assert json.loads(body)["error"]["code"] == code, (request_bytes[:60], body)


def test_nginx_skips_a_stopped_instance_and_answers_json_when_none_is_left(proxy: NginxProcess, instances) -> None:
    # Last in this module: it stops the shared instances.
    a, b = instances
    api = Api(proxy.base_url)
    alice, bob = api.signed_up(), api.signed_up()
    conversation = alice.start(bob.username)["id"]
    a.stop()
    for n in range(8):
        assert alice.send(conversation, f"still here {n}")["seq"] == n + 1
        assert bob.get("/api/v1/me").status_code == 200
    b.stop()
    down = api.get("/api/v1/me")
    assert down.status_code == 503 and down.json()["error"]["code"] == "service_unavailable"
    assert down.headers.get("Retry-After") == "1"
