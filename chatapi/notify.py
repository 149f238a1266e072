"""Wake-ups carried to the waiting requests they concern, after commit.

`Notifier` is what the chat rules publish through. `LocalNotifier` keeps
them in one process (SQLite runs one); `notify_pg.PostgresNotifier` also
carries them to every other process and host through LISTEN/NOTIFY.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from sqlalchemy.engine import Connection

from chatapi.wakeups import Pushed, Wakeups


class Notifier(Protocol):
    """Carries wake-ups to the waiting requests they concern, after commit.

    `publish_at_commit` tells the other processes only, in the committing
    transaction itself (the caller wakes this process's waiters after it).
    """

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def publish(self, keys: Iterable[str], pushed: Pushed | None = None) -> None: ...

    def publish_at_commit(self, connection: Connection, keys: Iterable[str]) -> None: ...


class LocalNotifier:
    """Wake-ups within one process (the SQLite mode)."""

    def __init__(self, wakeups: Wakeups) -> None:
        self._wakeups = wakeups

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def publish(self, keys: Iterable[str], pushed: Pushed | None = None) -> None:
        self._wakeups.wake(keys, pushed)

    def publish_at_commit(self, connection: Connection, keys: Iterable[str]) -> None:
        pass  # there are no other processes
