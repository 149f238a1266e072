"""A model-based (stateful) test of the chat rules, on SQLite and on PostgreSQL.

Hypothesis drives the real app through Flask's test client with random runs
of the contract's requests: alice, bob and carol, each on two devices (tokens),
in two conversations (alice's with bob and with carol, so that alice's one
stream interleaves both, and her list orders two), send (with new client_ids,
none, null, or used ones: a retry, a clash, the peer's, another conversation's),
poll the event stream from their cursors (or from older ones, from 0, from
beyond the head; small limits, so pages get cut) and read what they got, wait
on the stream until something wakes them, poll the conversation's messages
(which acknowledges delivery too), read (below, at and beyond `last_seq`),
and look (the conversation, its history, HEAD, starting it again). `Model` is
what API.md says should happen, written from it rather than from chat.py:
after every step each answer, each event page (woken long-polls' too, mostly
answered from the events their wake-up carried) and every user's
conversation list (its order too) must be what the model says. The app's
clock is the machine's: it stands still unless a step moves it on or back,
so that sends and starts share times (the list's ties) or go back in time.

On PostgreSQL the sends and the event stream's acknowledgements run as
server-side functions (pg_functions.py), on SQLite as the Python steps of
chat.py: the same machine checks both. Not covered here: concurrent polls
that PostgreSQL commits as one batch (test_batches_pg.py).
"""

from __future__ import annotations

import itertools
import os
import time
from datetime import datetime, timedelta
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

from chatapi import auth, chat, wire

API = "/api/v1"
PASSWORD = "correct horse battery"
USERS = ("alice", "bob", "carol")
PAIRS = (("alice", "bob"), ("alice", "carol"))  # the conversations: alice is in both
DEVICES = [(user, device) for user in USERS for device in (0, 1)]
# Where each run's clock starts (it stands still until a step moves it).
EPOCH = datetime(2100, 1, 2, 3, 4, 5)
# Each run makes its own users (a pair has one conversation); names stay unique in the app.
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


def other(pair: tuple[str, str], user: str) -> str:
    return pair[1] if user == pair[0] else pair[0]


def _draw_seq(data: st.DataObject, label: str, mark: int, last_seq: int, beyond: int) -> int:
    """A seq for a user whose mark is `mark`: mostly one that moves it (the simplest one does: all the
    way, as a client that shows the whole conversation does), else the mark itself or any from 0 to
    `beyond` past `last_seq`."""
    moves = [st.just(last_seq), st.integers(mark + 1, last_seq)] if mark < last_seq else []
    return data.draw(st.one_of(*moves, st.just(mark), st.integers(0, last_seq + beyond)), label=label)


class Conversation:
    """One conversation's state in the model: its messages and both parties' marks."""

    def __init__(self, pair: tuple[str, str], conversation_id: int, created_at: str) -> None:
        self.pair = pair
        self.id = conversation_id
        self.created_at = created_at
        self.messages: list[Json] = []  # message objects, index = seq - 1
        self.by_client_id: dict[tuple[str, str], Json] = {}
        self.delivered = dict.fromkeys(pair, 0)
        self.read = dict.fromkeys(pair, 0)

    @property
    def last_seq(self) -> int:
        return len(self.messages)

    @property
    def activity(self) -> str:
        """Its last activity (docs/api.md): its last message's time, else its start's."""
        return self.messages[-1]["created_at"] if self.messages else self.created_at


class Model:
    """The contract's rules for alice's conversations with bob and with carol, in plain Python (API.md):
    each conversation's own seq and marks, and each user's one stream."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names  # model user -> username on the server
        self.conversations: dict[tuple[str, str], Conversation] = {}  # by pair, once started
        self.streams: dict[str, list[Json]] = {user: [] for user in USERS}  # index = pos - 1

    def of(self, user: str) -> list[Conversation]:
        """`user`'s conversations, by id."""
        return sorted((c for c in self.conversations.values() if user in c.pair), key=lambda c: c.id)

    def by_id(self, conversation_id: int) -> Conversation:
        return next(c for c in self.conversations.values() if c.id == conversation_id)

    def head(self, user: str) -> int:
        return len(self.streams[user])

    def _append(self, user: str, event: Json) -> None:
        self.streams[user].append({"pos": self.head(user) + 1, **event})

    def _receipt(self, conversation: Conversation, subject: str) -> Json:
        return {
            "type": "receipt",
            "conversation_id": conversation.id,
            "user": self.names[subject],
            "delivered_seq": conversation.delivered[subject],
            "read_seq": conversation.read[subject],
        }

    def _grow(self, conversation: Conversation, user: str, *, delivered: int = 0, read: int = 0) -> None:
        """Move `user`'s marks up (never down; reading implies delivery); a receipt to both parties if one grew."""
        c = conversation
        before = (c.delivered[user], c.read[user])
        c.read[user] = max(c.read[user], read)
        c.delivered[user] = max(c.delivered[user], delivered, c.read[user])
        if (c.delivered[user], c.read[user]) != before:
            receipt = self._receipt(c, user)
            for party in c.pair:
                self._append(party, receipt)

    def start(self, pair: tuple[str, str], conversation_id: int, created_at: str) -> None:
        conversation = self.conversations[pair] = Conversation(pair, conversation_id, created_at)
        for user in pair:
            self._append(user, {"type": "conversation", "conversation": self.view(conversation, user)})

    def send(self, conversation: Conversation, sender: str, message: Json) -> None:
        conversation.messages.append(message)
        if message["client_id"] is not None:
            conversation.by_client_id[(sender, message["client_id"])] = message
        # Sending counts as reading: the sender's marks move to its own message.
        conversation.read[sender] = conversation.delivered[sender] = message["seq"]
        for user in conversation.pair:
            self._append(user, {"type": "message", "message": message})
            self._append(user, self._receipt(conversation, sender))

    def acknowledge_events(self, user: str, after: int) -> None:
        """A poll of the stream `after` P: every message event at pos <= P (up to the head) is delivered,
        each conversation's receipt in the order of their ids (which API.md leaves unsaid: chat.py's order)."""
        seen = [e["message"] for e in self.streams[user][: min(after, self.head(user))] if e["type"] == "message"]
        for c in self.of(user):
            self._grow(c, user, delivered=max((m["seq"] for m in seen if m["conversation_id"] == c.id), default=0))

    def acknowledge_messages(self, conversation: Conversation, user: str, after: int) -> None:
        """A poll of the conversation's messages `after` N: delivered up to N (up to last_seq)."""
        self._grow(conversation, user, delivered=min(after, conversation.last_seq))

    def mark_read(self, conversation: Conversation, user: str, seq: int) -> None:
        self._grow(conversation, user, read=seq)

    def view(self, conversation: Conversation, user: str) -> Json:
        """The conversation object as `user` sees it."""
        c = conversation
        peer = other(c.pair, user)
        return {
            "id": c.id,
            "peer": self.names[peer],
            "created_at": c.created_at,
            "last_seq": c.last_seq,
            "unread": sum(1 for m in c.messages[c.read[user] :] if m["sender"] == self.names[peer]),
            "read_seq": c.read[user],
            "peer_delivered_seq": c.delivered[peer],
            "peer_read_seq": c.read[peer],
            "last_message": c.messages[-1] if c.messages else None,
        }

    def listing(self, user: str) -> list[Json]:
        """`user`'s conversation list: the most recent activity first, ties by the higher id first."""
        ordered = sorted(self.of(user), key=lambda c: (c.activity, c.id), reverse=True)
        return [self.view(c, user) for c in ordered]


class Waiting(NamedTuple):
    """A device's long-poll of its stream, from its cursor at the head, in a greenlet of its own."""

    device: tuple[str, int]
    after: int
    limit: int | None
    poll: gevent.Greenlet


class Clock:
    """The app's clock (chat.utcnow), which the machine moves."""

    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> datetime:
        return self.now

    @property
    def spelled(self) -> str:
        return wire.rfc3339(self.now)


class ChatRules(RuleBasedStateMachine):
    def __init__(self, client, clock: Clock) -> None:
        super().__init__()
        self.client = client
        self.clock = clock
        clock.now = EPOCH
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

    def _draw_conversation(self, data: st.DataObject, user: str) -> Conversation:
        """One of `user`'s conversations (alice has two)."""
        return data.draw(st.sampled_from(self.model.of(user)), label="conversation")

    def _conversation_path(self, conversation: Conversation) -> str:
        return f"{API}/conversations/{conversation.id}"

    def _messages(self, device: tuple[str, int], conversation: Conversation, limit: int | None, **query: int) -> Json:
        """The device's GET of the conversation's messages with `query` (and `limit`, unless None)."""
        if limit is not None:
            query["limit"] = limit
        path = f"{self._conversation_path(conversation)}/messages"
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

    def start_conversation(self, pair: tuple[str, str], user: str, upper: bool) -> None:
        """`user` starts the pair's conversation with the peer (its name in capitals, if `upper`)."""
        peer = self.model.names[other(pair, user)]
        answer = self.client.post(
            f"{API}/conversations", json={"peer": peer.upper() if upper else peer}, headers=self.tokens[(user, 0)]
        )
        if pair not in self.model.conversations:
            assert answer.status_code == 201, answer.json
            assert answer.json["created_at"] == self.clock.spelled
            self.model.start(pair, answer.json["id"], answer.json["created_at"])
        else:
            # Asking again for an existing one emits nothing.
            assert answer.status_code == 200, answer.json
        assert answer.json == self.model.view(self.model.conversations[pair], user)

    @initialize(first=st.sampled_from(PAIRS), starters=st.tuples(st.integers(0, 1), st.integers(0, 1)), data=st.data())
    def started(self, first: tuple[str, str], starters: tuple[int, int], data: st.DataObject) -> None:
        """Every run starts with both conversations, in either order, at the same time or not (a step that starts
        one again gets it, and changes nothing)."""
        second = next(pair for pair in PAIRS if pair != first)
        self.start_conversation(first, first[starters[0]], upper=False)
        self.move_clock(data.draw(st.sampled_from([0, 1, -1]), label="ms"))
        self.start_conversation(second, second[starters[1]], upper=True)

    @rule(ms=st.sampled_from([1, -1]))
    def move_clock(self, ms: int) -> None:
        """The clock moves on, or back (a send then takes its conversation's last time: `_send`)."""
        self.clock.now += timedelta(milliseconds=ms)

    # Most rules take a device and draw the rest: Hypothesis favours the rules
    # with fewer arguments, and these are the ones that move the state.
    @rule(device=st.sampled_from(DEVICES), data=st.data())
    def send(self, device: tuple[str, int], data: st.DataObject) -> None:
        """One to three new messages from the device, one after the other."""
        conversation = self._draw_conversation(data, device[0])
        text = data.draw(st.sampled_from(["hi", "hello there", " spaced\tout\n", "é😀"]), label="text")
        client_id = data.draw(st.sampled_from(["new", "absent", "null"]), label="client_id")
        for _ in range(data.draw(st.integers(1, 3), label="count")):
            # A client_id of null is the same as none.
            new_id = f"c{next(_client_ids)}" if client_id == "new" else None
            self._send(device, conversation, text, new_id, client_id == "null")

    @precondition(lambda self: any(c.messages for c in self.model.conversations.values()))
    @rule(data=st.data(), device=st.sampled_from((0, 1)), text=st.sampled_from(["ok", "sure"]))
    def reply(self, data: st.DataObject, device: int, text: str) -> None:
        """The party that did not send a conversation's last message answers it (so that each has unread messages
        to read). Or bob and carol each write to alice, whose device then catches up: its last poll delivers both
        conversations at once (a receipt for each, to that conversation's peer, in the order of their ids)."""
        answering = [c for c in self.model.of("alice") if c.messages]
        conversation = data.draw(st.sampled_from([*answering, None, None]), label="in")
        if conversation is None:
            for c in self.model.of("alice"):
                self._send((other(c.pair, "alice"), device), c, text, f"c{next(_client_ids)}")
            self.catch_up(("alice", device))
            return
        last_sender = conversation.messages[-1]["sender"]
        user = next(user for user in conversation.pair if self.model.names[user] != last_sender)
        self._send((user, device), conversation, text, f"c{next(_client_ids)}")

    @precondition(lambda self: any(c.by_client_id for c in self.model.conversations.values()))
    @rule(data=st.data(), same_text=st.booleans())
    def send_again(self, data: st.DataObject, same_text: bool) -> None:
        """A used client_id: a retry (the same sender), a clash (another text), the peer's (a new message), or one
        used in the sender's other conversation (a new message too)."""
        used = [(pair, *entry) for pair, c in self.model.conversations.items() for entry in c.by_client_id.items()]
        _, (_, client_id), original = data.draw(st.sampled_from(sorted(used)), label="used")
        conversation = data.draw(st.sampled_from(self.model.of("alice")), label="in")
        device = data.draw(st.sampled_from([d for d in DEVICES if d[0] in conversation.pair]), label="device")
        self._send(device, conversation, original["text"] if same_text else original["text"] + "!", client_id)

    def _send(
        self,
        device: tuple[str, int],
        conversation: Conversation,
        text: str,
        client_id: str | None,
        say_null: bool = False,
    ) -> None:
        user = device[0]
        body: Json = {"text": text}
        if client_id is not None or say_null:
            body["client_id"] = client_id
        path = f"{self._conversation_path(conversation)}/messages"
        answer = self.client.post(path, json=body, headers=self.tokens[device])
        original = conversation.by_client_id.get((user, client_id)) if client_id else None
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
            "conversation_id": conversation.id,
            "seq": conversation.last_seq + 1,
            "sender": self.model.names[user],
            "text": text,
            "client_id": client_id,
            # The clock's time, unless the conversation's last activity is later (a clock gone back).
            "created_at": max(self.clock.spelled, conversation.activity),
        }
        assert {key: message[key] for key in expected} == expected
        assert set(message) == {*expected, "id"}
        assert message["id"] > self.last_message_id
        self.last_message_id = message["id"]
        self.model.send(conversation, user, message)

    @rule(device=st.sampled_from(DEVICES), data=st.data())
    def poll_events(self, device: tuple[str, int], data: st.DataObject) -> None:
        """A poll of the stream from the device's cursor (or elsewhere). Then perhaps, as a client showing the
        conversation does, the device marks read the last message it got (in that message's conversation), and
        perhaps polls on from its cursor (which acknowledges what it got)."""
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
        messages = [event["message"] for event in events if event["type"] == "message"]
        if then != "nothing" and messages:
            self._read(device, self.model.by_id(messages[-1]["conversation_id"]), messages[-1]["seq"])
        if then == "read and poll on":
            self._resume(device, limit)

    def _look_with_head(self, device: tuple[str, int], conversation: Conversation, stream: bool) -> None:
        """HEAD looks without reading: from the head of the stream or of the conversation, it acknowledges nothing."""
        if stream:
            path, after = f"{API}/events", self.model.head(device[0])
        else:
            path, after = f"{self._conversation_path(conversation)}/messages", conversation.last_seq
        started = time.monotonic()
        answer = self.client.head(path, query_string={"after": after, "timeout": 5}, headers=self.tokens[device])
        assert answer.status_code == 200
        assert time.monotonic() - started < 4, "HEAD waited"

    @rule(device=st.sampled_from(DEVICES), data=st.data())
    def poll_messages(self, device: tuple[str, int], data: st.DataObject) -> None:
        user = device[0]
        conversation = self._draw_conversation(data, user)
        after = _draw_seq(data, "after", conversation.delivered[user], conversation.last_seq, 2)
        limit = data.draw(st.sampled_from([None, 1, 2, 3]), label="limit")
        answer = self._messages(device, conversation, limit, after=after, timeout=0)
        self.model.acknowledge_messages(conversation, user, after)
        expected = conversation.messages[after : after + (limit or 100)]
        assert answer == {"messages": expected, "last_seq": conversation.last_seq}

    def _message_history(
        self, device: tuple[str, int], conversation: Conversation, data: st.DataObject, limit: int | None
    ) -> None:
        """History (`before`, or neither cursor) never acknowledges delivery."""
        c = conversation
        before = data.draw(st.none() | st.integers(1, c.last_seq + 2), label="before")
        answer = self._messages(device, c, limit, **({} if before is None else {"before": before}))
        below = c.messages if before is None else c.messages[: max(0, before - 1)]
        expected = below[-(limit or 100) :]
        assert answer == {"messages": expected, "last_seq": c.last_seq}

    @rule(device=st.sampled_from(DEVICES), data=st.data())
    def mark_read(self, device: tuple[str, int], data: st.DataObject) -> None:
        conversation = self._draw_conversation(data, device[0])
        seq = _draw_seq(data, "seq", conversation.read[device[0]], conversation.last_seq, 3)
        self._read(device, conversation, seq)

    def _read(self, device: tuple[str, int], conversation: Conversation, seq: int) -> None:
        user = device[0]
        path = f"{self._conversation_path(conversation)}/read"
        answer = self.client.post(path, json={"seq": seq}, headers=self.tokens[device])
        if seq > conversation.last_seq:
            assert answer.status_code == 400, answer.json
            assert answer.json["error"]["code"] == "invalid_seq"
            return
        assert answer.status_code == 200, answer.json
        self.model.mark_read(conversation, user, seq)
        assert answer.json == self.model.view(conversation, user)

    @rule(
        device=st.sampled_from(DEVICES),
        what=st.sampled_from(["conversation", "history", "head of stream", "head of messages", "start again"]),
        data=st.data(),
        limit=st.sampled_from([None, 1, 2]),
    )
    def look(self, device: tuple[str, int], what: str, data: st.DataObject, limit: int | None) -> None:
        """Requests that change nothing: a conversation, its history, HEAD, starting it again."""
        user = device[0]
        conversation = self._draw_conversation(data, user)
        if what == "history":
            self._message_history(device, conversation, data, limit)
        elif what.startswith("head of"):
            self._look_with_head(device, conversation, stream=what == "head of stream")
        elif what == "start again":
            self.start_conversation(conversation.pair, user, upper=limit is None)
        else:
            answer = self.client.get(self._conversation_path(conversation), headers=self.tokens[device])
            assert answer.status_code == 200, answer.json
            assert answer.json == self.model.view(conversation, user)

    @precondition(lambda self: self.waiting is None)
    @rule(device=st.sampled_from(DEVICES), data=st.data())
    def wait_for_events(self, device: tuple[str, int], data: st.DataObject) -> None:
        """The device catches up and long-polls at the head; the steps after it wake it (`woken_poll_answers`),
        or at once a peer (one of whose devices polls, reads, polls the messages or sends: perhaps in alice's
        other conversation, which does not wake it)."""
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
        pair = self._draw_conversation(data, device[0]).pair
        peer = (other(pair, device[0]), data.draw(st.integers(0, 1), label="peer's device"))
        wake = {"polls": self.poll_events, "reads": self.mark_read, "polls messages": self.poll_messages}
        wake["sends"] = self.send
        by = data.draw(st.sampled_from(["nobody yet", *wake]), label="woken by")
        if by in wake:
            wake[by](peer, data)

    # Invariants --------------------------------------------------------------

    @invariant()
    def model_is_consistent(self) -> None:
        model = self.model
        for c in model.conversations.values():
            assert [m["seq"] for m in c.messages] == list(range(1, c.last_seq + 1))
            for user in c.pair:
                assert c.read[user] <= c.delivered[user] <= c.last_seq
        for user in USERS:
            assert [e["pos"] for e in model.streams[user]] == list(range(1, model.head(user) + 1))
            # Each receipt is a growth: of the subject's marks in its conversation as the stream told them last.
            told: dict[tuple[int, str], tuple[int, int]] = {}
            for event in model.streams[user]:
                if event["type"] == "receipt":
                    assert model.by_id(event["conversation_id"]) in model.of(user)
                    subject = (event["conversation_id"], event["user"])
                    marks = (event["delivered_seq"], event["read_seq"])
                    last = told.get(subject, (0, 0))
                    assert marks[1] <= marks[0] and marks != last
                    assert marks[0] >= last[0] and marks[1] >= last[1]
                    told[subject] = marks

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
    def every_list_matches(self) -> None:
        """Every user's conversation list (which acknowledges nothing) shows the model's marks, in its order."""
        for user in USERS:
            answer = self.client.get(f"{API}/conversations", headers=self.tokens[(user, 0)])
            assert answer.status_code == 200, answer.json
            assert answer.json == {"conversations": self.model.listing(user)}, user


@pytest.fixture
def app(app_on_each_database: Flask) -> Flask:
    """The machine runs on both databases: on PostgreSQL the hot paths are pg_functions.py's."""
    return app_on_each_database


def test_chat_rules_follow_the_model(client, monkeypatch) -> None:
    # A cheap argon2 for the machine's own sign-ups (each run signs up three users
    # with two tokens each); what the hashing costs is tested elsewhere.
    monkeypatch.setattr(auth, "_hasher", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    clock = Clock()
    monkeypatch.setattr(chat, "utcnow", clock)
    run_state_machine_as_test(lambda: ChatRules(client, clock), settings=RULES_SETTINGS)
