"""Helpers for fault-injection tests: clients that keep sending while the
server is killed, and checks on what the database really holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import psycopg2
import requests

from tests.support.api import Api


@dataclass
class SendLog:
    """What one client sent: acknowledged sends (client_id -> message) and the
    client_ids it tried but got no acknowledgement for."""

    conversation_id: int
    prefix: str
    acked: dict[str, dict] = field(default_factory=dict)
    unacked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def answered_errors(self) -> list[str]:
        """The failures the server answered ("503 ..."), as opposed to connections lost."""
        return [error for error in self.errors if error[:3].isdigit()]


def post_numbered(client: Api, conversation_id: int, client_id: str, timeout: float = 10) -> requests.Response:
    """Send the message named by `client_id`: the same text every time, so a retry is a replay."""
    return client.post(
        f"/api/v1/conversations/{conversation_id}/messages",
        {"text": f"text of {client_id}", "client_id": client_id},
        timeout=timeout,
    )


def send_until_failure(client: Api, log: SendLog, stop: threading.Event, max_sends: int = 10_000) -> None:
    """Send numbered messages with client_ids until `stop` or the first failure.

    The send that fails is remembered as unacknowledged: the client cannot know
    whether the server stored it, and must retry it with the same client_id.
    """
    first = len(log.acked) + len(log.unacked)
    for number in range(first, first + max_sends):
        if stop.is_set():
            return
        client_id = f"{log.prefix}-{number}"
        try:
            response = post_numbered(client, log.conversation_id, client_id)
        except requests.RequestException as exc:
            log.unacked.append(client_id)
            log.errors.append(type(exc).__name__)
            return
        if response.status_code in (200, 201):
            log.acked[client_id] = response.json()
        else:
            log.unacked.append(client_id)
            log.errors.append(f"{response.status_code} {response.text[:200]}")
            return


def retry_unacked(client: Api, log: SendLog, deadline_secs: float = 30) -> None:
    """Retry every unacknowledged send with its client_id until it is acknowledged."""
    deadline = time.monotonic() + deadline_secs
    for client_id in log.unacked:
        while True:
            try:
                response = post_numbered(client, log.conversation_id, client_id)
                if response.status_code in (200, 201):
                    log.acked[client_id] = response.json()
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"retry of {client_id} never acknowledged"
            time.sleep(0.2)


def stored_messages(database_url: str) -> dict[int, list[tuple[int, str | None, str]]]:
    """Every stored message, straight from PostgreSQL: conversation -> [(seq, client_id, text)]."""
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT conversation_id, seq, client_id, text FROM messages ORDER BY conversation_id, seq")
            rows = cur.fetchall()
    finally:
        conn.close()
    stored: dict[int, list[tuple[int, str | None, str]]] = {}
    for conversation_id, seq, client_id, text in rows:
        stored.setdefault(conversation_id, []).append((seq, client_id, text))
    return stored


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (requests.RequestException, OSError, psycopg2.Error):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def at_once(calls: list[Callable[[], object]], timeout: float = 60) -> list:
    """Every call at the same moment, each on a thread of its own; their results in order
    (a call's exception is raised here)."""
    barrier = threading.Barrier(len(calls))

    def when_all_are_ready(call: Callable[[], object]) -> object:
        barrier.wait()
        return call()

    running = [Background(partial(when_all_are_ready, call)) for call in calls]
    return [background.join(timeout) for background in running]


class Background:
    """Run a function in a thread and keep its result or exception."""

    def __init__(self, function: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[], object]) -> None:
        try:
            self.result = function()
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    def join(self, timeout: float) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"background call still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()
