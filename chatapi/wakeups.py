"""Waking the long-polls that new data concerns.

Design (docs/design.md, "Wake-ups"): a long-poll checks the database once;
if there is nothing for it, it registers a `Waiter` under the keys it cares
about (`u:<user id>` for a user's event stream, `c:<conversation id>` for one
conversation's messages, `t:<token digest prefix>` for its token's
revocation) and sleeps until woken or its timeout. A commit wakes the keys
it touched; the woken request re-queries and sleeps again if there is still
nothing new. Waiters hold no database connection while they sleep.

A wake-up may also carry the new events themselves ("pushed" events, per
user): a send knows the message and receipt it added to each stream and
their positions, an acknowledgement or a read its receipts. An event-stream
waiter that is handed the events right after its cursor answers with them
and skips the re-query; any wake-up of its key that carries none (a new
conversation, a revoked token, a reconnect) makes it re-query, as before.
The database stays the source of truth: pushed events are only ever what
was just committed, at the positions it was committed at.

No wake-up is lost between "checked: nothing" and "started waiting": every
wake-up gets a sequence number, the request notes `sequence` before its
check, and `listening(..., since=...)` wakes the new waiter at once if one of
its keys was woken since (or if too many wake-ups happened to tell). A
spurious wake-up costs one query. Checking before registering lets the
first check also find out who the caller is (the event stream's token
lookup is part of it, see chat.py).

This module is per process. `chatapi.notify_pg` carries the same keys across
processes and hosts through PostgreSQL LISTEN/NOTIFY.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import gevent
import gevent.hub

# Per user id, the events a wake-up carries for that user's stream; None (or
# no entry) for a user whose stream changed in a way the wake-up cannot say.
Pushed = Mapping[int, "list[dict[str, Any]] | None"]

WAKE_ALL = "*"
# How many recent wake-ups are remembered for `listening(..., since=...)`.
# A request that checked more wake-ups ago than this is woken to re-check.
RECENT_WAKEUPS = 1024


def user_key(user_id: int) -> str:
    return f"u:{user_id}"


def key_user(key: str) -> int | None:
    """The user id of a `user_key`, None for any other key."""
    return int(key[2:]) if key.startswith("u:") else None


def add_pushed(into: dict[int, list[dict[str, Any]] | None], keys: Iterable[str], pushed: Pushed | None) -> None:
    """Merge one wake-up's pushed events into `into`, for coalescing wake-ups.

    A user whose key one of them woke without events gets None: its waiters
    must re-query whatever else was pushed for it.
    """
    for key in keys:
        user_id = key_user(key)
        if user_id is None:
            continue
        events = pushed.get(user_id) if pushed is not None else None
        if events is None or (user_id in into and into[user_id] is None):
            into[user_id] = None
        else:
            into.setdefault(user_id, []).extend(events)


def conversation_key(conversation_id: int) -> str:
    return f"c:{conversation_id}"


def token_key(token_hash: str) -> str:
    """Woken when the token is revoked: its waiting requests re-check it and answer 401.

    Per token, not per user: the user's requests on its other tokens (other
    devices) are not woken. 64 bits of the digest tell tokens apart.
    """
    return f"t:{token_hash[:16]}"


class Waiter:
    """One waiting request, registered under its keys for the duration of a `with` block.

    It sleeps on gevent's lowest-level primitive (a hub `Waiter` and a loop
    timer) rather than on an `Event` with a timeout. Idle long-polls are
    many, and each keeps its greenlet's C stack while it sleeps: measured,
    `Event.wait(timeout)` added 720 bytes of saved stack and a `Timeout`
    object to every one of them (docs/performance.md, change 24).
    """

    __slots__ = ("keys", "user_id", "cut_short", "_wakeups", "_since", "_woken", "_sleeping", "_pushed", "_must_query")

    def __init__(self, wakeups: Wakeups, keys: tuple[str, ...], user_id: int, since: int | None) -> None:
        self.keys = keys
        self.user_id = user_id
        # Set when the request must answer now (shutdown, or a newer request
        # of the same user took its slot): it answers with what it has.
        self.cut_short = False
        self._wakeups = wakeups
        self._since = since
        self._woken = False
        self._sleeping: gevent.hub.Waiter | None = None
        # The events pushed to this user since the last `take_pushed`, and
        # whether a wake-up came that carried none (idle waiters are many:
        # no list until there is something to hold).
        self._pushed: list[dict[str, Any]] | None = None
        self._must_query = False

    def __enter__(self) -> Waiter:
        self._wakeups._register(self, self._since)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._wakeups._unregister(self)

    @property
    def woken(self) -> bool:
        """Whether a wake-up came that `wait` has not returned yet."""
        return self._woken

    def wait(self, timeout: float) -> bool:
        """Sleep until woken or `timeout` seconds pass; whether it was woken. Then the caller re-checks."""
        if not self._woken:
            hub = gevent.get_hub()
            self._sleeping = sleeping = gevent.hub.Waiter(hub)
            timer = hub.loop.timer(max(timeout, 0.0))
            timer.start(sleeping.switch, None)
            try:
                sleeping.get()
            finally:
                timer.close()
                self._sleeping = None
        woken, self._woken = self._woken, False
        return woken

    def wake(self, pushed: list[dict[str, Any]] | None = None) -> None:
        """Wake the request; `pushed`: the new events of its user's stream, if the wake-up knows them."""
        if pushed is None:
            self._must_query = True
        elif self._pushed is None:
            self._pushed = list(pushed)
        else:
            self._pushed.extend(pushed)
        if not self._woken:
            self._woken = True
            if self._sleeping is not None:
                # A hub Waiter is switched to from the hub only. A stale
                # switch (the timer came first) finds no greenlet waiting in
                # that Waiter and is dropped: each `wait` has its own.
                gevent.get_hub().loop.run_callback(self._sleeping.switch, None)

    def take_pushed(self) -> list[dict[str, Any]] | None:
        """The events pushed since the last call; None if a wake-up carried none (or none came)."""
        pushed, must_query = self._pushed, self._must_query
        self._pushed, self._must_query = None, False
        return None if must_query else pushed


class Wakeups:
    """The registry of this process's waiting requests."""

    def __init__(
        self,
        max_waiters_per_user: int,
        on_wait_change: Callable[[int], None] = lambda delta: None,
        on_wake: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._max_per_user = max(1, max_waiters_per_user)
        # Lists, not sets: a key or user has one waiter or a few, and an
        # empty set alone is 216 bytes per idle long-poll.
        self._by_key: dict[str, list[Waiter]] = {}
        # Per user, oldest first, to enforce the per-user cap.
        self._by_user: dict[int, list[Waiter]] = {}
        self._on_wait_change = on_wait_change
        self._on_wake = on_wake
        self.draining = False
        # The number of the latest wake-up, and the recent ones' keys.
        self.sequence = 0
        self._recent: deque[tuple[int, tuple[str, ...]]] = deque(maxlen=RECENT_WAKEUPS)

    def listening(self, keys: Iterable[str], user_id: int, since: int | None = None) -> Waiter:
        """A waiter for `keys`, registered for the duration of a `with` block.

        `since`: the `sequence` noted before the caller checked the database;
        the waiter starts woken if one of its keys was woken after that.
        """
        return Waiter(self, tuple(keys), user_id, since)

    def _register(self, waiter: Waiter, since: int | None) -> None:
        if self.draining:
            waiter.cut_short = True
        if since is not None and self._woken_since(waiter.keys, since):
            waiter.wake()
        mine = self._by_user.setdefault(waiter.user_id, [])
        mine.append(waiter)
        while len(mine) > self._max_per_user:
            oldest = mine.pop(0)
            oldest.cut_short = True
            oldest.wake()
        for key in waiter.keys:
            self._by_key.setdefault(key, []).append(waiter)
        self._on_wait_change(1)

    def _unregister(self, waiter: Waiter) -> None:
        self._on_wait_change(-1)
        for key in waiter.keys:
            _discard(self._by_key, key, waiter)
        _discard(self._by_user, waiter.user_id, waiter)

    def _woken_since(self, keys: tuple[str, ...], since: int) -> bool:
        if since >= self.sequence:
            return False
        if not self._recent or self._recent[0][0] > since + 1:
            return True  # Some wake-ups since `since` are forgotten: assume one was ours.
        for sequence, woken_keys in reversed(self._recent):
            if sequence <= since:
                return False
            if WAKE_ALL in woken_keys or any(key in woken_keys for key in keys):
                return True
        return False

    def wake(self, keys: Iterable[str], pushed: Pushed | None = None) -> int:
        """Wake the waiters registered under any of `keys` (WAKE_ALL: every waiter); return how many.

        `pushed`: the new events of the users whose keys are woken, where
        known (a user with none listed is re-queried).
        """
        keys = tuple(keys)
        self.sequence += 1
        self._recent.append((self.sequence, keys))
        woken: set[Waiter] = set()
        # Woken through a key that is not a user's (a revoked token's): what
        # that means is in no event, so these query, whatever their user was
        # pushed by the same (coalesced) wake-up.
        must_query: set[Waiter] = set()
        if WAKE_ALL in keys:
            pushed = None
            for waiters in self._by_key.values():
                woken.update(waiters)
        else:
            for key in keys:
                waiters = self._by_key.get(key, ())
                woken.update(waiters)
                if pushed is not None and waiters and key_user(key) is None:
                    must_query.update(waiters)
        for waiter in woken:
            waiter.wake(pushed.get(waiter.user_id) if pushed is not None and waiter not in must_query else None)
        if woken:
            self._on_wake(len(woken))
        return len(woken)

    def wake_all(self) -> int:
        """Wake every waiter to re-check, e.g. after notifications may have been missed."""
        return self.wake((WAKE_ALL,))

    def drain(self) -> None:
        """On shutdown: answer every waiting request now, and let no new one wait."""
        self.draining = True
        for waiters in list(self._by_key.values()):
            for waiter in waiters:
                waiter.cut_short = True
                waiter.wake()

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._by_user.values())


def _discard(lists: dict[Any, list[Waiter]], key: Any, waiter: Waiter) -> None:
    """Take `waiter` out of `lists[key]`, and the key out once its list is empty."""
    waiters = lists.get(key)
    if waiters is not None and waiter in waiters:
        waiters.remove(waiter)
        if not waiters:
            del lists[key]
