"""Wake-ups across processes and hosts through PostgreSQL LISTEN/NOTIFY.

Each worker process keeps two dedicated connections outside the pool:
- a listener, LISTENing on one channel; every notification names the keys to
  wake, and the listener wakes the matching local waiters;
- a publisher, sending the keys of committed changes with pg_notify(), and
  the events they pushed (wakeups.py) when they fit.

A payload is `origin.signature|key,key,...` followed, when events are
pushed, by `,~` and the events sealed: `{"<user id>": [events], ...}` (JSON)
encrypted with AES-256-GCM under a fresh 96-bit nonce, in URL-safe base64.
Keys never contain `~` or `,`, and a listener of an older version reads the
sealed events as one more key that matches nobody, so its waiters still
wake (and re-query) during a rolling deploy. A user's events that would not
fit in one payload are left out: its waiters re-query.

Any role that can connect to the database can LISTEN and NOTIFY on the
channel. The `wakeups` row of the `secrets` table (made by the migrations,
not readable by other roles) keys both protections: the signature
(HMAC-SHA256 of `origin|keys...`) is what makes pushed events trusted, and
the encryption (its key derived with HKDF) keeps them from being read. A
payload without a valid signature is a hint: its keys' waiters wake and
re-query, and its events are dropped. What such a role can still read is
which user and conversation ids are woken, and when (docs/deploy.md).

Notifications are sent after the data commits, not inside the data
transaction: PostgreSQL serialises the commits of all transactions that ran
NOTIFY behind one global lock, which would cap message throughput. (A
revocation is the exception, rare enough for the lock: `publish_at_commit`
notifies in its transaction, so that no later commit's events reach a poll
on the revoked token first.) Keys that
pile up while one round of notifications is in flight go out together in the
next, so the publisher coalesces under load and adds no delay when idle. A
round is one statement and one transaction, however many payloads it
needs, and that transaction does not wait for the disk: each commit of a
transaction that notified takes the global lock, and its flush held it
longer. (A round of 50-90 payloads, one transaction each, took 1-2 s on a
saturated machine, during which the next round piled up: docs/performance.md,
change 33.) Nothing is lost by not waiting: the data the keys point at was
committed, durably, before its round, and a notification is never durable
(one is lost whenever a listener is not connected, see below).

If a connection drops (database restart), it is re-opened with backoff, and
on reconnect every local waiter is woken to re-check: notifications sent
while we were not listening are lost, but the data is not, and a re-check
finds it. The price of notifying after commit: if a process dies between
its commit and its pg_notify, waiters in other processes see the message at
their next re-check (their timeout) instead of at once.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import time
from collections.abc import Iterable

import gevent
import gevent.event
import psycopg2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from gevent.select import select
from sqlalchemy.engine import Connection

from chatapi.db import driver_message
from chatapi.wakeups import WAKE_ALL, Pushed, Wakeups, add_pushed, key_user

log = logging.getLogger(__name__)

CHANNEL = "chatapi_wakeups"
# PostgreSQL refuses notification payloads of 8000 bytes or more.
MAX_PAYLOAD_BYTES = 7900
# Reconnect backoff: start fast (a restart is usually quick), cap so a long
# outage costs little, and jitter so many workers don't reconnect in step.
RECONNECT_FIRST_SECS = 0.1
RECONNECT_MAX_SECS = 5.0
# The listener wakes up this often even when idle, to notice a dead
# connection that the kernel has not reported yet.
LISTENER_HEARTBEAT_SECS = 10.0
# The signature: the first 128 bits of an HMAC-SHA256, in hex. A forger
# must guess among 2^128, and it costs 33 of a payload's 8,000 bytes.
SIGNATURE_HEX_CHARS = 32
KEY_QUERY = "SELECT value FROM secrets WHERE name = 'wakeups'"
# Seconds between looks for a key that was not there (the schema migrated
# after the worker started).
KEY_RETRY_SECS = 1.0
# Sealed events: `,~` then base64 of the nonce, the ciphertext and GCM's tag.
SEALED_MARK = ",~"
NONCE_BYTES = 12
TAG_BYTES = 16
# A round of payloads: one statement, one transaction (see the module docstring).
NOTIFY_ROUND = "SELECT pg_notify(%s, payload) FROM unnest(%s::text[]) AS payload"


def _signature(key: bytes, signed: str) -> str:
    return hmac.new(key, signed.encode(), hashlib.sha256).hexdigest()[:SIGNATURE_HEX_CHARS]


def _new_origin() -> str:
    """This process's tag on its notifications: its pid, and a random part (pids are reused)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _backoff(attempt: int) -> float:
    delay = min(RECONNECT_MAX_SECS, RECONNECT_FIRST_SECS * 2**attempt)
    return delay * random.uniform(0.5, 1.0)


@functools.lru_cache(maxsize=4)
def _cipher(key: bytes) -> AESGCM:
    """The events' cipher: its own key, derived from the signing key, so that neither use weakens the other."""
    return AESGCM(HKDF(algorithm=SHA256(), length=32, salt=None, info=b"chatapi wake-up events").derive(key))


def _sealed_size(events_json_size: int) -> int:
    """The length of `,~` and the sealed events, for JSON of that many bytes (base64: 4 characters per 3 bytes)."""
    return len(SEALED_MARK) + 4 * -(-(NONCE_BYTES + events_json_size + TAG_BYTES) // 3)


def _payloads(origin: str, keys: Iterable[str], pushed: Pushed, signing_key: bytes | None) -> list[str]:
    """Pack keys, and the events pushed for them, into as few payloads as fit PostgreSQL's limit.

    Without a key, no events: nobody could trust or read them.
    """
    payloads: list[str] = []
    chunk_keys: list[str] = []
    chunk_events: list[str] = []
    head = len(origin) + 1 + SIGNATURE_HEX_CHARS + 1  # "origin.signature|"
    keys_size = 0
    events_size = 1  # the JSON's braces, and a comma per entry but the first

    def size(keys_size: int, events_size: int) -> int:
        return head + keys_size + (_sealed_size(events_size) if events_size > 1 else 0)

    for key in keys:
        user_id = key_user(key)
        events = pushed.get(user_id) if user_id is not None and signing_key is not None else None
        entry = f'"{user_id}":' + json.dumps(events, separators=(",", ":")) if events else None
        key_cost, entry_cost = len(key) + 1, (len(entry) + 1 if entry else 0)
        if entry and size(key_cost, 1 + entry_cost) > MAX_PAYLOAD_BYTES:
            entry, entry_cost = None, 0  # Too big to push: its waiters re-query.
        if chunk_keys and size(keys_size + key_cost, events_size + entry_cost) > MAX_PAYLOAD_BYTES:
            payloads.append(_payload(origin, chunk_keys, chunk_events, signing_key))
            chunk_keys, chunk_events, keys_size, events_size = [], [], 0, 1
        chunk_keys.append(key)
        keys_size += key_cost
        if entry:
            chunk_events.append(entry)
            events_size += entry_cost
    if chunk_keys:
        payloads.append(_payload(origin, chunk_keys, chunk_events, signing_key))
    return payloads


def _payload(origin: str, keys: list[str], events: list[str], signing_key: bytes | None) -> str:
    body = ",".join(keys)
    if signing_key is None:
        return origin + "|" + body
    if events:
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + _cipher(signing_key).encrypt(nonce, ("{" + ",".join(events) + "}").encode(), None)
        body += SEALED_MARK + base64.urlsafe_b64encode(sealed).decode()
    return f"{origin}.{_signature(signing_key, origin + '|' + body)}|{body}"


def _unseal(sealed: str, key: bytes) -> dict:
    """The events sealed by `_payload`; ValueError if they were not sealed with `key`."""
    try:
        raw = base64.urlsafe_b64decode(sealed.encode())
        events = json.loads(_cipher(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], None))
    except (binascii.Error, InvalidTag) as exc:
        raise ValueError("sealed events that do not open with our key") from exc
    if not isinstance(events, dict):
        raise ValueError("sealed events that are not an object")
    return events


def _claimed_origin(payload: str) -> str:
    """Who published a payload, as it says (unchecked: only good for skipping one's own)."""
    return payload.partition("|")[0].partition(".")[0]


def _parse(payload: str, signing_key: bytes | None) -> tuple[str, list[str], dict[int, list]]:
    """A payload's origin, keys and pushed events (see the module docstring).

    A payload that is not exactly our shape raises ValueError, and its
    reader wakes every waiter instead of trusting any part of it. One that
    is, but is not signed with `signing_key`, gives its keys and no events.
    """
    head, bar, body = payload.partition("|")
    if not bar:
        raise ValueError("no origin")
    origin, _, signature = head.partition(".")
    joined, sealed_mark, sealed = body.partition(SEALED_MARK)
    keys = joined.split(",")
    for key in keys:
        key_user(key)  # ValueError for a user key without a number
    pushed: dict[int, list] = {}
    # compare_digest refuses (TypeError) a str that is not ASCII: such a signature is simply not ours.
    signed = (
        signing_key is not None
        and signature.isascii()
        and hmac.compare_digest(signature, _signature(signing_key, origin + "|" + body))
    )
    if sealed_mark and signed and signing_key is not None:
        for user_id, found in _unseal(sealed, signing_key).items():
            if not isinstance(found, list) or not all(
                isinstance(event, dict) and type(event.get("pos")) is int for event in found
            ):
                raise ValueError(f"pushed events of the wrong shape for user {user_id!r}")
            pushed[int(user_id)] = found
    elif sealed_mark:
        log.warning("wake-up notification from %.40r with events but no valid signature: events dropped", origin)
    return origin, keys, pushed


class PostgresNotifier:
    """Publishes local commits' keys and wakes local waiters for everyone's."""

    def __init__(self, dsn: str, wakeups: Wakeups) -> None:
        self._dsn = dsn
        self._wakeups = wakeups
        # Tags our own notifications so the listener can skip them: local
        # waiters were already woken directly at commit time. Made again in
        # each process that starts (a fork must not share its parent's).
        self._origin = _new_origin()
        self._pending: set[str] = set()
        self._pending_pushed: dict[int, list | None] = {}
        self._has_pending = gevent.event.Event()
        self._signing_key: bytes | None = None  # read from the database as each connection opens
        self._key_wanted_at = 0.0  # when to look again for a key that was not there
        self._started_in_pid: int | None = None
        self._greenlets: list[gevent.Greenlet] = []
        self.listening = gevent.event.Event()

    def start(self) -> None:
        """Start the listener and publisher once per process (after fork)."""
        if self._started_in_pid == os.getpid():
            return
        self._started_in_pid = os.getpid()
        self._origin = _new_origin()
        self.listening.clear()
        self._greenlets = [gevent.spawn(self._listen_forever), gevent.spawn(self._publish_forever)]

    def stop(self) -> None:
        gevent.killall(self._greenlets, block=False)
        self._greenlets = []
        self._started_in_pid = None

    def publish(self, keys: Iterable[str], pushed: Pushed | None = None) -> None:
        """Wake local waiters now and queue the keys (and pushed events) for the other processes."""
        keys = tuple(keys)
        self._wakeups.wake(keys, pushed)
        self.start()
        self._pending.update(keys)
        add_pushed(self._pending_pushed, keys, pushed)
        self._has_pending.set()

    def publish_at_commit(self, connection: Connection, keys: Iterable[str]) -> None:
        """Notify the other processes of `keys` in the caller's transaction, on `connection`.

        They hear of it as it commits, before the wake-up of anything
        committed after it (PostgreSQL delivers notifications in commit
        order), where `publish` after the commit reaches them with a later
        round of the publisher. Without events: their waiters re-check. This
        process's waiters are the caller's to wake, after the commit.
        """
        self.start()
        # The publisher's own round (NOTIFY_ROUND, _payloads), on the caller's connection.
        payloads = _payloads(self._origin, sorted(keys), {}, self._signing_key)
        connection.exec_driver_sql(NOTIFY_ROUND, (CHANNEL, payloads))

    def _connect(self, role: str) -> psycopg2.extensions.connection:
        # Named for pg_stat_activity: chatapi-listener, chatapi-publisher.
        conn = psycopg2.connect(self._dsn, application_name=f"chatapi-{role}")
        conn.autocommit = True
        try:
            self._read_key(conn)
        except psycopg2.ProgrammingError as exc:  # the schema is not migrated yet
            log.warning(
                "no key to sign wake-ups with (%s): events are not pushed across processes", driver_message(exc)
            )
            self._signing_key = None
        except BaseException:
            conn.close()
            raise
        return conn

    def _read_key(self, conn: psycopg2.extensions.connection) -> None:
        """Read the signing key (ProgrammingError before the migrations made its table)."""
        with conn.cursor() as cur:
            cur.execute(KEY_QUERY)
            row = cur.fetchone()
        key = bytes(row[0]) if row else None
        if key is not None:
            # Derived now, not at the first wake-up: the first derivation in
            # a process costs about 1.5 ms (OpenSSL's set-up).
            _cipher(key)
        self._signing_key = key

    def _read_key_if_missing(self, conn: psycopg2.extensions.connection) -> None:
        """Look for the key again if the process started before the migrations made it (CHATAPI_MIGRATE=off)."""
        if self._signing_key is None and time.monotonic() >= self._key_wanted_at:
            self._key_wanted_at = time.monotonic() + KEY_RETRY_SECS
            with contextlib.suppress(psycopg2.ProgrammingError):
                self._read_key(conn)

    def _publish_forever(self) -> None:
        attempt = 0  # failures in a row
        conn = None
        while True:
            if conn is None:
                # Connected as the process starts, like the listener: the
                # first commit after a start would otherwise wait for a new
                # backend (10-50 ms) before its wake-ups went out.
                try:
                    conn = self._connect("publisher")
                    with conn.cursor() as cur:
                        # For this session's transactions only, which notify and write nothing.
                        cur.execute("SET synchronous_commit = off")
                except Exception as exc:
                    log.warning("wake-up publisher could not connect: %r", exc)
                    if conn is not None:
                        conn.close()
                    conn = None
                    gevent.sleep(_backoff(attempt))
                    attempt += 1
                    continue
                if attempt:
                    # Keys of failed rounds are queued again (below), so none
                    # is lost; this one re-check of every waiter everywhere
                    # is a safety net after an outage, and costs little.
                    self._pending.add(WAKE_ALL)
                    self._has_pending.set()
            self._has_pending.wait()
            self._has_pending.clear()
            keys, self._pending = self._pending, set()
            pushed, self._pending_pushed = self._pending_pushed, {}
            try:
                self._read_key_if_missing(conn)
                with conn.cursor() as cur:
                    payloads = _payloads(self._origin, sorted(keys), pushed, self._signing_key)
                    cur.execute(NOTIFY_ROUND, (CHANNEL, payloads))
                attempt = 0
            except Exception as exc:
                # Most likely the connection (psycopg2.Error); whatever it
                # is, this greenlet must outlive it, or this process's
                # commits would never wake the others again.
                log.warning("wake-up publisher failed: %r", exc)
                conn.close()
                conn = None
                # Re-sent without their events: other processes re-query.
                self._pending.update(keys)
                add_pushed(self._pending_pushed, keys, None)
                self._has_pending.set()
                gevent.sleep(_backoff(attempt))
                attempt += 1

    def _listen_forever(self) -> None:
        attempt = 0
        while True:
            conn = None
            try:
                conn = self._connect("listener")
                with conn.cursor() as cur:
                    cur.execute(f"LISTEN {CHANNEL}")
                attempt = 0
                self.listening.set()
                # Anything may have happened while we were not listening.
                self._wakeups.wake_all()
                while True:
                    readable, _, _ = select([conn], [], [], LISTENER_HEARTBEAT_SECS)
                    if not readable:
                        with conn.cursor() as cur:
                            cur.execute("SELECT 1")
                    conn.poll()
                    if conn.notifies:
                        self._read_key_if_missing(conn)
                        self._deliver([n.payload for n in conn.notifies])
                        conn.notifies.clear()
            except Exception as exc:
                # Most likely the connection (psycopg2.Error, OSError);
                # whatever it is, listen again: a dead listener would leave
                # this process's waiters deaf to every other process.
                self.listening.clear()
                log.warning("wake-up listener failed: %r", exc)
                if conn is not None and not conn.closed:
                    conn.close()
                gevent.sleep(_backoff(attempt))
                attempt += 1

    def _deliver(self, payloads: list[str]) -> None:
        keys: set[str] = set()
        pushed: dict[int, list | None] = {}
        for payload in payloads:
            if _claimed_origin(payload) == self._origin:
                # Our own: publish() woke this process's waiters already.
                # Skipped before parsing and checking its signature, which
                # half of what a worker hears would otherwise cost for nothing.
                continue
            try:
                _, payload_keys, payload_pushed = _parse(payload, self._signing_key)
            except ValueError:
                # Not ours to read (another program on the channel, or a
                # damaged payload): whatever it meant, every waiter re-checks.
                log.warning("unreadable wake-up notification: %.200r", payload)
                payload_keys, payload_pushed = [WAKE_ALL], {}
            keys.update(payload_keys)
            add_pushed(pushed, payload_keys, payload_pushed)
        if keys:
            self._wakeups.wake(keys, pushed)
