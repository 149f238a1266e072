"""Group commit: concurrent calls of one kind, run together in one transaction.

Each transaction costs a round trip, a commit and a flush of the write-ahead
log, whatever it holds; on PostgreSQL that fixed part was about 40% of a
send's database CPU (docs/performance.md, change 27). So while `max_in_flight`
batches are running, new calls queue, and the next free slot takes every
queued call (up to `max_batch`) as one batch. Nothing waits on a timer: a
call that finds a free slot runs at once, alone if it is alone, and batches
only form while the database is busy, which is when they pay.

The calls of a batch commit together, so each caller still gets its answer
only after its own work is durable. `run` gets the items in arrival order
and returns one outcome per item, each a value or an exception to raise in
that caller.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from gevent.event import Event

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Call(Generic[Item, Result]):
    __slots__ = ("item", "outcome", "taken", "done", "event")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.outcome: Result | BaseException | None = None
        self.taken = False  # in a batch that is running
        self.done = False
        # Set when the call is done, or when it should lead the next batch.
        self.event = Event()


class GroupCommit(Generic[Item, Result]):
    """Run `run(items)` for concurrent callers of `submit`, batching them (per process).

    At most `max_in_flight` batches run at once, except that a call queued
    for `max_wait` seconds leads a batch anyway: a batch stuck on a row lock
    (or a slow disk) holds the others back by at most that long.
    """

    def __init__(
        self,
        run: Callable[[list[Item]], Sequence[Result | BaseException]],
        *,
        max_in_flight: int,
        max_batch: int,
        max_wait: float,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self._run = run
        # Told the size of each batch as it starts (a metric).
        self._on_batch = on_batch
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._queue: deque[_Call[Item, Result]] = deque()
        self._in_flight = 0

    def submit(self, item: Item) -> Result:
        """`item`'s outcome, once its batch has run (raised if it is an exception)."""
        call: _Call[Item, Result] = _Call(item)
        self._queue.append(call)
        deadline = time.monotonic() + self._max_wait
        while not call.done:
            if call.taken:
                call.event.wait()
            elif self._in_flight < self._max_in_flight or time.monotonic() >= deadline:
                self._lead()
            else:
                call.event.wait(deadline - time.monotonic())
            call.event.clear()
        if isinstance(call.outcome, BaseException):
            raise call.outcome
        return call.outcome  # type: ignore[return-value]

    def _lead(self) -> None:
        """Run the queued calls (up to `max_batch`, oldest first) as one batch."""
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
        for call in batch:
            call.taken = True
        self._in_flight += 1
        self._on_batch(len(batch))
        outcomes: Sequence[Result | BaseException] | None = None
        try:
            outcomes = self._run([call.item for call in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} got {len(outcomes)} outcomes")
        except Exception as exc:
            outcomes = [exc] * len(batch)
        finally:
            self._in_flight -= 1
            if outcomes is None:
                # The leader was killed (a worker's shutdown): its batch's
                # fate is unknown, as for a single call cut off the same way.
                outcomes = [RuntimeError("the batch was interrupted")] * len(batch)
            for call, outcome in zip(batch, outcomes, strict=True):
                call.outcome = outcome
                call.done = True
                call.event.set()
            # A slot is free: the oldest waiting call leads the next batch.
            if self._queue:
                self._queue[0].event.set()
