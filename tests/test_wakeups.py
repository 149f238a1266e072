"""The per-process waiter registry: who is woken, the per-user cap, and the events a wake-up carries
(within a process, and across processes in notification payloads)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable

import gevent
import pytest

from chatapi import notify_pg
from chatapi.auth import token_digest
from chatapi.longpoll import Page, pushed_events
from chatapi.wakeups import (
    RECENT_WAKEUPS,
    WAKE_ALL,
    Pushed,
    Wakeups,
    add_pushed,
    conversation_key,
    token_key,
    user_key,
)
from tests.conftest import Accounts, make_app, migrate
from tests.support.postgres import execute


def test_only_the_concerned_waiters_wake() -> None:
    wakeups = Wakeups(max_waiters_per_user=8)
    with (
        wakeups.listening([user_key(1)], 1) as alice,
        wakeups.listening([user_key(2)], 2) as bob,
        wakeups.listening([conversation_key(7)], 1) as alice_in_chat,
    ):
        assert wakeups.wake([user_key(2), conversation_key(7)]) == 2
        assert bob.woken and alice_in_chat.woken
        assert not alice.woken


def test_a_wake_between_the_check_and_the_wait_is_not_lost() -> None:
    """A request notes `sequence`, checks the database, then registers: a wake-up in between counts."""
    wakeups = Wakeups(max_waiters_per_user=8)
    since = wakeups.sequence
    wakeups.wake([user_key(1)])  # the commit the check did not see yet
    with wakeups.listening([user_key(1)], 1, since=since) as waiter:
        started = gevent.get_hub().loop.now()
        waiter.wait(5)
        assert gevent.get_hub().loop.now() - started < 1


def test_a_wake_for_others_before_the_wait_is_not_a_wake() -> None:
    wakeups = Wakeups(max_waiters_per_user=8)
    wakeups.wake([user_key(1)])
    since = wakeups.sequence
    wakeups.wake([user_key(2), conversation_key(1)])
    with wakeups.listening([user_key(1)], 1, since=since) as waiter:
        assert not waiter.woken


def test_a_wake_all_or_forgotten_wakes_before_the_wait_count() -> None:
    wakeups = Wakeups(max_waiters_per_user=8)
    since = wakeups.sequence
    wakeups.wake_all()
    with wakeups.listening([user_key(1)], 1, since=since) as waiter:
        assert waiter.woken
    since = wakeups.sequence
    for other in range(2, 2 + RECENT_WAKEUPS + 1):
        wakeups.wake([user_key(other)])
    with wakeups.listening([user_key(1)], 1, since=since) as waiter:
        assert waiter.woken, "too many wake-ups to tell: must re-check"


def test_new_waiter_beyond_the_cap_answers_the_oldest() -> None:
    wakeups = Wakeups(max_waiters_per_user=2)
    with wakeups.listening([user_key(1)], 1) as oldest, wakeups.listening([user_key(1)], 1) as middle:
        assert not oldest.cut_short
        with wakeups.listening([user_key(1)], 1) as newest:
            assert oldest.cut_short and oldest.woken
            assert not middle.cut_short and not newest.cut_short
    assert wakeups.waiting == 0


def test_drain_answers_everyone_and_refuses_new_waits() -> None:
    wakeups = Wakeups(max_waiters_per_user=8)
    with wakeups.listening([user_key(1)], 1) as waiting:
        wakeups.drain()
        assert waiting.cut_short and waiting.woken
    with wakeups.listening([user_key(1)], 1) as late:
        assert late.cut_short


def test_waiting_gauge_follows_registrations() -> None:
    changes: list[int] = []
    wakeups = Wakeups(max_waiters_per_user=8, on_wait_change=changes.append)
    with wakeups.listening([user_key(1)], 1):
        assert wakeups.waiting == 1
    assert changes == [1, -1] and wakeups.waiting == 0


def test_a_sleeping_waiter_wakes_once_per_wake_up_and_times_out_otherwise() -> None:
    """Woken from another greenlet while asleep: True; nothing left over for the next wait, which times out."""
    wakeups = Wakeups(max_waiters_per_user=8)
    with wakeups.listening([user_key(1)], 1) as waiter:
        sleeper = gevent.spawn(waiter.wait, 30)
        gevent.sleep(0.01)
        assert not sleeper.ready()
        wakeups.wake([user_key(1)])
        wakeups.wake([user_key(1)])  # a second wake-up before it runs: still one return
        assert sleeper.get(timeout=5) is True
        assert not waiter.woken
        started = gevent.get_hub().loop.now()
        assert waiter.wait(0.2) is False
        assert gevent.get_hub().loop.now() - started >= 0.15
        wakeups.wake([user_key(1)])  # while not asleep: the next wait returns at once
        assert waiter.wait(30) is True


def test_a_killed_sleeper_leaves_no_wake_up_behind() -> None:
    """A wake-up scheduled for a wait that was then interrupted must not reach a later wait."""
    wakeups = Wakeups(max_waiters_per_user=8)
    with wakeups.listening([user_key(1)], 1) as waiter:
        sleeper = gevent.spawn(waiter.wait, 30)
        gevent.sleep(0.01)
        sleeper.kill(block=True)
        assert waiter.wait(0.05) is False
        wakeups.wake([user_key(1)])
        assert waiter.wait(0.05) is True
        assert waiter.wait(0.05) is False
    assert wakeups.waiting == 0


# Pushed events: a wake-up that carries the new events of a user's stream.


def _event(pos: int) -> dict:
    return {"pos": pos, "type": "receipt", "conversation_id": 1, "user": "a", "delivered_seq": 1, "read_seq": 1}


def test_a_wake_up_hands_each_waiter_its_users_events() -> None:
    wakeups = Wakeups(max_waiters_per_user=8)
    with wakeups.listening([user_key(1)], 1) as alice, wakeups.listening([user_key(2)], 2) as bob:
        wakeups.wake([user_key(1), user_key(2)], {1: [_event(5), _event(6)]})
        assert alice.take_pushed() == [_event(5), _event(6)]
        assert alice.take_pushed() is None  # taken
        assert bob.take_pushed() is None  # woken, but nothing pushed for bob: he must query


def test_one_wake_up_without_events_makes_the_waiter_query() -> None:
    wakeups = Wakeups(max_waiters_per_user=8)
    with wakeups.listening([user_key(1)], 1) as alice:
        wakeups.wake([user_key(1)], {1: [_event(5)]})
        wakeups.wake([user_key(1)])  # e.g. a revoked token: what it means is not in any event
        assert alice.take_pushed() is None
    with wakeups.listening([user_key(1)], 1) as alice:
        wakeups.wake([user_key(1)], {1: [_event(5)]})
        wakeups.wake_all()
        assert alice.take_pushed() is None


def test_a_waiter_woken_through_its_token_queries_whatever_its_user_was_pushed() -> None:
    """A revoked token wakes its polls (token_key) to answer 401: a wake-up that also
    carries the user's new events (a send coalesced with the revocation, in one round
    of a publisher or one batch of a listener) must not answer the revoked poll with them."""
    wakeups = Wakeups(max_waiters_per_user=8)
    revoked, kept = token_key("a" * 64), token_key("b" * 64)
    with wakeups.listening([user_key(1), revoked], 1) as on_revoked, wakeups.listening([user_key(1), kept], 1) as other:
        wakeups.wake([revoked, user_key(1)], {1: [_event(5)]})
        assert on_revoked.take_pushed() is None
        assert other.take_pushed() == [_event(5)]  # the user's other tokens keep their pushed events


def test_a_revocation_heard_with_a_send_makes_the_revoked_poll_query() -> None:
    """Across processes: the other process's round carried both, in one payload or in two."""
    wakeups = Wakeups(max_waiters_per_user=8)
    notifier = notify_pg.PostgresNotifier("postgresql://unused", wakeups)
    notifier._signing_key = KEY
    revoked = token_key("a" * 64)
    one_payload = notify_pg._payloads("other", sorted([revoked, user_key(1)]), {1: [_event(5)]}, KEY)
    two_payloads = [
        *notify_pg._payloads("other", [revoked], {}, KEY),
        *notify_pg._payloads("other", [user_key(1)], {1: [_event(5)]}, KEY),
    ]
    for payloads in (one_payload, two_payloads):
        with wakeups.listening([user_key(1), revoked], 1) as poll:
            notifier._deliver(payloads)
            assert poll.woken and poll.take_pushed() is None


def test_a_waiter_woken_since_its_check_queries() -> None:
    wakeups = Wakeups(max_waiters_per_user=8)
    since = wakeups.sequence
    wakeups.wake([user_key(1)], {1: [_event(5)]})
    with wakeups.listening([user_key(1)], 1, since=since) as alice:
        assert alice.woken and alice.take_pushed() is None


def test_coalesced_wake_ups_keep_every_event_unless_one_had_none() -> None:
    merged: dict = {}
    add_pushed(merged, [user_key(1), user_key(2), conversation_key(9)], {1: [_event(5)], 2: [_event(3)]})
    add_pushed(merged, [user_key(1)], {1: [_event(6)]})
    add_pushed(merged, [user_key(2)], None)
    add_pushed(merged, [user_key(2)], {2: [_event(4)]})
    assert merged == {1: [_event(5), _event(6)], 2: None}


def test_pushed_events_answer_only_with_the_run_right_after_the_cursor() -> None:
    wakeups = Wakeups(max_waiters_per_user=8)

    def answer(after: int, limit: int, events: list[dict]):
        with wakeups.listening([user_key(1)], 1) as waiter:
            wakeups.wake([user_key(1)], {1: events})
            return pushed_events(after, limit)(waiter)

    page = answer(4, 100, [_event(7), _event(5), _event(6), _event(5)])
    assert page == Page([_event(5), _event(6), _event(7)], 7)
    # A gap (pos 5 not pushed yet): only the database knows.
    assert answer(4, 100, [_event(6), _event(7)]) is None
    # All at or below the cursor: nothing to answer with.
    assert answer(7, 100, [_event(6), _event(7)]) is None
    # `limit` cuts the page; the head stays the last pushed position.
    assert answer(4, 2, [_event(5), _event(6), _event(7)]) == Page([_event(5), _event(6)], 7)


KEY = b"k" * 32


def test_notification_payloads_carry_keys_and_the_events_that_fit() -> None:
    keys = [conversation_key(9), user_key(1), user_key(2), user_key(3)]
    big = [dict(_event(8), user="é" * 2000)]  # 12,000 bytes as JSON: cannot be pushed
    payloads = notify_pg._payloads("origin", keys, {1: [_event(5), _event(6)], 2: big}, KEY)
    parsed = [notify_pg._parse(payload, KEY) for payload in payloads]
    assert all(len(payload.encode()) < notify_pg.MAX_PAYLOAD_BYTES for payload in payloads)
    assert [key for _, found, _ in parsed for key in found] == keys
    assert {origin for origin, _, _ in parsed} == {"origin"}
    pushed = {user: events for _, _, found in parsed for user, events in found.items()}
    assert pushed == {1: [_event(5), _event(6)]}  # user 2's are too big, user 3 had none: they query


def test_an_older_listener_still_reads_every_key_of_a_payload_with_events() -> None:
    """A rolling deploy: the previous version split the payload on commas after the origin."""
    keys = [conversation_key(9), user_key(1)]
    (payload,) = notify_pg._payloads("origin", keys, {1: [_event(5)]}, KEY)
    _, _, joined = payload.partition("|")
    assert joined.split(",")[: len(keys)] == keys


@pytest.mark.parametrize(
    "forge",
    [
        lambda payload: payload.replace("origin.", "origin.0", 1)[: len(payload)],  # another signature
        lambda payload: payload.split(".", 1)[0] + payload[payload.index("|") :],  # none
        lambda payload: _flip(payload, payload.index(",~") + 10),  # other sealed events under the signature
        lambda payload: payload.replace("origin.", "other.", 1),  # another origin under it
    ],
    ids=["wrong-signature", "unsigned", "events-changed", "origin-changed"],
)
def test_events_are_trusted_only_under_a_valid_signature(forge) -> None:
    """Any database role can NOTIFY: without our key's signature a payload only wakes (and its waiters re-query)."""
    keys = [conversation_key(9), user_key(1)]
    (payload,) = notify_pg._payloads("origin", keys, {1: [_event(5)]}, KEY)
    assert notify_pg._parse(payload, KEY)[2] == {1: [_event(5)]}
    assert notify_pg._parse(payload, b"another key" * 3)[1:] == (keys, {})
    assert notify_pg._parse(forge(payload), KEY)[1:] == (keys, {})
    assert notify_pg._parse(payload, None)[1:] == (keys, {}), "no key to check with: nothing is trusted"


def test_signed_events_of_another_shape_are_refused_not_trusted() -> None:
    """`_parse` raises ValueError (its reader then wakes everyone) for any payload not of our shape, signed or not."""
    nonce = bytes(notify_pg.NONCE_BYTES)
    sealed = nonce + notify_pg._cipher(KEY).encrypt(nonce, b"[1]", None)
    body = user_key(1) + notify_pg.SEALED_MARK + base64.urlsafe_b64encode(sealed).decode()
    payload = f"origin.{notify_pg._signature(KEY, 'origin|' + body)}|{body}"
    with pytest.raises(ValueError):
        notify_pg._parse(payload, KEY)


def _flip(text: str, index: int) -> str:
    return text[:index] + ("B" if text[index] == "A" else "A") + text[index + 1 :]


def test_pushed_events_cannot_be_read_on_the_channel() -> None:
    """Any database role can LISTEN: what it hears names users, and says nothing of their messages."""
    secret = dict(_event(5), type="message", message={"text": "meet me at noon", "sender": "alice"})
    (payload,) = notify_pg._payloads("origin", [user_key(1)], {1: [secret]}, KEY)
    assert "noon" not in payload and "alice" not in payload and '"pos"' not in payload
    assert notify_pg._parse(payload, KEY)[2] == {1: [secret]}
    (again,) = notify_pg._payloads("origin", [user_key(1)], {1: [secret]}, KEY)
    assert again != payload, "a fresh nonce for every payload"


def test_many_keys_split_into_payloads_that_fit() -> None:
    keys = [user_key(n) for n in range(3000)]
    payloads = notify_pg._payloads("origin", keys, {n: [_event(n)] for n in range(3000)}, KEY)
    assert len(payloads) > 1 and all(len(payload) < notify_pg.MAX_PAYLOAD_BYTES for payload in payloads)
    parsed = [notify_pg._parse(payload, KEY) for payload in payloads]
    assert [key for _, found, _ in parsed for key in found] == keys
    assert {user: events for _, _, found in parsed for user, events in found.items()} == {
        n: [_event(n)] for n in range(3000)
    }


@pytest.mark.postgres
def test_a_round_of_many_payloads_reaches_the_other_processes_whole(postgres_url: str) -> None:
    """A publisher sends a round of payloads in one statement (`notify_pg.NOTIFY_ROUND`): each must arrive, signed."""
    migrate(postgres_url)  # the signing key
    heard: list[tuple[tuple[str, ...], dict]] = []

    class Recorded(Wakeups):
        def wake(self, keys: Iterable[str], pushed: Pushed | None = None) -> int:
            keys = tuple(key for key in keys if key != WAKE_ALL)  # the listener's wake-all as it connects
            if keys:
                heard.append((keys, dict(pushed or {})))
            return super().wake(keys, pushed)

    keys = [user_key(n) for n in range(3000)]
    pushed = {n: [_event(n)] for n in range(3000)}
    assert len(notify_pg._payloads("origin", keys, pushed, KEY)) > 5
    listener = notify_pg.PostgresNotifier(postgres_url, Recorded(max_waiters_per_user=8))
    publisher = notify_pg.PostgresNotifier(postgres_url, Wakeups(max_waiters_per_user=8))
    listener.start()
    try:
        assert listener.listening.wait(10)
        publisher.publish(keys, pushed)
        deadline = time.monotonic() + 10
        while sum(len(found) for found, _ in heard) < len(keys) and time.monotonic() < deadline:
            gevent.sleep(0.05)
    finally:
        listener.stop()
        publisher.stop()
    assert sorted(key for found, _ in heard for key in found) == sorted(keys)
    assert {user: events for _, found in heard for user, events in found.items()} == pushed


@pytest.mark.postgres
def test_a_revocation_reaches_the_other_processes_with_its_commit(postgres_url: str, monkeypatch) -> None:
    """A revoked token's polls in other processes must hear of it before the wake-up of any
    later commit (a send's, whose pushed events they would answer 200 with): it is notified
    in the revoking transaction, in commit order, not by a later round of the publisher
    (here, one that never comes)."""
    monkeypatch.setattr(notify_pg.PostgresNotifier, "_publish_forever", lambda self: None)
    apps = make_app(postgres_url)
    app = next(apps)
    other = Wakeups(max_waiters_per_user=8)
    listener = notify_pg.PostgresNotifier(postgres_url, other)
    listener.start()
    try:
        client = app.test_client()
        headers = Accounts(client).sign_up("alice")
        alice = client.get("/api/v1/me", headers=headers).json["id"]
        revoked = token_key(token_digest(headers["Authorization"].removeprefix("Bearer ")))
        assert listener.listening.wait(10)
        with other.listening([user_key(alice), revoked], alice) as poll:
            assert client.delete("/api/v1/tokens/current", headers=headers).status_code == 204
            assert poll.wait(5) and poll.take_pushed() is None
    finally:
        listener.stop()
        next(apps, None)


@pytest.mark.postgres
def test_a_listener_that_lost_its_connection_wakes_every_waiter_once_it_listens_again(postgres_url: str) -> None:
    """Notifications sent while a listener was not listening are lost (the data is not): once it
    listens again, every waiter of its process re-checks, instead of sleeping through them to its timeout."""
    migrate(postgres_url)  # the signing key
    wakeups = Wakeups(max_waiters_per_user=8)
    listener = notify_pg.PostgresNotifier(postgres_url, wakeups)
    listener.start()
    try:
        assert listener.listening.wait(10)
        with wakeups.listening([user_key(1)], 1) as poll:
            execute(
                postgres_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'chatapi-listener'",
            )
            assert poll.wait(20)
    finally:
        listener.stop()


@pytest.mark.parametrize(
    "payload",
    [
        'other|u:1,{"1": [broken',
        "u:1",  # no origin
        "other|u:x",  # a user key without a number
        'other|u:1,{"x": []}',
        'other|u:1,{"1": 5}',
        'other|u:1,{"1": [5]}',
        'other|u:1,{"1": [{"pos": "5"}]}',
    ],
)
def test_an_unreadable_notification_makes_every_waiter_check(payload: str) -> None:
    """Anyone with database access can NOTIFY on the channel: never trust, never crash."""
    wakeups = Wakeups(max_waiters_per_user=8)
    notifier = notify_pg.PostgresNotifier("postgresql://unused", wakeups)
    with wakeups.listening([user_key(1)], 1) as alice:
        notifier._deliver([payload])
        assert alice.woken and alice.take_pushed() is None


def test_a_notification_signed_with_other_characters_than_hex_only_wakes() -> None:
    """A signature that is not ASCII is a wrong one: its keys wake and re-query, and the
    listener reads the rest of what it heard (hmac.compare_digest raises TypeError on
    such a string, which ended the listener's connection and dropped the others)."""
    wakeups = Wakeups(max_waiters_per_user=8)
    notifier = notify_pg.PostgresNotifier("postgresql://unused", wakeups)
    notifier._signing_key = KEY
    (other,) = notify_pg._payloads("other", [user_key(2)], {2: [_event(5)]}, KEY)
    with wakeups.listening([user_key(1)], 1) as alice, wakeups.listening([user_key(2)], 2) as bob:
        notifier._deliver(["forger.\u00e9|u:1", other])
        assert alice.woken and alice.take_pushed() is None
        assert bob.woken and bob.take_pushed() == [_event(5)]


def test_each_process_tags_its_notifications_with_an_origin_of_its_own(monkeypatch) -> None:
    """A notifier made before a fork must not tag the children's notifications alike:
    each would skip the others' as its own."""
    notifier = notify_pg.PostgresNotifier("postgresql://unused", Wakeups(max_waiters_per_user=8))
    origins = set()
    try:
        for pid in (1001, 1002):
            monkeypatch.setattr(notify_pg.os, "getpid", lambda pid=pid: pid)
            notifier.start()
            origins.add(notifier._origin)
            notifier.stop()
    finally:
        notifier.stop()
    assert len(origins) == 2 and all(origin.startswith(("1001-", "1002-")) for origin in origins)


def test_a_process_skips_its_own_notifications_and_takes_the_others() -> None:
    """publish() wakes the publisher's own waiters; hearing its payload again must not wake them twice."""
    wakeups = Wakeups(max_waiters_per_user=8)
    notifier = notify_pg.PostgresNotifier("postgresql://unused", wakeups)
    notifier._signing_key = KEY
    keys = [user_key(1)]
    (own,) = notify_pg._payloads(notifier._origin, keys, {1: [_event(5)]}, KEY)
    (other,) = notify_pg._payloads("other", keys, {1: [_event(5)]}, KEY)
    with wakeups.listening(keys, 1) as alice:
        notifier._deliver([own])
        assert not alice.woken
        notifier._deliver([other])
        assert alice.woken and alice.take_pushed() == [_event(5)]
