"""Group commit on PostgreSQL, of sends (`chatapi_send_batch`) and of
acknowledging polls (`chatapi_poll_batch`): a batch must leave the database
exactly as the same calls one by one would, and tell each caller what it
needs: a send what it alone would have been told, a poll a page the stream
really holds.

One known exception, which no client can see: `chatapi_poll_batch` reads
each stream's head once, so a poll whose cursor is past a receipt that
another poll of the same batch adds to its stream leaves `users.acked_pos`
at the head read before. That cursor may lag by design (it only spares
re-scanning; receipts are written only when a mark grows), and reading the
heads again would cost the hot path a statement."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from flask import Flask
from sqlalchemy.exc import IntegrityError

from chatapi import chat as chat_module
from chatapi.auth import token_digest
from chatapi.chat import _Poll, _receipts_from_array, _Send, _Stored
from chatapi.errors import ApiError
from tests.conftest import Accounts, make_app
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.postgres

API = "/api/v1"
# The sends' clock: later than the conversations' start, so that each
# message keeps the time its send read (a message is never timed before the
# one ahead of it, nor before its conversation began).
T0 = datetime(2100, 1, 2, 3, 4, 5)


def fresh_app(postgres: PostgresCluster) -> Iterator[Flask]:
    yield from make_app(postgres.new_database())


@pytest.fixture
def app(postgres_url: str) -> Iterator[Flask]:
    yield from make_app(postgres_url)


@pytest.fixture
def two_apps(postgres: PostgresCluster) -> Iterator[tuple[Flask, Flask]]:
    first, second = fresh_app(postgres), fresh_app(postgres)
    yield next(first), next(second)
    for rest in (first, second):
        next(rest, None)


def setting(app: Flask) -> dict:
    """alice, bob, carol and dave; conversations alice-bob, alice-carol and bob-carol."""
    client = app.test_client()
    accounts = Accounts(client)
    headers = {name: accounts.sign_up(name) for name in ("alice", "bob", "carol", "dave")}
    tokens = {name: h["Authorization"].removeprefix("Bearer ") for name, h in headers.items()}

    def start(who: str, peer: str) -> int:
        return client.post(f"{API}/conversations", json={"peer": peer}, headers=headers[who]).json["id"]

    conversations = {"ab": start("alice", "bob"), "ac": start("alice", "carol"), "bc": start("bob", "carol")}
    return {"client": client, "headers": headers, "tokens": tokens, "conversations": conversations}


def sends(world: dict, plan: list[tuple[str, str, str | None]]) -> list[_Send]:
    """(who, conversation, client_id) -> the sends, each with its own text and time."""
    return [
        _Send(
            token_digest(world["tokens"].get(who, "not-a-token")),
            world["conversations"].get(conversation, 10**9),
            f"{who} says {n} <b>&amp;</b>",
            client_id,
            T0 + timedelta(milliseconds=n),
        )
        for n, (who, conversation, client_id) in enumerate(plan)
    ]


def comparable(outcome: object) -> object:
    """An outcome without the message id (ids follow insert order, which a batch chooses)."""
    if isinstance(outcome, _Stored):
        return outcome._replace(message_id=None)
    if isinstance(outcome, ApiError):
        return (outcome.status, outcome.code)
    return type(outcome).__name__


def streams(world: dict) -> dict[str, list[dict]]:
    """Every user's whole event stream, message ids left out."""
    out = {}
    for name, headers in world["headers"].items():
        body = world["client"].get(f"{API}/events", query_string={"timeout": 0, "limit": 1000}, headers=headers).json
        for event in body["events"]:
            if event["type"] == "message":
                event["message"].pop("id")
            if event["type"] == "conversation":
                # Made by the setting, in real time.
                event["conversation"].pop("created_at")
        assert [e["pos"] for e in body["events"]] == list(range(1, body["last_pos"] + 1))
        out[name] = body["events"]
    return out


def conversations(world: dict) -> dict[str, list[dict]]:
    """Every user's conversations (read and delivery marks, last messages), ids and creation times left out."""
    out = {}
    for name, headers in world["headers"].items():
        listed = world["client"].get(f"{API}/conversations", headers=headers).json["conversations"]
        for conversation in listed:
            conversation.pop("created_at")
            if conversation["last_message"]:
                conversation["last_message"].pop("id")
        out[name] = listed
    return out


PLAN = [
    ("alice", "ab", "k1"),
    ("bob", "ab", None),
    ("alice", "ac", None),
    ("alice", "ab", "k2"),
    ("mallory", "ab", None),  # no such token: 401
    ("dave", "ab", None),  # not in the conversation: 404
    ("carol", "bc", None),
    ("bob", "bc", "k3"),
    ("carol", "ac", None),
]


def test_a_batch_stores_exactly_what_the_same_sends_one_by_one_store(two_apps: tuple[Flask, Flask]) -> None:
    batch_app, single_app = two_apps
    batch_world, single_world = setting(batch_app), setting(single_app)
    batch_chat = batch_app.extensions["chatapi"].chat
    single_chat = single_app.extensions["chatapi"].chat

    batched = batch_chat._store_messages_pg(sends(batch_world, PLAN))
    one_by_one = [single_chat._store_messages_pg([send])[0] for send in sends(single_world, PLAN)]

    assert [comparable(o) for o in batched] == [comparable(o) for o in one_by_one]
    assert [comparable(o) for o in batched][4:6] == [(401, "unauthorized"), (404, "conversation_not_found")]
    assert [o.seq for o in batched if isinstance(o, _Stored)] == [1, 2, 1, 3, 1, 2, 2]
    assert streams(batch_world) == streams(single_world)
    assert conversations(batch_world) == conversations(single_world)


def test_a_message_is_never_timed_before_the_one_ahead_of_it(two_apps: tuple[Flask, Flask]) -> None:
    """A send reads the clock before it waits for its conversation's row, so a
    send that reads it later may still be stored first. The next message then
    takes the time of the one ahead of it, in a batch as one by one."""
    for app, batched in zip(two_apps, (True, False), strict=True):
        world = setting(app)
        chat = app.extensions["chatapi"].chat
        later, earlier = sends(world, [("alice", "ab", None), ("bob", "ab", None)])
        later = later._replace(now=T0 + timedelta(seconds=1))
        if batched:
            stored = chat._store_messages_pg([later, earlier])
        else:
            stored = [chat._store_messages_pg([send])[0] for send in (later, earlier)]
        assert [(o.seq, o.created_at) for o in stored] == [(1, later.now), (2, later.now)]
        listed = (
            world["client"]
            .get(f"{API}/conversations/{world['conversations']['ab']}/messages", headers=world["headers"]["bob"])
            .json["messages"]
        )
        assert [m["created_at"] for m in listed] == ["2100-01-02T03:04:06.000000Z"] * 2


def test_each_send_of_a_batch_is_told_where_its_events_are(app: Flask) -> None:
    """The positions a send returns are what its wake-up pushes to waiting polls
    (wakeups.py): the message at head - 1 and the sender's receipt at head, in both streams."""
    world = setting(app)
    ids = {
        name: world["client"].get(f"{API}/me", headers=world["headers"][name]).json["id"] for name in world["headers"]
    }
    all_events = streams(world)
    batched = app.extensions["chatapi"].chat._store_messages_pg(sends(world, PLAN))
    after = {name: streams(world)[name][len(all_events[name]) :] for name in ids}
    by_id = {ids[name]: {e["pos"]: e for e in events} for name, events in after.items()}
    stored = [o for o in batched if isinstance(o, _Stored)]
    assert len(stored) == 7
    for outcome in stored:
        for user_id, head in ((outcome.user_low_id, outcome.low_head), (outcome.user_high_id, outcome.high_head)):
            message, receipt = by_id[user_id][head - 1], by_id[user_id][head]
            assert (message["type"], message["message"]["seq"], message["message"]["sender"]) == (
                "message",
                outcome.seq,
                outcome.sender,
            )
            assert (receipt["type"], receipt["user"], receipt["delivered_seq"], receipt["read_seq"]) == (
                "receipt",
                outcome.sender,
                outcome.seq,
                outcome.seq,
            )
    # Every new event belongs to one of the stored sends: nothing else was written.
    assert sum(len(events) for events in after.values()) == 4 * len(stored)


def test_a_replayed_client_id_in_a_batch_fails_only_that_send(app: Flask) -> None:
    world = setting(app)
    chat = app.extensions["chatapi"].chat
    plan = [("alice", "ab", "same"), ("bob", "ab", None), ("alice", "ab", "same"), ("carol", "ac", None)]
    outcomes = chat._store_messages_pg(sends(world, plan))
    assert [type(o) for o in outcomes] == [_Stored, _Stored, IntegrityError, _Stored]
    assert [o.seq for o in outcomes if isinstance(o, _Stored)] == [1, 2, 1]
    # The rolled-back batch left no trace: seqs are gapless and each message is stored once.
    messages = world["client"].get(
        f"{API}/conversations/{world['conversations']['ab']}/messages", headers=world["headers"]["alice"]
    )
    assert [(m["seq"], m["client_id"]) for m in messages.json["messages"]] == [(1, "same"), (2, None)]
    # Through the API the replay is answered with the original, as without batching.
    replay = world["client"].post(
        f"{API}/conversations/{world['conversations']['ab']}/messages",
        json={"text": "alice says 0 <b>&amp;</b>", "client_id": "same"},
        headers=world["headers"]["alice"],
    )
    assert replay.status_code == 200 and replay.json["seq"] == 1


# Acknowledging polls ---------------------------------------------------------

# Nobody sends after receiving (a send counts as delivery up to it): bob has
# alice's ab and carol's bc to acknowledge, alice carol's ac.
SENDS = [
    ("bob", "ab", None),
    ("alice", "ab", None),
    ("alice", "ab", None),
    ("carol", "ac", None),
    ("carol", "bc", None),
    ("carol", "bc", None),
]


def heads(app: Flask) -> dict[int, tuple[int, int]]:
    """Per user id: (event_head, acked_pos), read from the database."""
    rows = app.extensions["chatapi"].db.fetch_all("SELECT id, event_head, acked_pos FROM users", {})
    return {row.id: (row.event_head, row.acked_pos) for row in rows}


def polls(world: dict, plan: list[tuple[str, int, int]]) -> list[_Poll]:
    """(who, after, limit) -> the polls."""
    return [_Poll(token_digest(world["tokens"].get(who, "not-a-token")), after, limit) for who, after, limit in plan]


def answered(rows: list) -> dict:
    """What a poll's caller takes from its rows (`Chat._events_pg`)."""
    if not rows:
        return {"unauthorized": True}
    receipts = _receipts_from_array(rows[0].receipts, rows[0].caller_name)
    return {
        "head": rows[0].head,
        "pos": [row.pos for row in rows if row.pos is not None],
        "receipts": {user: sorted(r["pos"] for r in told) for user, told in receipts.items()},
    }


def test_a_poll_batch_acknowledges_exactly_as_the_same_polls_one_by_one(
    two_apps: tuple[Flask, Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cursors that move without a receipt (every 3 positions here) must move the same way too.
    monkeypatch.setattr(chat_module, "ACKED_POS_LAZY_STEP", 3)
    batch_app, single_app = two_apps
    batch_world, single_world = setting(batch_app), setting(single_app)
    batch_chat = batch_app.extensions["chatapi"].chat
    single_chat = single_app.extensions["chatapi"].chat
    for world, chat in ((batch_world, batch_chat), (single_world, single_chat)):
        for send in sends(world, SENDS):
            chat._store_messages_pg([send])
    assert heads(batch_app) == heads(single_app)
    head = {name: len(events) for name, events in streams(batch_world).items()}
    plan = [
        ("bob", head["bob"], 100),  # delivers alice's ab and carol's bc messages
        ("alice", head["alice"], 100),  # delivers bob's ab and carol's ac: a receipt into bob's stream
        ("carol", 7, 2),  # part of its stream, and a short page
        ("dave", 0, 100),  # nothing to acknowledge, nothing to read
        ("mallory", 5, 100),  # no such token
        ("dave", 9, 100),  # beyond its head: answered at once, to resynchronise
    ]

    batched = batch_chat._poll_and_acknowledge_pg(polls(batch_world, plan))
    one_by_one = [single_chat._poll_and_acknowledge_pg([poll])[0] for poll in polls(single_world, plan)]

    # The database is left as by the same polls one by one: streams, marks, cursors.
    assert streams(batch_world) == streams(single_world)
    assert conversations(batch_world) == conversations(single_world)
    assert heads(batch_app) == heads(single_app)
    # Each poll is told the receipts its acknowledgement added, as alone.
    assert [answered(rows).get("receipts") for rows in batched] == [
        answered(rows).get("receipts") for rows in one_by_one
    ]
    assert answered(batched[0])["receipts"] and answered(batched[1])["receipts"]
    assert answered(batched[4]) == {"unauthorized": True}
    # Each page is what the stream holds after its cursor, up to its limit, and the head is the stream's.
    final = streams(batch_world)
    for (who, after, limit), rows in zip(plan, batched, strict=True):
        if who == "mallory":
            continue
        assert answered(rows)["head"] == len(final[who])
        assert answered(rows)["pos"] == [event["pos"] for event in final[who][after : after + limit]]
    assert answered(batched[2])["pos"] == [8, 9]
    assert answered(batched[5]) == {"head": 0, "pos": [], "receipts": {}}

    # Again, with nothing left to acknowledge but carol's rest: the same on both, and no receipt.
    again = batch_chat._poll_and_acknowledge_pg(polls(batch_world, plan))
    for poll in polls(single_world, plan):
        single_chat._poll_and_acknowledge_pg([poll])
    assert [answered(rows).get("receipts") for rows in again] == [{}, {}, {}, {}, None, {}]
    assert streams(batch_world) == streams(single_world) == final
    assert heads(batch_app) == heads(single_app)


def test_several_polls_of_one_user_in_a_batch_acknowledge_once_as_far_as_the_furthest(app: Flask) -> None:
    world = setting(app)
    chat = app.extensions["chatapi"].chat
    for send in sends(world, SENDS):
        chat._store_messages_pg([send])
    ids = {
        name: world["client"].get(f"{API}/me", headers=headers).json["id"] for name, headers in world["headers"].items()
    }
    before = streams(world)
    head = {name: len(events) for name, events in before.items()}
    plan = [("bob", 4, 100), ("carol", head["carol"], 100), ("bob", head["bob"], 100)]

    batched = chat._poll_and_acknowledge_pg(polls(world, plan))

    final = streams(world)  # (and every stream is still gapless)
    added = {name: final[name][head[name] :] for name in final}
    # Delivered as far as the furthest poll, with one receipt per conversation:
    # alice's ab up to seq 3, carol's bc up to seq 2.
    bob_receipts = [(e["conversation_id"], e["delivered_seq"]) for e in added["bob"] if e["user"] == "bob"]
    assert sorted(bob_receipts) == sorted([(world["conversations"]["ab"], 3), (world["conversations"]["bc"], 2)])
    marks = {
        name: {c["peer"]: c["peer_delivered_seq"] for c in conversations(world)[name]} for name in ("alice", "carol")
    }
    assert marks["alice"]["bob"] == 3 and marks["carol"]["bob"] == 2
    # bob's first poll is told all of them, in every stream they went to; the second, none.
    told = answered(batched[0])["receipts"]
    assert told == {
        ids[name]: [e["pos"] for e in events if e["type"] == "receipt" and e["user"] == "bob"]
        for name, events in added.items()
        if any(e["type"] == "receipt" and e["user"] == "bob" for e in events)
    }
    assert answered(batched[2])["receipts"] == {}
    for (who, after, _), rows in zip(plan, batched, strict=True):
        assert answered(rows)["pos"] == list(range(after + 1, len(final[who]) + 1))


def test_a_poll_batch_emits_no_receipt_for_a_message_its_conversation_cursor_delivered(app: Flask) -> None:
    """A receipt only when a mark grows: a message already delivered through its conversation's
    cursor is delivered again by none of a batch's polls, which still deliver the rest."""
    world = setting(app)
    chat = app.extensions["chatapi"].chat
    for send in sends(world, SENDS):
        chat._store_messages_pg([send])
    ab, bc = world["conversations"]["ab"], world["conversations"]["bc"]
    # Bob acknowledges alice's ab messages (seqs 2 and 3) through the conversation.
    world["client"].get(f"{API}/conversations/{ab}/messages?after=3&timeout=0", headers=world["headers"]["bob"])
    before = streams(world)
    head = {name: len(events) for name, events in before.items()}

    chat._poll_and_acknowledge_pg(polls(world, [("bob", head["bob"], 100), ("dave", 0, 100)]))

    added = streams(world)["bob"][head["bob"] :]
    assert [(e["conversation_id"], e["user"], e["delivered_seq"]) for e in added] == [(bc, "bob", 2)]
