"""A model-based (stateful) test of the chat rules, on SQLite and on PostgreSQL.

Hypothesis drives the real app through Flask's test client with random runs
of the contract's requests: alice and bob, each on two devices (tokens), send
(with new client_ids, none, null, or used ones: a retry, a clash, the peer's),
poll the event stream from their cursors (or from older ones, from 0, from
beyond the head; small limits, so pages get cut) and read what they got, wait
on the stream until something wakes them, poll the conversation's messages
(which acknowledges delivery too), read (below, at and beyond `last_seq`),
and look (the conversation, its history, HEAD, starting it again). `Model` is
what API.md says should happen, written from it rather than from chat.py:
after every step each answer, each event page (woken long-polls' too, mostly
answered from the events their wake-up carried) and both parties'
conversation views must be what the model says.

On PostgreSQL the sends and the event stream's acknowledgements run as
server-side functions (pg_functions.py), on SQLite as the Python steps of
chat.py: the same machine checks both. Not covered here: concurrent polls
that PostgreSQL commits as one batch (test_batches_pg.py), more than one
conversation per user.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, NamedTuple

import gevent
import pytest
from argon2 import PasswordHasher
from flask import Flask
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from chatapi import auth

API = "/api/v1"
PASSWORD = "correct horse battery"
USERS = ("alice", "bob")
DEVICES = [(user, device) for user in USERS for device in (0, 1)]
# Each run makes its own pair of users (a pair has one conversation); names stay unique in the app.
_runs = itertools.count(1)
_client_ids = itertools.count(1)
LONG = os.environ.get("CHATAPI_LONG_TESTS") == "1"

RULES_SETTINGS = settings(
    max_examples=200 if LONG else 20,
    stateful_step_count=60 if LONG else 40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
    # Not the explain phase: on Python 3.11 it traces every line of every run
    # while shrinking a failure (app and SQLAlchemy included), which took a
    # failing run past pytest's 300 s timeout instead of a minute or two.
    phases=[phase for phase in Phase if phase is not Phase.explain],
)

Json = dict[str, Any]


def other(user: str) -> str:
    return "bob" if user == "alice" else "alice"


def _draw_seq(data: st.DataObject, label: str, mark: int, last_seq: int, beyond: int) -> int:
    """A seq for a user whose mark is `mark`: mostly one that moves it (the simplest one does: all the
    way, as a client that shows the whole conversation does), else the mark itself or any from 0 to
    `beyond` past `last_seq`."""
    moves = [st.just(last_seq), st.integers(mark + 1, last_seq)] if mark < last_seq else []
    return data.draw(st.one_of(*moves, st.just(mark), st.integers(0, last_seq + beyond)), label=label)


class Model:
    """The contract's rules for one conversation between alice and bob, in plain Python (API.md)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names  # model user -> username on the server
        self.conversation: Json | None = None  # {"id", "created_at"} once started
        self.messages: list[Json] = []  # message objects, index = seq - 1
        self.by_client_id: dict[tuple[str, str], Json] = {}
        self.delivered = dict.fromkeys(USERS, 0)
        self.read = dict.fromkeys(USERS, 0)
        self.streams: dict[str, list[Json]] = {user: [] for user in USERS}  # index = pos - 1

    @property
    def last_seq(self) -> int:
        return len(self.messages)

    def head(self, user: str) -> int:
        return len(self.streams[user])

    def _append(self, user: str, event: Json) -> None:
        self.streams[user].append({"pos": self.head(user) + 1, **event})

    def _receipt(self, subject: str) -> Json:
        return {
            "type": "receipt",
            "conversation_id": self.conversation["id"],
            "user": self.names[subject],
            "delivered_seq": self.delivered[subject],
            "read_seq": self.read[subject],
        }

    def _grow(self, user: str, *, delivered: int = 0, read: int = 0) -> None:
        """Move `user`'s marks up (never down; reading implies delivery); a receipt to both streams if one grew."""
        before = (self.delivered[user], self.read[user])
        self.read[user] = max(self.read[user], read)
        self.delivered[user] = max(self.delivered[user], delivered, self.read[user])
        if (self.delivered[user], self.read[user]) != before:
            receipt = self._receipt(user)
            for party in USERS:
                self._append(party, receipt)

    def start(self, conversation_id: int, created_at: str) -> None:
        self.conversation = {"id": conversation_id, "created_at": created_at}
        for user in USERS:
            self._append(user, {"type": "conversation", "conversation": self.view(user)})

    def send(self, sender: str, message: Json) -> None:
        self.messages.append(message)
        if message["client_id"] is not None:
            self.by_client_id[(sender, message["client_id"])] = message
        # Sending counts as reading: the sender's marks move to its own message.
        self.read[sender] = self.delivered[sender] = message["seq"]
        for user in USERS:
            self._append(user, {"type": "message", "message": message})
            self._append(user, self._receipt(sender))

    def acknowledge_events(self, user: str, after: int) -> None:
        """A poll of the stream `after` P: every message event at pos <= P (up to the head) is delivered."""
        seen = self.streams[user][: min(after, self.head(user))]
        self._grow(user, delivered=max((e["message"]["seq"] for e in seen if e["type"] == "message"), default=0))

    def acknowledge_messages(self, user: str, after: int) -> None:
        """A poll of the conversation's messages `after` N: delivered up to N (up to last_seq)."""
        self._grow(user, delivered=min(after, self.last_seq))

    def mark_read(self, user: str, seq: int) -> None:
        self._grow(user, read=seq)

    def view(self, user: str) -> Json:
        """The conversation object as `user` sees it."""
        peer = other(user)
        return {
            "id": self.conversation["id"],
            "peer": self.names[peer],
            "created_at": self.conversation["created_at"],
            "last_seq": self.last_seq,
            "unread": sum(1 for m in self.messages[self.read[user] :] if m["sender"] == self.names[peer]),
            "read_seq": self.read[user],
            "peer_delivered_seq": self.delivered[peer],
            "peer_read_seq": self.read[peer],
            "last_message": self.messages[-1] if self.messages else None,
        }


class Waiting(NamedTuple):
    """A device's long-poll of its stream, from its cursor at the head, in a greenlet of its own."""

    device: tuple[str, int]
    after: int
    limit: int | None
    poll: gevent.Greenlet


class ChatRules(RuleBasedStateMachine):
    def __init__(self, client) -> None:
        super().__init__()
        self.client = client
        run = next(_runs)
        names = {user: f"{user}{run}" for user in USERS}
        self.model = Model(names)
        self.tokens: dict[tuple[str, int], dict[str, str]] = {}
        for user in USERS:
            answer = client.post(f"{API}/users", json={"username": names[user], "password": PASSWORD})
            assert answer.status_code == 201, answer.json
            for device in (0, 1):
                answer = client.post(f"{API}/tokens", json={"username": names[user], "password": PASSWORD})
                assert answer.status_code == 201, answer.json
                self.tokens[(user, device)] = {"Authorization": f"Bearer {answer.json['token']}"}
        # Each device's cursor: the last pos it processed, resuming from it.
        self.cursors = dict.fromkeys(DEVICES, 0)
        self.last_message_id = 0
        self.waiting: Waiting | None = None

    # Helpers ---------------------------------------------------------------

    def _conversation_path(self) -> str:
        return f"{API}/conversations/{self.model.conversation['id']}"

    def _messages(self, device: tuple[str, int], limit: int | None, **query: int) -> Json:
        """The device's GET of the conversation's messages with `query` (and `limit`, unless None)."""
        if limit is not None:
            query["limit"] = limit
        path = f"{self._conversation_path()}/messages"
        answer = self.client.get(path, query_string=query, headers=self.tokens[device])
        assert answer.status_code == 200, answer.json
        return answer.json

    def _get_events(
        self, device: tuple[str, int], after: int, limit: int | None, timeout: float = 0, say_after: bool = True
    ) -> Any:
        """The device's GET of its stream (`after` omitted, which means 0, unless `say_after`)."""
        query: dict[str, Any] = {"after": after, "timeout": timeout} if say_after else {"timeout": timeout}
        if limit is not None:
            query["limit"] = limit
        return self.client.get(f"{API}/events", query_string=query, headers=self.tokens[device])

    def _check_events(self, device: tuple[str, int], after: int, limit: int | None, answer: Any) -> list[Json]:
        """`answer` is the page of the model's stream after `after`, with the head."""
        assert answer.status_code == 200, answer.json
        stream = self.model.streams[device[0]]
        expected = stream[after : after + (limit or 100)]
        assert answer.json == {"events": expected, "last_pos": len(stream)}, (device, after, limit)
        return answer.json["events"]

    def _resume(self, device: tuple[str, int], limit: int | None) -> list[Json]:
        """The device polls from its cursor and moves it over what it got: the very next events, each once."""
        cursor = self.cursors[device]
        events = self._poll_events(device, cursor, limit)
        if events:
            assert events[0]["pos"] == cursor + 1
            self.cursors[device] = events[-1]["pos"]
        return events

    def catch_up(self, device: tuple[str, int]) -> list[Json]:
        """The device resumes from its cursor until it has the whole stream: it misses nothing. Returns what it got."""
        got = []
        while events := self._resume(device, 1000):
            got += events
        assert self.cursors[device] == self.model.head(device[0])
        return got

    def _poll_events(
        self, device: tuple[str, int], after: int, limit: int | None, say_after: bool = True
    ) -> list[Json]:
        answer = self._get_events(device, after, limit, say_after=say_after)
        # The request acknowledges what is at or below its cursor; the page is read after that.
        self.model.acknowledge_events(device[0], after)
        return self._check_events(device, after, limit, answer)

    # Rules -----------------------------------------------------------------

    def start_conversation(self, user: str, upper: bool) -> None:
        """Start the conversation with the peer (its name in capitals, if `upper`)."""
        peer = self.model.names[other(user)]
        answer = self.client.post(
            f"{API}/conversations", json={"peer": peer.upper() if upper else peer}, headers=self.tokens[(user, 0)]
        )
        if self.model.conversation is None:
            assert answer.status_code == 201, answer.json
            self.model.start(answer.json["id"], answer.json["created_at"])
        else:
            # Asking again for an existing one emits nothing.
            assert answer.status_code == 200, answer.json
        assert answer.json == self.model.view(user)

    @initialize(user=st.sampled_from(USERS), upper=st.booleans())
    def started(self, user: str, upper: bool) -> None:
        """Every run starts with the conversation (a step that starts it again gets it, and changes nothing)."""
        self.start_conversation(user, upper)

    # Most rules take a device and draw the rest: Hypothesis favours the rules
    # with fewer arguments, and these are the ones that move the state.
    @rule(device=st.sampled_from(DEVICES), data=st.data())
    def send(self, device: tuple[str, int], data: st.DataObject) -> None:
        """One to three new messages from the device, one after the other."""
        text = data.draw(st.sampled_from(["hi", "hello there", " spaced\tout\n", "é😀"]), label="text")
        client_id = data.draw(st.sampled_from(["new", "absent", "null"]), label="client_id")
        for _ in range(data.draw(st.integers(1, 3), label="count")):
            # A client_id of null is the same as none.
            self._send(device, text, f"c{next(_client_ids)}" if client_id == "new" else None, client_id == "null")

    @precondition(lambda self: self.model.messages)
    @rule(device=st.sampled_from((0, 1)), text=st.sampled_from(["ok", "sure"]))
    def reply(self, device: int, text: str) -> None:
        """The party that did not send the last message answers it (so that each has unread messages to read)."""
        last_sender = self.model.messages[-1]["sender"]
        user = next(user for user in USERS if self.model.names[user] != last_sender)
        self._send((user, device), text, f"c{next(_client_ids)}")

    @precondition(lambda self: self.model.by_client_id)
    @rule(device=st.sampled_from(DEVICES), data=st.data(), same_text=st.booleans())
    def send_again(self, device: tuple[str, int], data: st.DataObject, same_text: bool) -> None:
        """A used client_id: a retry (the same sender), a clash (another text), or the peer's (a new message)."""
        used = sorted(self.model.by_client_id.items())
        (_, client_id), original = data.draw(st.sampled_from(used), label="used")
        self._send(device, original["text"] if same_text else original["text"] + "!", client_id)

    def _send(self, device: tuple[str, int], text: str, client_id: str | None, say_null: bool = False) -> None:
        user = device[0]
        body: Json = {"text": text}
        if client_id is not None or say_null:
            body["client_id"] = client_id
        answer = self.client.post(f"{self._conversation_path()}/messages", json=body, headers=self.tokens[device])
        original = self.model.by_client_id.get((user, client_id)) if client_id else None
        if original is not None and original["text"] == text:
            assert answer.status_code == 200, answer.json
            assert answer.json == original
            return
        if original is not None:
            assert answer.status_code == 409, answer.json
            assert answer.json["error"]["code"] == "client_id_reused"
            return
        assert answer.status_code == 201, answer.json
        message = answer.json
        expected = {
            "conversation_id": self.model.conversation["id"],
            "seq": self.model.last_seq + 1,
            "sender": self.model.names[user],
            "text": text,
            "client_id": client_id,
        }
        assert {key: message[key] for key in expected} == expected
        assert set(message) == {*expected, "id", "created_at"}
        assert message["id"] > self.last_message_id
        self.last_message_id = message["id"]
        if self.model.messages:
            assert message["created_at"] >= self.model.messages[-1]["created_at"]
        self.model.send(user, message)

    @rule(device=st.sampled_from(DEVICES), data=st.data())
    def poll_events(self, device: tuple[str, int], data: st.DataObject) -> None:
        """A poll of the stream from the device's cursor (or elsewhere). Then perhaps, as a client showing the
        conversation does, the device marks read the last message it got, and perhaps polls on from its cursor
        (which acknowledges what it got)."""
        where = data.draw(
            st.sampled_from(["cursor", "cursor", "cursor", "catch up", "older", "zero", "omitted", "beyond"]),
            label="where",
        )
        back = data.draw(st.integers(0, 4), label="back") if where in ("older", "beyond") else 0
        limit = data.draw(st.sampled_from([None, 1, 2, 3, 5]), label="limit")
        then = data.draw(st.sampled_from(["read", "read and poll on", "nothing"]), label="then")
        cursor = self.cursors[device]
        if where == "cursor":
            events = self._resume(device, limit)
        elif where == "catch up":
            events = self.catch_up(device)
        else:
            # Not from its cursor: the device looks, and its cursor stays where it was.
            after = {
                "older": max(0, cursor - 1 - back),
                "zero": 0,
                "omitted": 0,
                "beyond": self.model.head(device[0]) + 1 + back,
            }[where]
            events = self._poll_events(device, after, limit, say_after=where != "omitted")
        seqs = [event["message"]["seq"] for event in events if event["type"] == "message"]
        if then != "nothing" and seqs:
            self._read(device, seqs[-1])
        if then == "read and poll on":
            self._resume(device, limit)

    def _look_with_head(self, device: tuple[str, int], stream: bool) -> None:
        """HEAD looks without reading: from the head of the stream or of the conversation, it acknowledges nothing."""
        if stream:
            path, after = f"{API}/events", self.model.head(device[0])
        else:
            path, after = f"{self._conversation_path()}/messages", self.model.last_seq
        started = time.monotonic()
        answer = self.client.head(path, query_string={"after": after, "timeout": 5}, headers=self.tokens[device])
        assert answer.status_code == 200
        assert time.monotonic() - started < 4, "HEAD waited"

    @rule(device=st.sampled_from(DEVICES), data=st.data())
    def poll_messages(self, device: tuple[str, int], data: st.DataObject) -> None:
        user = device[0]
        model = self.model
        after = _draw_seq(data, "after", model.delivered[user], model.last_seq, 2)
        limit = data.draw(st.sampled_from([None, 1, 2, 3]), label="limit")
        answer = self._messages(device, limit, after=after, timeout=0)
        model.acknowledge_messages(user, after)
        expected = model.messages[after : after + (limit or 100)]
        assert answer == {"messages": expected, "last_seq": model.last_seq}

    def _message_history(self, device: tuple[str, int], data: st.DataObject, limit: int | None) -> None:
        """History (`before`, or neither cursor) never acknowledges delivery."""
        model = self.model
        before = data.draw(st.none() | st.integers(1, model.last_seq + 2), label="before")
        answer = self._messages(device, limit, **({} if before is None else {"before": before}))
        below = model.messages if before is None else model.messages[: max(0, before - 1)]
        expected = below[-(limit or 100) :]
        assert answer == {"messages": expected, "last_seq": model.last_seq}

    @rule(device=st.sampled_from(DEVICES), data=st.data())
    def mark_read(self, device: tuple[str, int], data: st.DataObject) -> None:
        self._read(device, _draw_seq(data, "seq", self.model.read[device[0]], self.model.last_seq, 3))

    def _read(self, device: tuple[str, int], seq: int) -> None:
        user = device[0]
        model = self.model
        answer = self.client.post(f"{self._conversation_path()}/read", json={"seq": seq}, headers=self.tokens[device])
        if seq > model.last_seq:
            assert answer.status_code == 400, answer.json
            assert answer.json["error"]["code"] == "invalid_seq"
            return
        assert answer.status_code == 200, answer.json
        model.mark_read(user, seq)
        assert answer.json == model.view(user)

    @rule(
        device=st.sampled_from(DEVICES),
        what=st.sampled_from(["conversation", "history", "head of stream", "head of messages", "start again"]),
        data=st.data(),
        limit=st.sampled_from([None, 1, 2]),
    )
    def look(self, device: tuple[str, int], what: str, data: st.DataObject, limit: int | None) -> None:
        """Requests that change nothing: the conversation, its history, HEAD, starting it again."""
        user = device[0]
        if what == "history":
            self._message_history(device, data, limit)
        elif what.startswith("head of"):
            self._look_with_head(device, stream=what == "head of stream")
        elif what == "start again":
            self.start_conversation(user, upper=limit is None)
        else:
            answer = self.client.get(self._conversation_path(), headers=self.tokens[device])
            assert answer.status_code == 200, answer.json
            assert answer.json == self.model.view(user)

    @precondition(lambda self: self.waiting is None)
    @rule(device=st.sampled_from(DEVICES), data=st.data())
    def wait_for_events(self, device: tuple[str, int], data: st.DataObject) -> None:
        """The device catches up and long-polls at the head; the steps after it wake it (`woken_poll_answers`),
        or at once the peer (one of whose devices polls, reads, polls the messages or sends)."""
        limit = data.draw(st.sampled_from([None, 1, 2]), label="limit")
        self.catch_up(device)
        after = self.cursors[device]
        poll = gevent.spawn(self._get_events, device, after, limit, 30)
        wakeups = self.client.application.extensions["chatapi"].wakeups
        deadline = time.monotonic() + 10
        while wakeups.waiting < 1 and not poll.ready():
            assert time.monotonic() < deadline, "the long-poll neither waits nor answers"
            gevent.sleep(0.005)
        self.model.acknowledge_events(device[0], after)
        self.waiting = Waiting(device, after, limit, poll)
        peer = (other(device[0]), data.draw(st.integers(0, 1), label="peer's device"))
        wake = {"polls": self.poll_events, "reads": self.mark_read, "polls messages": self.poll_messages}
        wake["sends"] = self.send
        by = data.draw(st.sampled_from(["nobody yet", *wake]), label="woken by")
        if by in wake:
            wake[by](peer, data)

    # Invariants --------------------------------------------------------------

    @invariant()
    def model_is_consistent(self) -> None:
        model = self.model
        assert [m["seq"] for m in model.messages] == list(range(1, model.last_seq + 1))
        for user in USERS:
            assert [e["pos"] for e in model.streams[user]] == list(range(1, model.head(user) + 1))
            assert model.read[user] <= model.delivered[user] <= model.last_seq
            # Each receipt is a growth: of the subject's marks as the stream told them last.
            told: dict[str, tuple[int, int]] = {}
            for event in model.streams[user]:
                if event["type"] == "receipt":
                    marks = (event["delivered_seq"], event["read_seq"])
                    last = told.get(event["user"], (0, 0))
                    assert marks[1] <= marks[0] and marks != last
                    assert marks[0] >= last[0] and marks[1] >= last[1]
                    told[event["user"]] = marks

    @invariant()
    def woken_poll_answers(self) -> None:
        """A waiting long-poll answers once its stream has more, with what the model says (often from the events
        its wake-up carried)."""
        if self.waiting is None:
            return
        device, after, limit, poll = self.waiting
        if self.model.head(device[0]) == after:
            # Nothing to answer with yet. (Whether it has answered anyway is not asked:
            # on PostgreSQL that would depend on how soon a stray wake-up arrives.)
            return
        poll.join(5)
        assert poll.ready(), "a long-poll slept through a new event of its stream"
        self.waiting = None
        events = self._check_events(device, after, limit, poll.get())
        if self.cursors[device] == after:
            self.cursors[device] = events[-1]["pos"]

    def teardown(self) -> None:
        if self.waiting is not None:
            self.waiting.poll.kill()

    @invariant()
    def both_views_match(self) -> None:
        """Both parties' conversation lists (which acknowledge nothing) show the model's marks."""
        for user in USERS:
            answer = self.client.get(f"{API}/conversations", headers=self.tokens[(user, 0)])
            assert answer.status_code == 200, answer.json
            expected = [self.model.view(user)] if self.model.conversation else []
            assert answer.json == {"conversations": expected}, user


@pytest.fixture
def app(app_on_each_database: Flask) -> Flask:
    """The machine runs on both databases: on PostgreSQL the hot paths are pg_functions.py's."""
    return app_on_each_database


def test_chat_rules_follow_the_model(client, monkeypatch) -> None:
    # A cheap argon2 for the machine's own sign-ups (each run signs up two users
    # with two tokens each); what the hashing costs is tested elsewhere.
    monkeypatch.setattr(auth, "_hasher", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    run_state_machine_as_test(lambda: ChatRules(client), settings=RULES_SETTINGS)
