"""One long-poll, from its first check to its answer.

A request that finds nothing new waits for a wake-up of its keys
(wakeups.py), answers from the events the wake-up carried when they are
enough, and otherwise checks again, until it has something or its deadline
passes. What a check asks the database is chat.py's; the design, after
Synapse's notifier, is in docs/design.md ("Wake-ups").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from chatapi.wakeups import Waiter, Wakeups
from chatapi.wire import Json


@dataclass(frozen=True, slots=True)
class Page:
    """What a read answers: its items, and the head of the conversation or stream."""

    items: list[Json]
    head: int


# A check: the page now, and whether to answer with it (else wait).
Check = Callable[[], tuple[Page, bool]]
# An answer from the events a wake-up carried, or None to check again.
PushedPage = Callable[[Waiter], Page | None]


class LongPolls:
    """Waits for this process's long-polls."""

    def __init__(self, wakeups: Wakeups, on_woken: Callable[[bool], None] = lambda pushed: None) -> None:
        self._wakeups = wakeups
        # Told, for each woken long-poll, whether pushed events answered it.
        self._on_woken = on_woken

    def wake_here(self, keys: list[str]) -> None:
        """Wake this process's waiters of `keys`, and no other process's.

        For a change the other processes were told of in its own transaction
        (`Notifier.publish_at_commit`): call it after the commit.
        """
        self._wakeups.wake(keys)

    @property
    def sequence(self) -> int:
        """The number of the latest wake-up: note it before the first check, pass it to `wait`."""
        return self._wakeups.sequence

    def wait(
        self,
        keys: list[str],
        user_id: int,
        deadline: float,
        check: Check,
        since: int,
        page: Page,
        ready: bool,
        pushed_page: PushedPage | None = None,
    ) -> Page:
        """The rest of a long-poll whose first check gave `page`, noted at wake-up number `since`.

        It answers by `deadline` (time.monotonic()) at the latest.

        Every wake-up of `keys` after `since` re-checks, so none is lost
        between the first check and the waiter's registration (wakeups.py);
        a spurious one costs one query. No connection is held while waiting.
        `pushed_page` answers from the events a wake-up carried, when they
        are enough, instead of re-checking.
        """
        if ready or deadline <= time.monotonic() or self._wakeups.draining:
            return page
        with self._wakeups.listening(keys, user_id, since=since) as waiter:
            while True:
                remaining = deadline - time.monotonic()
                if waiter.cut_short or remaining <= 0:
                    return page
                woken = waiter.wait(remaining)
                if waiter.cut_short:
                    # Drained (SIGTERM) or replaced by the user's newer
                    # request: answer at once, without a query; at a stop,
                    # ten thousand re-checks would not fit in its 2 s.
                    return page
                pushed = pushed_page(waiter) if woken and pushed_page is not None else None
                if woken:
                    self._on_woken(pushed is not None)
                if pushed is not None:
                    return pushed
                page, ready = check()
                if ready:
                    return page


def pushed_events(after: int, limit: int) -> PushedPage:
    """An event poll's answer from the events pushed to its waiter, or None to re-check the database.

    Only a run of events starting right after `after` will do: the one that
    made it a run was committed after every position below it (positions are
    handed out under the user's row lock), so the run is what the database
    would answer, and the head is at least its last pos. A gap (an event
    whose wake-up has not come, or came without its events) means re-check.
    """

    def page(waiter: Waiter) -> Page | None:
        pushed = waiter.take_pushed()
        if not pushed:
            return None
        by_pos = {event["pos"]: event for event in pushed}
        run = []
        while after + len(run) + 1 in by_pos:
            run.append(by_pos[after + len(run) + 1])
        if not run:
            return None
        return Page(run[:limit], run[-1]["pos"])

    return page


def page_after(after: int, head: int, items: Callable[[], list[Json]], position: str) -> tuple[Page, bool]:
    """The answer to "what is after `after`" given the head, and whether to give it now.

    At the head: nothing yet, so wait. Beyond it: answer at once with the
    head, so the client can resynchronise. Below it: `items()`, answered at
    once. Each statement reads its own snapshot: more may have committed
    since the head was read, so the head answered is never below an item.
    """
    if after >= head:
        return Page([], head), after > head
    found = items()
    return Page(found, max(head, found[-1][position] if found else 0)), True
