"""The API contract through Flask's test client: shapes, status codes, error
codes and the chat rules, one behaviour per test."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta

import gevent
import pytest
from flask import Flask
from sqlalchemy import event, select

from chatapi import chat as chat_module
from chatapi.models import Token, User
from chatapi.wire import PAGE_MAX_BYTES

API = "/api/v1"


def error_code(response) -> str:
    assert response.is_json, response.data
    assert set(response.json) == {"error"} and set(response.json["error"]) == {"code", "message"}
    return response.json["error"]["code"]


@pytest.fixture
def app(app_on_each_database: Flask) -> Flask:
    """Every contract test runs on both databases."""
    return app_on_each_database


@pytest.fixture
def pair(client, accounts):
    """alice and bob with a conversation: (alice headers, bob headers, conversation id)."""
    alice = accounts.sign_up("alice")
    bob = accounts.sign_up("bob")
    conversation = client.post(f"{API}/conversations", json={"peer": "bob"}, headers=alice).json
    return alice, bob, conversation["id"]


def send(client, headers, conversation_id, text="hi", **extra):
    return client.post(f"{API}/conversations/{conversation_id}/messages", json={"text": text, **extra}, headers=headers)


def events(client, headers, after=0, **params):
    response = client.get(f"{API}/events", query_string={"after": after, "timeout": 0, **params}, headers=headers)
    assert response.status_code == 200, response.json
    return response.json


def receipts(client, headers, user: str) -> list[tuple[int, int]]:
    """(delivered_seq, read_seq) of each of `user`'s receipts in the stream of the caller of `headers`."""
    return [(e["delivered_seq"], e["read_seq"]) for e in events(client, headers)["events"] if e.get("user") == user]


def token_of(headers) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def waiting(app: Flask, count: int) -> None:
    """Until `count` long-polls of the app wait (each in a greenlet of its own)."""
    wakeups = app.extensions["chatapi"].wakeups
    deadline = time.monotonic() + 10
    while wakeups.waiting < count:
        assert time.monotonic() < deadline, f"{wakeups.waiting} of {count} long-polls waiting"
        gevent.sleep(0.01)


# Accounts and tokens -----------------------------------------------------------


def test_register_lower_cases_and_hides_the_password(client) -> None:
    response = client.post(f"{API}/users", json={"username": "Alice", "password": "password123"})
    assert response.status_code == 201
    assert response.json == {"id": response.json["id"], "username": "alice"}


def test_username_taken_is_case_insensitive(client, accounts) -> None:
    accounts.sign_up("alice")
    response = client.post(f"{API}/users", json={"username": "ALICE", "password": "password123"})
    assert response.status_code == 409 and error_code(response) == "username_taken"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"username": "a", "password": "password123"}, "invalid_username"),
        ({"username": "alice", "password": "short"}, "invalid_password"),
        ({"username": 5, "password": "password123"}, "invalid_request"),
        ({"username": "alice", "password": ["x"]}, "invalid_request"),
        ({"password": "password123"}, "invalid_request"),
        ({"username": "alice"}, "invalid_request"),
        ([], "invalid_request"),
        ("alice", "invalid_request"),
    ],
)
def test_register_bad_input(client, body, code) -> None:
    response = client.post(f"{API}/users", json=body)
    assert response.status_code == 400 and error_code(response) == code


def test_sign_in_is_case_insensitive_and_token_works(client, accounts) -> None:
    accounts.sign_up("alice")
    response = client.post(f"{API}/tokens", json={"username": "AlIcE", "password": "password123"})
    assert response.status_code == 201
    assert response.json["user"]["username"] == "alice"
    assert len(response.json["token"]) >= 43  # 32 bytes, base64url
    me = client.get(f"{API}/me", headers={"Authorization": f"Bearer {response.json['token']}"})
    assert me.status_code == 200 and me.json == response.json["user"]
    assert me.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    "body",
    [
        {"username": "alice", "password": "wrong-password"},
        {"username": "nobody", "password": "password123"},
        {"username": "not a name!", "password": "password123"},
        # A lone surrogate cannot be hashed (argon2 takes UTF-8): still just wrong.
        {"username": "alice", "password": "password\ud800123"},
        {"username": "nobody", "password": "password\ud800123"},
    ],
)
def test_wrong_credentials(client, accounts, body) -> None:
    accounts.sign_up("alice")
    response = client.post(f"{API}/tokens", json=body)
    assert response.status_code == 401 and error_code(response) == "invalid_credentials"


def test_an_unknown_username_costs_the_password_check_a_wrong_password_does(client, accounts, monkeypatch) -> None:
    """Sign-in answers an unknown username after the same argon2 work as a wrong password,
    so how long it takes does not tell who has an account."""
    from chatapi import auth

    accounts.sign_up("alice")
    checked = []
    verify = auth._verify
    monkeypatch.setattr(auth, "_verify", lambda hashed, password: checked.append(hashed) or verify(hashed, password))
    for username in ("alice", "nobody"):
        response = client.post(f"{API}/tokens", json={"username": username, "password": "wrong-password"})
        assert response.status_code == 401 and error_code(response) == "invalid_credentials"
    assert len(checked) == 2 and all(hashed.startswith("$argon2id$") for hashed in checked)


def test_revoked_token_stops_working_at_once(client, accounts) -> None:
    alice = accounts.sign_up("alice")
    revoked = client.delete(f"{API}/tokens/current", headers=alice)
    assert revoked.status_code == 204 and revoked.data == b"" and "Content-Type" not in revoked.headers
    response = client.get(f"{API}/me", headers=alice)
    assert response.status_code == 401 and error_code(response) == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nonsense", "Basic YWxpY2U6cGFzc3dvcmQ=", "bearer  "])
def test_bad_credentials_get_401_with_challenge(client, header) -> None:
    headers = {"Authorization": header} if header else {}
    response = client.get(f"{API}/me", headers=headers)
    assert response.status_code == 401 and error_code(response) == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_tokens_are_stored_only_hashed(app, client, accounts) -> None:
    token = accounts.sign_up("alice")["Authorization"].split()[1]
    with app.extensions["chatapi"].db.reading() as connection:
        stored = list(connection.scalars(select(Token.token_hash)))
        password_hash = connection.scalar(select(User.password_hash))
    assert token not in stored and len(stored) == 1 and len(stored[0]) == 64
    assert password_hash.startswith("$argon2id$") and "password123" not in password_hash


# Conversations -----------------------------------------------------------------


def test_either_side_starts_the_same_conversation(client, accounts) -> None:
    alice = accounts.sign_up("alice")
    bob = accounts.sign_up("bob")
    first = client.post(f"{API}/conversations", json={"peer": "bob"}, headers=alice)
    second = client.post(f"{API}/conversations", json={"peer": "ALICE"}, headers=bob)
    assert first.status_code == 201 and second.status_code == 200
    assert first.json["id"] == second.json["id"]
    assert first.json["peer"] == "bob" and second.json["peer"] == "alice"
    assert first.json == {
        "id": first.json["id"],
        "peer": "bob",
        "created_at": first.json["created_at"],
        "last_seq": 0,
        "unread": 0,
        "read_seq": 0,
        "peer_delivered_seq": 0,
        "peer_read_seq": 0,
        "last_message": None,
    }
    assert first.json["created_at"].endswith("Z")


def test_conversation_event_goes_to_both_once(client, pair) -> None:
    alice, bob, conversation_id = pair
    client.post(f"{API}/conversations", json={"peer": "bob"}, headers=alice)  # asking again emits nothing
    for headers, peer in ((alice, "bob"), (bob, "alice")):
        stream = events(client, headers)
        assert [e["type"] for e in stream["events"]] == ["conversation"]
        assert stream["events"][0]["pos"] == 1 and stream["last_pos"] == 1
        assert stream["events"][0]["conversation"]["id"] == conversation_id
        assert stream["events"][0]["conversation"]["peer"] == peer


def test_a_new_conversation_wakes_both_parties_waiting_streams(app, client, accounts) -> None:
    """The peer learns of the new conversation through its event stream: its waiting poll
    (and the starter's other device) answers with the event, not at its timeout."""
    alice, bob = accounts.sign_up("alice"), accounts.sign_up("bob")
    chat = app.extensions["chatapi"].chat
    polls = {
        peer: gevent.spawn(chat.events, token_of(headers), after=0, limit=100, timeout=30)
        for peer, headers in (("bob", alice), ("alice", bob))
    }
    waiting(app, 2)
    started = client.post(f"{API}/conversations", json={"peer": "bob"}, headers=alice).json
    # Woken: long before the timeout, whose last check would find the event too.
    gevent.joinall(polls.values(), timeout=15)
    unwoken = [peer for peer, poll in polls.items() if not poll.ready()]
    gevent.killall(list(polls.values()))
    assert unwoken == []
    for peer, poll in polls.items():
        items = poll.get().items
        assert [(e["pos"], e["type"]) for e in items] == [(1, "conversation")], peer
        assert items[0]["conversation"]["id"] == started["id"] and items[0]["conversation"]["peer"] == peer


@pytest.mark.parametrize(
    ("peer", "status", "code"),
    [
        ("nobody", 404, "user_not_found"),
        ("alice", 400, "invalid_peer"),
        ("ALICE", 400, "invalid_peer"),
        ("no such name!", 404, "user_not_found"),
    ],
)
def test_start_conversation_errors(client, accounts, peer, status, code) -> None:
    alice = accounts.sign_up("alice")
    response = client.post(f"{API}/conversations", json={"peer": peer}, headers=alice)
    assert response.status_code == status and error_code(response) == code


@pytest.mark.parametrize("body", [{}, {"peer": 7}, {"peer": None}, [], {"peer": ["bob"]}])
def test_start_conversation_bad_body(client, accounts, body) -> None:
    alice = accounts.sign_up("alice")
    response = client.post(f"{API}/conversations", json=body, headers=alice)
    assert response.status_code == 400 and error_code(response) == "invalid_request"


def test_conversations_most_recent_activity_first(client, accounts) -> None:
    alice = accounts.sign_up("alice")
    accounts.sign_up("bob")
    accounts.sign_up("carol")
    with_bob = client.post(f"{API}/conversations", json={"peer": "bob"}, headers=alice).json["id"]
    with_carol = client.post(f"{API}/conversations", json={"peer": "carol"}, headers=alice).json["id"]
    listed = client.get(f"{API}/conversations", headers=alice).json["conversations"]
    assert [c["id"] for c in listed] == [with_carol, with_bob]
    send(client, alice, with_bob)
    listed = client.get(f"{API}/conversations", headers=alice).json["conversations"]
    assert [c["id"] for c in listed] == [with_bob, with_carol]
    assert listed[0]["last_message"]["text"] == "hi"


def test_strangers_see_404_for_conversations(client, accounts, pair) -> None:
    _, _, conversation_id = pair
    eve = accounts.sign_up("eve")
    for response in (
        client.get(f"{API}/conversations/{conversation_id}", headers=eve),
        client.get(f"{API}/conversations/{conversation_id}/messages", headers=eve),
        send(client, eve, conversation_id),
        client.post(f"{API}/conversations/{conversation_id}/read", json={"seq": 0}, headers=eve),
        client.get(f"{API}/conversations/999999", headers=eve),
    ):
        assert response.status_code == 404 and error_code(response) == "conversation_not_found"
    assert client.get(f"{API}/conversations", headers=eve).json == {"conversations": []}
    assert events(client, eve)["events"] == []


# Messages ----------------------------------------------------------------------


def test_send_returns_the_message_with_its_seq(client, pair) -> None:
    alice, bob, conversation_id = pair
    response = send(client, alice, conversation_id, "hello\n<b>bob</b>", client_id="m-1")
    assert response.status_code == 201
    assert response.json == {
        "id": response.json["id"],
        "conversation_id": conversation_id,
        "seq": 1,
        "sender": "alice",
        "text": "hello\n<b>bob</b>",
        "client_id": "m-1",
        "created_at": response.json["created_at"],
    }
    # RFC 3339 UTC with microseconds, as every time; the same wherever the message is read.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", response.json["created_at"])
    assert events(client, bob)["events"][1]["message"] == response.json
    listed = client.get(f"{API}/conversations/{conversation_id}/messages", headers=bob).json["messages"]
    assert listed == [response.json]


def test_retry_with_same_client_id_stores_one_message(client, pair) -> None:
    alice, bob, conversation_id = pair
    first = send(client, alice, conversation_id, "once", client_id="abc")
    again = send(client, alice, conversation_id, "once", client_id="abc")
    assert first.status_code == 201 and again.status_code == 200 and again.json == first.json
    # The same client_id from the other party is a different message.
    assert send(client, bob, conversation_id, "once", client_id="abc").status_code == 201
    messages = client.get(f"{API}/conversations/{conversation_id}/messages", headers=alice).json["messages"]
    assert [m["seq"] for m in messages] == [1, 2]


def test_a_replay_is_not_counted_as_a_message_sent(client, pair) -> None:
    """chatapi_messages_sent_total counts messages stored: a retry answered with the original is none."""
    alice, _, conversation_id = pair

    def sent_total() -> float:
        metrics = client.get("/metrics").get_data(as_text=True)
        return float(re.search(r"^chatapi_messages_sent_total (\S+)$", metrics, re.M).group(1))

    before = sent_total()
    assert send(client, alice, conversation_id, "once", client_id="abc").status_code == 201
    assert send(client, alice, conversation_id, "once", client_id="abc").status_code == 200
    assert sent_total() - before == 1


def test_a_client_id_is_scoped_to_its_conversation(client, pair, accounts) -> None:
    """Same sender, same conversation: only that is a replay."""
    alice, _, conversation_id = pair
    accounts.sign_up("carol")
    other_id = client.post(f"{API}/conversations", json={"peer": "carol"}, headers=alice).json["id"]
    first = send(client, alice, conversation_id, "once", client_id="abc")
    elsewhere = send(client, alice, other_id, "once", client_id="abc")
    assert elsewhere.status_code == 201 and elsewhere.json["id"] != first.json["id"]
    assert (elsewhere.json["conversation_id"], elsewhere.json["seq"]) == (other_id, 1)
    listed = client.get(f"{API}/conversations/{other_id}/messages", headers=alice).json["messages"]
    assert listed == [elsewhere.json]


def test_client_id_reused_with_other_text_is_409(client, pair) -> None:
    alice, _, conversation_id = pair
    send(client, alice, conversation_id, "first", client_id="abc")
    response = send(client, alice, conversation_id, "second", client_id="abc")
    assert response.status_code == 409 and error_code(response) == "client_id_reused"
    # The refused send left no gap.
    assert send(client, alice, conversation_id, "third").json["seq"] == 2


def test_a_message_is_never_timed_before_the_one_ahead_of_it(app, client, pair) -> None:
    """A send reads the clock before it waits for the conversation's row, so
    it may be stored after a send that read it later; it then takes that one's time.
    (This is the path of every send on SQLite and of replays on PostgreSQL;
    test_batches_pg.py has PostgreSQL's own.)"""
    alice, bob, conversation_id = pair
    chat = app.extensions["chatapi"].chat
    later = datetime(2100, 1, 2, 3, 4, 5)
    for headers, now in ((alice, later), (bob, later - timedelta(seconds=1))):
        token = headers["Authorization"].removeprefix("Bearer ")
        chat._store_message_in_steps(token, conversation_id, "hi", None, now)
    listed = client.get(f"{API}/conversations/{conversation_id}/messages", headers=alice).json["messages"]
    assert [m["created_at"] for m in listed] == ["2100-01-02T03:04:05.000000Z"] * 2


def test_null_client_id_is_like_absent(client, pair) -> None:
    alice, _, conversation_id = pair
    assert send(client, alice, conversation_id, "a", client_id=None).json["client_id"] is None
    assert send(client, alice, conversation_id, "a", client_id=None).json["seq"] == 2


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"text": ""}, "invalid_text"),
        ({"text": "   \n"}, "invalid_text"),
        ({"text": "x" * 4001}, "invalid_text"),
        ({"text": "bell\x07"}, "invalid_text"),
        ({"text": 5}, "invalid_request"),
        ({}, "invalid_request"),
        ({"text": "hi", "client_id": ""}, "invalid_client_id"),
        ({"text": "hi", "client_id": "x" * 65}, "invalid_client_id"),
        ({"text": "hi", "client_id": 12}, "invalid_request"),
    ],
)
def test_send_bad_input(client, pair, body, code) -> None:
    alice, _, conversation_id = pair
    response = client.post(f"{API}/conversations/{conversation_id}/messages", json=body, headers=alice)
    assert response.status_code == 400 and error_code(response) == code


def send_raw(client, headers, conversation_id, raw: bytes):
    """A send whose body is written out as bytes (what json= cannot say)."""
    return client.post(
        f"{API}/conversations/{conversation_id}/messages",
        data=raw,
        headers={**headers, "Content-Type": "application/json"},
    )


def test_a_field_given_twice_counts_with_its_last_value(client, pair) -> None:
    alice, _, conversation_id = pair
    response = send_raw(client, alice, conversation_id, b'{"text": "first", "text": "last"}')
    assert response.status_code == 201 and response.json["text"] == "last"


def test_lone_surrogate_text_is_refused(client, pair) -> None:
    alice, _, conversation_id = pair
    response = send_raw(client, alice, conversation_id, b'{"text": "a\\ud800b"}')
    assert response.status_code == 400 and error_code(response) == "invalid_text"


def test_history_latest_before_and_after(client, pair) -> None:
    alice, _, conversation_id = pair
    for i in range(1, 8):
        send(client, alice, conversation_id, f"m{i}")
    url = f"{API}/conversations/{conversation_id}/messages"

    def seqs(**params):
        body = client.get(url, query_string=params, headers=alice).json
        assert body["last_seq"] == 7
        return [m["seq"] for m in body["messages"]]

    assert seqs() == [1, 2, 3, 4, 5, 6, 7]
    assert seqs(limit=3) == [5, 6, 7]
    assert seqs(before=5, limit=2) == [3, 4]
    assert seqs(before=1) == []
    assert seqs(before=10**12) == [1, 2, 3, 4, 5, 6, 7]
    assert seqs(after=5, timeout=0) == [6, 7]
    assert seqs(after=2, limit=2, timeout=0) == [3, 4]
    assert seqs(after=7, timeout=0) == []
    # Beyond the head: answered at once (no wait even with a timeout) with the head.
    assert seqs(after=99, timeout=30) == []


def test_integers_are_read_by_value_whatever_their_leading_zeros(client, pair) -> None:
    """Past 18 digits a number is taken as too high to matter; zeros in front add no value."""
    alice, bob, conversation_id = pair
    for i in range(1, 4):
        send(client, alice, conversation_id, f"m{i}")
    zero, two = "0" * 25, "0" * 24 + "2"
    url = f"{API}/conversations/{zero}{conversation_id}/messages"
    body = client.get(f"{url}?after={zero}&limit={two}&timeout=0", headers=bob).json
    assert [m["seq"] for m in body["messages"]] == [1, 2]
    body = client.get(f"{url}?before={'0' * 24}3", headers=bob).json
    assert [m["seq"] for m in body["messages"]] == [1, 2]
    # after=0 acknowledges nothing: alice's messages are not delivered to bob yet.
    assert len(events(client, bob, after=zero)["events"]) == 7  # the conversation, 3 messages, their 3 receipts
    conversation = client.get(f"{API}/conversations/{conversation_id}", headers=alice).json
    assert conversation["peer_delivered_seq"] == 0
    # Past 18 significant digits, still "beyond the head" and "no such conversation".
    assert client.get(f"{url}?after=1{zero}&timeout=30", headers=bob).json["messages"] == []
    response = client.get(f"{API}/conversations/1{zero}", headers=bob)
    assert response.status_code == 404 and error_code(response) == "not_found"
    # However many zeros: past 4300 digits Python's int() refuses a string (an id was a 500).
    many = "0" * 5000
    assert client.get(f"{API}/conversations/{many}{conversation_id}", headers=bob).json["id"] == conversation_id
    body = client.get(f"{API}/conversations/{many}{conversation_id}/messages?after={many}2&timeout=0", headers=bob).json
    assert [m["seq"] for m in body["messages"]] == [3]


def test_reads_that_cannot_wait_answer_at_once(client, pair) -> None:
    """History, the latest messages (even of an empty conversation) and a
    cursor beyond the head never wait, whatever the timeout."""
    alice, _, conversation_id = pair
    url = f"{API}/conversations/{conversation_id}/messages"
    started = time.monotonic()
    assert client.get(f"{url}?timeout=60", headers=alice).json == {"messages": [], "last_seq": 0}
    send(client, alice, conversation_id, "one")
    for query in ("timeout=60", "before=1&timeout=60", "after=5&timeout=60"):
        assert client.get(f"{url}?{query}", headers=alice).json["last_seq"] == 1, query
    assert events(client, alice, after=500, timeout=60)["events"] == []
    # Each would have waited 60 s.
    assert time.monotonic() - started < 30


def test_pages_hold_100_items_unless_told(client, pair) -> None:
    alice, _, conversation_id = pair
    for n in range(51):
        send(client, alice, conversation_id, f"m{n}")
    messages = client.get(f"{API}/conversations/{conversation_id}/messages?after=0&timeout=0", headers=alice).json
    assert [m["seq"] for m in messages["messages"]] == list(range(1, 52))
    latest = client.get(f"{API}/conversations/{conversation_id}/messages", headers=alice).json
    assert [m["seq"] for m in latest["messages"]] == list(range(1, 52))
    page = events(client, alice)  # 1 conversation event, then 51 messages with their receipts
    assert [e["pos"] for e in page["events"]] == list(range(1, 101)) and page["last_pos"] == 103
    for n in range(51, 120):
        send(client, alice, conversation_id, f"m{n}")
    latest = client.get(f"{API}/conversations/{conversation_id}/messages", headers=alice).json
    assert [m["seq"] for m in latest["messages"]] == list(range(21, 121))
    page = client.get(f"{API}/conversations/{conversation_id}/messages?after=0&timeout=0", headers=alice).json
    assert [m["seq"] for m in page["messages"]] == list(range(1, 101)) and page["last_seq"] == 120


def test_pages_of_long_texts_stop_at_a_megabyte(client, pair) -> None:
    """A page is cut by size as well as by `limit` (wire.PAGE_MAX_BYTES): a full page
    of the longest texts would be tens of megabytes held per unread answer. Clients
    carry on from the page's edge as after any cut page, and miss nothing."""
    alice, bob, conversation_id = pair
    longest = "🙂" * 4000
    for n in range(30):
        send(client, alice, conversation_id, f"{n:02d}" + longest[2:])
    url = f"{API}/conversations/{conversation_id}/messages"

    def page(query: str) -> tuple[list[int], int]:
        response = client.get(f"{url}?{query}&limit=1000&timeout=0", headers=bob)
        assert len(response.data) <= PAGE_MAX_BYTES
        return [m["seq"] for m in response.json["messages"]], response.json["last_seq"]

    first, head = page("after=0")
    assert head == 30 and first == list(range(1, len(first) + 1)) and 10 <= len(first) < 30
    rest, _ = page(f"after={first[-1]}")
    assert first + rest == list(range(1, 31))
    # History keeps the newest of its range, and pages back from its lowest.
    latest, _ = page("x=1")
    assert latest == list(range(31 - len(latest), 31)) and len(latest) < 30
    earlier, _ = page(f"before={latest[0]}")
    assert earlier == list(range(1, latest[0]))
    # The event stream too: in order, without gaps, to the head.
    cursor, positions = 0, []
    while True:
        response = client.get(f"{API}/events?after={cursor}&limit=1000&timeout=0", headers=bob)
        assert len(response.data) <= PAGE_MAX_BYTES
        body = response.json
        if not body["events"]:
            break
        positions += [e["pos"] for e in body["events"]]
        cursor = positions[-1]
    assert positions == list(range(1, body["last_pos"] + 1)) and body["last_pos"] > 61


def test_pages_of_long_ascii_texts_are_cut_only_near_a_megabyte(client, pair) -> None:
    """Each character counts at its longest escape, which for ASCII is 2 bytes, not an emoji's 12."""
    alice, bob, conversation_id = pair
    for n in range(130):
        send(client, alice, conversation_id, f"{n:03d}" + "x" * 3997)
    response = client.get(f"{API}/conversations/{conversation_id}/messages?limit=1000", headers=bob)
    seqs = [m["seq"] for m in response.json["messages"]]
    assert seqs == list(range(131 - len(seqs), 131)) and 120 <= len(seqs) < 130
    assert PAGE_MAX_BYTES / 4 < len(response.data) <= PAGE_MAX_BYTES


@pytest.mark.parametrize(
    "path",
    [
        "/me",
        "/conversations",
        "/conversations/{id}",
        "/conversations/{id}/messages",
        "/conversations/{id}/messages?after=0&timeout=0",
        "/events?timeout=0",
        "/openapi.json",
    ],
)
def test_reads_are_not_to_be_cached(client, pair, path) -> None:
    alice, _, conversation_id = pair
    response = client.get(API + path.format(id=conversation_id), headers=alice)
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    "query",
    [
        "after=1&before=2",
        "after=",
        "after=-1",
        "after=x",
        "limit=0",
        "limit=1001",
        "limit=",
        "timeout=-1",
        "timeout=abc",
        "before=1.5",
        "timeout=",
        "after=1&after=2",
        "limit=5&limit=5",
        "timeout=1&timeout=2",
    ],
)
def test_bad_query_parameters(client, pair, query) -> None:
    alice, _, conversation_id = pair
    response = client.get(f"{API}/conversations/{conversation_id}/messages?{query}", headers=alice)
    assert response.status_code == 400 and error_code(response) == "invalid_parameter"
    response = client.get(f"{API}/events?{query}", headers=alice)
    assert response.status_code == 400 and error_code(response) == "invalid_parameter"


@pytest.mark.parametrize("query", ["before=3", "before=abc", "before=", "after=1&before=3"])
def test_the_event_stream_refuses_before(client, pair, query) -> None:
    """It has no history paging; answering as if from pos 0 would mislead a client that meant to page back."""
    alice, _, _ = pair
    response = client.get(f"{API}/events?{query}&timeout=0", headers=alice)
    assert response.status_code == 400 and error_code(response) == "invalid_parameter"
    # A bad token is still told so first, as everywhere.
    response = client.get(f"{API}/events?{query}&timeout=0", headers={"Authorization": "Bearer nonsense"})
    assert response.status_code == 401


# Events and receipts -----------------------------------------------------------


def test_events_carry_messages_to_both_and_receipts(client, pair) -> None:
    alice, bob, conversation_id = pair
    message = send(client, alice, conversation_id, "hello").json
    for headers in (alice, bob):
        stream = events(client, headers)
        assert [e["pos"] for e in stream["events"]] == [1, 2, 3]
        assert stream["events"][1] == {"pos": 2, "type": "message", "message": message}
        assert stream["events"][2] == {
            "pos": 3,
            "type": "receipt",
            "conversation_id": conversation_id,
            "user": "alice",
            "delivered_seq": 1,
            "read_seq": 1,
        }


def test_cursor_acknowledges_delivery_once(client, pair) -> None:
    alice, bob, conversation_id = pair
    send(client, alice, conversation_id, "hello")
    head = events(client, bob)["last_pos"]
    # Handing the event out is not delivery; asking after it is.
    assert client.get(f"{API}/conversations/{conversation_id}", headers=alice).json["peer_delivered_seq"] == 0
    events(client, bob, after=head)
    events(client, bob, after=head)
    conversation = client.get(f"{API}/conversations/{conversation_id}", headers=alice).json
    assert conversation["peer_delivered_seq"] == 1 and conversation["peer_read_seq"] == 0
    receipts = [e for e in events(client, alice)["events"] if e["type"] == "receipt" and e["user"] == "bob"]
    assert [(r["delivered_seq"], r["read_seq"]) for r in receipts] == [(1, 0)]


def test_after_a_cursor_beyond_the_head_later_messages_are_still_acknowledged(client, pair) -> None:
    """A client resynchronising with a cursor past the head (API.md) acknowledges only what
    exists: a message that arrives afterwards is delivered when asked past its own pos."""
    alice, bob, conversation_id = pair
    head = events(client, bob, after=10**6)["last_pos"]
    send(client, alice, conversation_id, "after the resync")
    page = events(client, bob, after=head)
    assert [e["type"] for e in page["events"]] == ["message", "receipt"]
    assert client.get(f"{API}/conversations/{conversation_id}", headers=alice).json["peer_delivered_seq"] == 0
    events(client, bob, after=page["last_pos"])
    assert client.get(f"{API}/conversations/{conversation_id}", headers=alice).json["peer_delivered_seq"] == 1


def test_a_message_past_the_cursor_is_delivered_when_a_later_cursor_passes_it(client, pair) -> None:
    """A cursor acknowledges the events up to it, not up to the head it is answered with:
    the message after it is delivered by the next cursor past it, with no newer message."""
    alice, bob, conversation_id = pair
    send(client, alice, conversation_id, "one")
    send(client, alice, conversation_id, "two")
    one, two = [e["pos"] for e in events(client, bob)["events"] if e["type"] == "message"]
    url = f"{API}/conversations/{conversation_id}"
    events(client, bob, after=one)
    assert client.get(url, headers=alice).json["peer_delivered_seq"] == 1
    events(client, bob, after=two)
    assert client.get(url, headers=alice).json["peer_delivered_seq"] == 2
    assert receipts(client, alice, "bob") == [(1, 0), (2, 0)]


def test_a_message_delivered_through_its_conversation_gets_no_second_receipt_from_the_stream(client, pair) -> None:
    """Delivered either way, once: the stream's cursor passing a message the conversation's
    cursor already acknowledged grows no mark, so it emits no receipt."""
    alice, bob, conversation_id = pair
    send(client, alice, conversation_id, "one")
    client.get(f"{API}/conversations/{conversation_id}/messages?after=1&timeout=0", headers=bob)
    head = events(client, bob)["last_pos"]
    events(client, bob, after=head)
    for headers in (alice, bob):
        assert receipts(client, headers, "bob") == [(1, 0)]


def test_an_acknowledging_poll_answers_exactly_what_the_stream_holds(client, pair, accounts) -> None:
    """A poll that acknowledges must answer what a later read of the same
    range (which acknowledges nothing new) finds: its own receipt alone, the
    receipt after other events, and a page cut by `limit` among its receipts."""
    alice, bob, conversation_id = pair

    def acknowledged_then_reread(after: int, **params) -> dict:
        answer = events(client, bob, after=after, **params)
        assert answer == events(client, bob, after=after, **params)
        return answer

    # Only bob's own receipt follows the cursor.
    send(client, alice, conversation_id, "one")
    head = events(client, bob)["last_pos"]
    answer = acknowledged_then_reread(head)
    receipt = {"pos": head + 1, "type": "receipt", "conversation_id": conversation_id, "user": "bob"}
    assert answer == {"events": [{**receipt, "delivered_seq": 1, "read_seq": 0}], "last_pos": head + 1}
    # Alice's next message lies between the cursor and bob's receipt.
    send(client, alice, conversation_id, "two")
    send(client, alice, conversation_id, "three")
    two = events(client, bob, after=head + 1, limit=1)["events"][0]
    answer = acknowledged_then_reread(two["pos"])
    assert [(e["type"], e.get("user")) for e in answer["events"]] == [
        ("receipt", "alice"),
        ("message", None),
        ("receipt", "alice"),
        ("receipt", "bob"),
    ]
    assert answer["events"][-1]["delivered_seq"] == 2 and answer["last_pos"] == two["pos"] + 4
    # Two receipts of bob's own (two conversations) but a page of one.
    carol = accounts.sign_up("carol")
    other_id = client.post(f"{API}/conversations", json={"peer": "bob"}, headers=carol).json["id"]
    send(client, carol, other_id, "four")
    send(client, alice, conversation_id, "five")
    head = events(client, bob, after=answer["last_pos"])["last_pos"]
    answer = acknowledged_then_reread(head, limit=1)
    assert [(e["pos"], e["user"], e["conversation_id"]) for e in answer["events"]] == [
        (head + 1, "bob", min(conversation_id, other_id))
    ]
    assert answer["last_pos"] == head + 2


def test_messages_cursor_acknowledges_delivery(client, pair) -> None:
    alice, bob, conversation_id = pair
    send(client, alice, conversation_id, "one")
    send(client, alice, conversation_id, "two")
    url = f"{API}/conversations/{conversation_id}/messages"

    def bob_receipts() -> list[tuple[int, int]]:
        """Bob's receipts, as both streams hold them (his other devices keep unread counts right)."""
        found = []
        for headers in (alice, bob):
            stream = events(client, headers)["events"]
            found.append([(e["delivered_seq"], e["read_seq"]) for e in stream if e.get("user") == "bob"])
        assert found[0] == found[1]
        return found[0]

    client.get(f"{url}?after=1&timeout=0", headers=bob)
    assert client.get(f"{API}/conversations/{conversation_id}", headers=alice).json["peer_delivered_seq"] == 1
    assert bob_receipts() == [(1, 0)]
    # A lower cursor later changes nothing and emits nothing: delivered_seq only grows.
    client.get(f"{url}?after=0&timeout=0", headers=bob)
    assert client.get(f"{API}/conversations/{conversation_id}", headers=alice).json["peer_delivered_seq"] == 1
    assert bob_receipts() == [(1, 0)]
    # after beyond the head delivers up to the head only.
    client.get(f"{url}?after=50&timeout=0", headers=bob)
    assert client.get(f"{API}/conversations/{conversation_id}", headers=alice).json["peer_delivered_seq"] == 2
    assert bob_receipts() == [(1, 0), (2, 0)]
    # Reading: one more receipt, in both streams again.
    client.post(f"{API}/conversations/{conversation_id}/read", json={"seq": 2}, headers=bob)
    assert bob_receipts() == [(1, 0), (2, 0), (2, 2)]


def test_a_conversation_cursor_wakes_the_senders_waiting_stream_with_its_receipt(app, client, pair) -> None:
    """Delivery acknowledged by a conversation's cursor reaches the sender's waiting poll
    at once, as one acknowledged by the event stream's cursor does."""
    alice, bob, conversation_id = pair
    send(client, alice, conversation_id, "one")
    head = events(client, alice)["last_pos"]
    poll = gevent.spawn(app.extensions["chatapi"].chat.events, token_of(alice), after=head, limit=100, timeout=30)
    waiting(app, 1)
    client.get(f"{API}/conversations/{conversation_id}/messages?after=1&timeout=0", headers=bob)
    # Woken: long before the timeout, whose last check would find the receipt too.
    poll.join(15)
    woken = poll.ready()
    poll.kill()
    assert woken
    assert [(e["type"], e["user"], e["delivered_seq"], e["read_seq"]) for e in poll.get().items] == [
        ("receipt", "bob", 1, 0)
    ]
    assert poll.get().items == events(client, alice, after=head)["events"]


def test_head_looks_without_acknowledging_or_waiting(client, pair) -> None:
    """HEAD is safe in HTTP: a probe or a link checker must not mark messages delivered, nor wait."""
    alice, bob, conversation_id = pair
    send(client, alice, conversation_id, "one")
    head = events(client, bob)["last_pos"]
    started = time.monotonic()
    for url, after in ((f"{API}/events", head), (f"{API}/conversations/{conversation_id}/messages", 1)):
        response = client.head(url, query_string={"after": after, "timeout": 30}, headers=bob)
        assert response.status_code == 200 and response.data == b""
        assert response.headers["Cache-Control"] == "no-store"
    assert time.monotonic() - started < 10, "HEAD waited for news"
    assert client.get(f"{API}/conversations/{conversation_id}", headers=alice).json["peer_delivered_seq"] == 0
    assert [e for e in events(client, alice)["events"] if e.get("user") == "bob"] == []
    # The same GET acknowledges.
    events(client, bob, after=head)
    assert client.get(f"{API}/conversations/{conversation_id}", headers=alice).json["peer_delivered_seq"] == 1


def test_read_marks_only_grow_and_imply_delivery(client, pair) -> None:
    alice, bob, conversation_id = pair
    for text in ("a", "b", "c"):
        send(client, alice, conversation_id, text)
    url = f"{API}/conversations/{conversation_id}/read"
    response = client.post(url, json={"seq": 2}, headers=bob)
    assert response.status_code == 200
    assert (response.json["read_seq"], response.json["unread"]) == (2, 1)
    before = events(client, alice)["last_pos"]
    for seq in (1, 2):  # lower, then the same: neither grows read_seq
        again = client.post(url, json={"seq": seq}, headers=bob)
        assert again.status_code == 200 and again.json["read_seq"] == 2
        assert events(client, alice)["last_pos"] == before, f"read mark {seq} after 2 must emit no receipt"
    conversation = client.get(f"{API}/conversations/{conversation_id}", headers=alice).json
    assert (conversation["peer_read_seq"], conversation["peer_delivered_seq"]) == (2, 2)


def test_a_read_below_the_delivered_mark_leaves_delivery_where_it_was(client, pair) -> None:
    """Reading implies delivery, and delivered_seq only grows: reading less than was delivered lowers nothing."""
    alice, bob, conversation_id = pair
    for text in ("a", "b", "c"):
        send(client, alice, conversation_id, text)
    client.get(f"{API}/conversations/{conversation_id}/messages?after=3&timeout=0", headers=bob)
    response = client.post(f"{API}/conversations/{conversation_id}/read", json={"seq": 1}, headers=bob)
    assert response.status_code == 200 and response.json["read_seq"] == 1
    conversation = client.get(f"{API}/conversations/{conversation_id}", headers=alice).json
    assert (conversation["peer_delivered_seq"], conversation["peer_read_seq"]) == (3, 1)
    for headers in (alice, bob):
        assert receipts(client, headers, "bob") == [(3, 0), (3, 1)]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"seq": 4}, "invalid_seq"),
        ({"seq": -1}, "invalid_seq"),
        ({"seq": "1"}, "invalid_request"),
        ({"seq": True}, "invalid_request"),
        ({"seq": 1.5}, "invalid_request"),
        ({"seq": 4.0}, "invalid_seq"),
        ({"seq": 1e300}, "invalid_seq"),
        ({}, "invalid_request"),
    ],
)
def test_read_bad_input(client, pair, body, code) -> None:
    alice, bob, conversation_id = pair
    for text in ("a", "b", "c"):
        send(client, alice, conversation_id, text)
    response = client.post(f"{API}/conversations/{conversation_id}/read", json=body, headers=bob)
    assert response.status_code == 400 and error_code(response) == code


@pytest.mark.parametrize(
    ("raw", "status", "read_seq_or_code"),
    [
        # Not integers, though a float rounds them to one (to 1, and to 0).
        ('{"seq": 1.00000000000000000001}', 400, "invalid_request"),
        ('{"seq": 1e-400}', 400, "invalid_request"),
        ('{"seq": -0.5e-20}', 400, "invalid_request"),
        # Integers, however written; past 18 digits beyond every seq, quickly.
        ('{"seq": 2.000000000000000000000}', 200, 2),
        ('{"seq": 0.2e1}', 200, 2),
        ('{"seq": 1e999999999}', 400, "invalid_seq"),
        ('{"seq": -1e999999999}', 400, "invalid_seq"),
    ],
)
def test_a_read_mark_is_read_exactly_as_written(client, pair, raw, status, read_seq_or_code) -> None:
    alice, bob, conversation_id = pair
    for text in ("a", "b", "c"):
        send(client, alice, conversation_id, text)
    response = client.post(
        f"{API}/conversations/{conversation_id}/read", data=raw, content_type="application/json", headers=bob
    )
    assert response.status_code == status, response.json
    if status == 200:
        assert response.json["read_seq"] == read_seq_or_code
    else:
        assert error_code(response) == read_seq_or_code


def test_a_read_mark_with_a_zero_fraction_is_an_integer(client, pair) -> None:
    """JSON has one kind of number; JSON Schema's integer (the OpenAPI document's) includes 2.0."""
    alice, bob, conversation_id = pair
    for text in ("a", "b", "c"):
        send(client, alice, conversation_id, text)
    response = client.post(f"{API}/conversations/{conversation_id}/read", json={"seq": 2.0}, headers=bob)
    assert response.status_code == 200 and response.json["read_seq"] == 2


@pytest.mark.parametrize("number", ["9" * 5000, "-" + "9" * 5000, "1e400", "-1e400"])
def test_a_read_mark_past_any_seq_is_valid_json_but_no_seq(client, pair, number) -> None:
    """Python will not read 5,000 digits, and reads 1e400 as infinity; each is a valid JSON integer,
    and too high (or low) a seq."""
    alice, bob, conversation_id = pair
    send(client, alice, conversation_id, "a")
    url = f"{API}/conversations/{conversation_id}/read"
    response = client.post(url, data=f'{{"seq": {number}}}', content_type="application/json", headers=bob)
    assert response.status_code == 400 and error_code(response) == "invalid_seq"


def test_sending_counts_as_reading(client, pair) -> None:
    alice, bob, conversation_id = pair
    send(client, alice, conversation_id, "question?")
    assert client.get(f"{API}/conversations/{conversation_id}", headers=bob).json["unread"] == 1
    send(client, bob, conversation_id, "answer")
    conversation = client.get(f"{API}/conversations/{conversation_id}", headers=bob).json
    assert (conversation["read_seq"], conversation["unread"]) == (2, 0)


def test_events_limit_and_head(client, pair) -> None:
    alice, _, conversation_id = pair
    for text in ("a", "b", "c"):
        send(client, alice, conversation_id, text)
    page = events(client, alice, limit=2)
    assert [e["pos"] for e in page["events"]] == [1, 2] and page["last_pos"] == 7
    page = events(client, alice, after=2, limit=1000)
    assert [e["pos"] for e in page["events"]] == [3, 4, 5, 6, 7]
    assert events(client, alice, after=500, timeout=30) == {"events": [], "last_pos": 7}


# Error shapes for the whole surface --------------------------------------------


def test_unknown_route_is_json_404(client) -> None:
    for path in (f"{API}/nothing", "/nothing", f"{API}/conversations/abc", f"{API}/conversations/{'9' * 30}"):
        response = client.get(path)
        assert response.status_code == 404 and error_code(response) == "not_found", path


def test_doubled_slashes_are_not_redirected(client, pair) -> None:
    """Werkzeug would answer with a 308 to the merged path: an HTML body, and a Location from the Host header."""
    alice, _, conversation_id = pair
    for path in (
        f"{API}//me",
        f"{API}/conversations//{conversation_id}",
        f"{API}/conversations/{conversation_id}//messages",
    ):
        response = client.get(path, headers=alice)
        assert response.status_code == 404 and error_code(response) == "not_found", path
        assert "Location" not in response.headers


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/conversations/1/messages", {"GET", "HEAD", "POST", "OPTIONS"}),
        # A route without URL arguments, which chatapi dispatches itself.
        ("/events", {"GET", "HEAD", "OPTIONS"}),
    ],
)
def test_options_answers_with_allow_and_no_body(client, path: str, allowed: set[str]) -> None:
    response = client.options(f"{API}{path}")
    assert response.status_code == 200 and response.data == b""
    assert set(response.headers["Allow"].split(", ")) == allowed
    # Nothing to label: an empty body is not text/html.
    assert "Content-Type" not in response.headers


def test_allow_lists_the_methods_in_one_order(client) -> None:
    """Werkzeug builds Allow from a set, whose order differs from process to
    process (string hashing): every worker must answer the same header."""
    for path in ("/me", "/users", "/tokens/current", "/conversations", "/conversations/1/messages"):
        for answer in (client.options(f"{API}{path}"), client.open(f"{API}{path}", method="PATCH")):
            allow = answer.headers["Allow"]
            assert allow == ", ".join(sorted(allow.split(", "))), (path, answer.status_code, allow)


def test_wrong_method_is_json_405(client) -> None:
    response = client.put(f"{API}/users", json={})
    assert response.status_code == 405 and error_code(response) == "method_not_allowed"
    assert "POST" in response.headers["Allow"]
    # HEAD only where GET is.
    response = client.head(f"{API}/users")
    assert response.status_code == 405 and response.headers["Allow"] == "OPTIONS, POST"


def test_non_json_body_is_415(client, accounts) -> None:
    response = client.post(f"{API}/users", data="username=alice", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415 and error_code(response) == "unsupported_media_type"
    response = client.post(f"{API}/users", data='{"username": "alice"}')
    assert response.status_code == 415


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "gzip, identity"])
def test_a_compressed_body_is_415(client, coding: str) -> None:
    """A body declared compressed is not the JSON it reads as: refused (RFC 9110, 15.5.16), never read as plain."""
    body = {"username": "alice", "password": "password123"}
    response = client.post(f"{API}/users", json=body, headers={"Content-Encoding": coding})
    assert response.status_code == 415 and error_code(response) == "unsupported_media_type"
    assert response.headers["Accept-Encoding"] == "identity"
    response = client.post(f"{API}/users", json=body, headers={"Content-Encoding": "identity"})
    assert response.status_code == 201


@pytest.mark.parametrize("raw", [b"{", b"", b"\xff\xfe", b"{'a': 1}", b'{"a": NaN}', b"[" * 60_000])
def test_malformed_json_is_400(client, raw) -> None:
    response = client.post(f"{API}/users", data=raw, content_type="application/json")
    assert response.status_code == 400 and error_code(response) == "invalid_json"


def test_body_size_limit_is_64_kib(client, pair) -> None:
    alice, _, conversation_id = pair
    url = f"{API}/conversations/{conversation_id}/messages"
    padding = '{"text": "ok", "pad": "%s"}'
    exact = padding % ("x" * (65_536 - len(padding % "")))
    assert len(exact) == 65_536
    assert client.post(url, data=exact, content_type="application/json", headers=alice).status_code == 201
    over = exact[:-2] + 'x"}'
    response = client.post(url, data=over, content_type="application/json", headers=alice)
    assert response.status_code == 413 and error_code(response) == "payload_too_large"
    # Whatever the route and method, before the token is looked at.
    response = client.get(f"{API}/me", data=over, content_type="application/json")
    assert response.status_code == 413 and error_code(response) == "payload_too_large"


def test_ops_endpoints(client) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        response = client.get(path)
        # Reads carry no-store (the contract), these too: probes must see live answers.
        assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store", path
    assert b"chatapi_http_requests_total" in client.get("/metrics").data


def test_made_up_methods_share_one_metrics_label(client) -> None:
    """Each label value is a series kept for ever: clients must not be able to mint them."""
    for method in ("X0Y", "X1Y", "BREW"):
        response = client.open("/healthz", method=method)
        assert response.status_code == 405 and error_code(response) == "method_not_allowed"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'method="other",route="unmatched",status="405"} 3.0' in metrics
    assert "X0Y" not in metrics and "BREW" not in metrics


def test_the_route_label_is_the_path_the_openapi_document_names(client, pair) -> None:
    """A dashboard joins the metrics with the API's own names: `{id}`, not Flask's `<id:conversation_id>`."""
    alice, _, conversation_id = pair
    assert send(client, alice, conversation_id).status_code == 201
    assert client.get(f"{API}/conversations/{conversation_id}/messages?timeout=0", headers=alice).status_code == 200
    metrics = client.get("/metrics").get_data(as_text=True)
    routes = set(re.findall(r'chatapi_http_requests_total\{method="\w+",route="([^"]*)"', metrics))
    documented = set(client.get(f"{API}/openapi.json").json["paths"])
    assert {f"{API}/conversations/{{id}}/messages", f"{API}/conversations"} <= routes
    assert routes <= documented | {"unmatched"}, routes - documented


def test_web_page_is_served_with_a_strict_csp(client) -> None:
    response = client.get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"
    # Its files are revalidated on every load (docs/api.md, "Caching").
    asset = client.get("/static/app.css")
    assert asset.status_code == 200 and "no-cache" in asset.headers["Cache-Control"]


@pytest.mark.parametrize("before", [None, 5])
def test_a_page_of_history_holds_no_message_above_its_last_seq(app, client, pair, monkeypatch, before) -> None:
    """A send that commits between the head's read and the page's (each its own statement
    on PostgreSQL) is left to the next read: `last_seq` is the head the answer was made at."""
    alice, bob, conversation = pair
    client.post(f"{API}/conversations/{conversation}/messages", json={"text": "one"}, headers=alice)
    history = chat_module._history

    def history_after_a_send(connection, *args):
        app.extensions["chatapi"].chat.send(alice["Authorization"].split()[1], conversation, "two", None)
        return history(connection, *args)

    monkeypatch.setattr(chat_module, "_history", history_after_a_send)
    query = "" if before is None else f"?before={before}"
    page = client.get(f"{API}/conversations/{conversation}/messages{query}", headers=bob).json
    assert page["last_seq"] == 1 and [m["seq"] for m in page["messages"]] == [1], page


def test_an_unsatisfiable_range_on_the_web_page_is_a_contract_error(client) -> None:
    response = client.get("/", headers={"Range": "bytes=999999-"})
    assert response.status_code == 416 and error_code(response) == "invalid_request"
    # With the file's length, so the client can ask again (RFC 9110, section 15.5.17).
    length = len(client.get("/").data)
    assert response.headers.get("Content-Range") == f"bytes */{length}"
    assert client.get("/", headers={"Range": "bytes=0-9"}).status_code == 206


@pytest.mark.parametrize(
    ("path", "query"),
    [("/events", b"timeout=0&q=caf\xe9"), ("/events", b"after=1\xff"), ("/conversations/{id}/messages", b"q=\xe9")],
)
def test_a_query_string_that_is_not_utf8_is_a_bad_parameter(client, pair, path: str, query: bytes) -> None:
    """Raw bytes that are not UTF-8 (not percent-encoded): 400, after the token check as always."""
    alice, _, conversation = pair
    url = f"{API}{path.format(id=conversation)}"
    # As a WSGI server hands them on: the request line's bytes, one character each.
    raw = {"QUERY_STRING": query.decode("latin-1")}
    response = client.get(url, headers=alice, environ_overrides=raw)
    assert response.status_code == 400 and error_code(response) == "invalid_parameter"
    response = client.get(url, environ_overrides=raw)
    assert response.status_code == 401 and error_code(response) == "unauthorized"


@pytest.mark.parametrize("path", ["/me", "/conversations", "/conversations/{id}", "/openapi.json"])
def test_routes_without_parameters_ignore_a_query_string_that_is_not_utf8(client, pair, path: str) -> None:
    alice, _, conversation = pair
    raw = {"QUERY_STRING": b"q=caf\xe9".decode("latin-1")}
    response = client.get(f"{API}{path.format(id=conversation)}", headers=alice, environ_overrides=raw)
    assert response.status_code == 200


def test_no_cookie_session_is_kept_or_set(app, client) -> None:
    """Requests share one empty session that refuses writes, so nothing can leak between callers."""
    import flask

    seen = []
    with app.test_request_context("/"):
        app.preprocess_request()
        seen.append(flask.session._get_current_object())
        with pytest.raises(RuntimeError):
            flask.session["user"] = "alice"
    with app.test_request_context("/"):
        seen.append(flask.session._get_current_object())
    assert seen[0] is seen[1] and len(seen[0]) == 0
    assert "Set-Cookie" not in client.get("/healthz").headers


def test_a_stop_answers_waiting_polls_without_asking_the_database_again(app, accounts) -> None:
    """At SIGTERM every waiting poll answers within 2 s: thousands of re-checks would not fit."""
    services = app.extensions["chatapi"]
    token = accounts.sign_up("alice")["Authorization"].split()[1]
    polls = [gevent.spawn(services.chat.events, token, after=0, limit=100, timeout=30) for _ in range(5)]
    gevent.sleep(0.2)
    assert not any(poll.ready() for poll in polls)
    checkouts = []
    for engine in services.db.engines:
        event.listen(engine, "checkout", lambda *args: checkouts.append(args))
    services.wakeups.drain()
    gevent.joinall(polls, timeout=5, raise_error=True)
    assert [poll.value.items for poll in polls] == [[]] * 5
    assert checkouts == []  # not one connection taken from a pool
