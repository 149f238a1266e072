"""The per-process waiter registry: who is woken, and the per-user cap."""

from __future__ import annotations

import gevent

from chatapi.wakeups import RECENT_WAKEUPS, Wakeups, conversation_key, user_key


def test_only_the_concerned_waiters_wake() -> None:
    wakeups = Wakeups(max_waiters_per_user=8)
    with (
        wakeups.listening([user_key(1)], 1) as alice,
        wakeups.listening([user_key(2)], 2) as bob,
        wakeups.listening([conversation_key(7)], 1) as alice_in_chat,
    ):
        assert wakeups.wake([user_key(2), conversation_key(7)]) == 2
        assert bob._event.is_set() and alice_in_chat._event.is_set()
        assert not alice._event.is_set()


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
        assert not waiter._event.is_set()


def test_a_wake_all_or_forgotten_wakes_before_the_wait_count() -> None:
    wakeups = Wakeups(max_waiters_per_user=8)
    since = wakeups.sequence
    wakeups.wake_all()
    with wakeups.listening([user_key(1)], 1, since=since) as waiter:
        assert waiter._event.is_set()
    since = wakeups.sequence
    for other in range(2, 2 + RECENT_WAKEUPS + 1):
        wakeups.wake([user_key(other)])
    with wakeups.listening([user_key(1)], 1, since=since) as waiter:
        assert waiter._event.is_set(), "too many wake-ups to tell: must re-check"


def test_new_waiter_beyond_the_cap_answers_the_oldest() -> None:
    wakeups = Wakeups(max_waiters_per_user=2)
    with wakeups.listening([user_key(1)], 1) as oldest, wakeups.listening([user_key(1)], 1) as middle:
        assert not oldest.cut_short
        with wakeups.listening([user_key(1)], 1) as newest:
            assert oldest.cut_short and oldest._event.is_set()
            assert not middle.cut_short and not newest.cut_short
    assert wakeups.waiting == 0


def test_drain_answers_everyone_and_refuses_new_waits() -> None:
    wakeups = Wakeups(max_waiters_per_user=8)
    with wakeups.listening([user_key(1)], 1) as waiting:
        wakeups.drain()
        assert waiting.cut_short and waiting._event.is_set()
    with wakeups.listening([user_key(1)], 1) as late:
        assert late.cut_short


def test_waiting_gauge_follows_registrations() -> None:
    changes: list[int] = []
    wakeups = Wakeups(max_waiters_per_user=8, on_wait_change=changes.append)
    with wakeups.listening([user_key(1)], 1):
        assert wakeups.waiting == 1
    assert changes == [1, -1] and wakeups.waiting == 0
