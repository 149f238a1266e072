"""The rules of chat: accounts, conversations, ordered messages, receipts and
the per-user event stream. Views call this module and nothing below it.

Ordering, in short (the long form is docs/design.md):
- A conversation's `seq` is taken by `UPDATE conversations SET last_seq =
  last_seq + 1 ... RETURNING` inside the sending transaction. The row lock
  it takes serialises the conversation's senders until commit, so seqs are
  gapless and commit in order; a failed send rolls its increment back.
- A user's event `pos` is taken the same way from `users.event_head`. While
  one transaction holds pos 10 of alice's stream, nobody can take pos 11
  until it commits, so a reader can never see 11 before 10. (A global
  auto-increment id would allow exactly that, and a reader who got 11 would
  then skip 10 for ever.)
- Deadlocks are impossible because every transaction takes its locks in one
  order: conversation row, then member rows (ascending conversation id), then
  user rows (ascending user id).
- Idempotency: the client_id check runs after the conversation lock is held,
  so it cannot race another send in the same conversation; a unique
  constraint backs it.
- Wake-ups are published only after commit, so a woken reader always finds
  what it was woken for.

On PostgreSQL the hot paths (send, poll, acknowledgement) run the same steps
as server-side functions, one round trip each: pg_functions.py. How rows
become the API's JSON: wire.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Select, and_, bindparam, case, event, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import aliased

from chatapi import auth, pg_functions, wire
from chatapi.db import Database
from chatapi.errors import ApiError
from chatapi.group_commit import GroupCommit
from chatapi.longpoll import LongPolls, Page, PushedPage, page_after, pushed_events
from chatapi.models import Conversation, Event, Member, Message, Token, User
from chatapi.prepared import PreparedStatement, run_prepared, set_up_connection
from chatapi.wakeups import Pushed, conversation_key, token_key, user_key
from chatapi.wire import Json


@dataclass(frozen=True)
class Caller:
    """The authenticated user of a request."""

    id: int
    username: str


class _Stored(NamedTuple):
    """A message as stored: who sent it, the conversation's two users, its seq and id,
    the two users' stream heads after it (its receipt's pos; the message is just below),
    and its time (never before its predecessor's: see `_store_message`)."""

    sender: str
    user_low_id: int
    user_high_id: int
    seq: int
    message_id: int
    low_head: int
    high_head: int
    created_at: datetime


class _Send(NamedTuple):
    """One send, as the database functions take it (the fields are `chatapi_send`'s parameters)."""

    token_hash: str
    conversation_id: int
    text: str
    client_id: str | None
    now: datetime


class _Poll(NamedTuple):
    """An event poll's first, acknowledging call, as `chatapi_poll_batch` takes it."""

    token_hash: str
    after: int
    limit: int


def _stored_from_row(row: Any) -> _Stored | ApiError:
    """A row of `chatapi_send` or `chatapi_send_batch`: the stored message, or why there is none."""
    if row.sender is None:
        return unauthorized()
    if row.seq is None:
        return _not_found()
    return _Stored(
        row.sender,
        row.user_low_id,
        row.user_high_id,
        row.seq,
        row.message_id,
        row.low_head,
        row.high_head,
        row.created_at,
    )


class _Replay(Exception):
    """A send whose client_id was seen before: answer with the original."""

    def __init__(self, message: Json) -> None:
        self.message = message


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "a valid bearer token is required")


def _not_found() -> ApiError:
    return ApiError(404, "conversation_not_found", "no such conversation")


_SENDER = aliased(User, name="sender")
_MESSAGE_COLUMNS = (
    Message.id,
    Message.conversation_id,
    Message.seq,
    _SENDER.username.label("sender"),
    Message.text,
    Message.client_id,
    Message.created_at,
)
# The rows wire.message_json reads, with the sender's name: each read of messages adds its own where.
_MESSAGE_ROWS = select(*_MESSAGE_COLUMNS).join(_SENDER, _SENDER.id == Message.sender_id)


class Publish(Protocol):
    """Wakes the waiters of `keys` after a commit, here and in other processes (the Notifier's publish)."""

    def __call__(self, keys: Iterable[str], pushed: Pushed | None = None) -> None: ...


class Chat:
    def __init__(
        self,
        db: Database,
        long_polls: LongPolls,
        publish: Publish,
        # Tells the other processes, in the caller's transaction (Notifier.publish_at_commit).
        # No default: without it a revoked token's polls in other processes would sleep on.
        publish_at_commit: Callable[[Connection, list[str]], None],
        on_send_batch: Callable[[int], None] = lambda size: None,
        on_poll_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self._db = db
        self._long_polls = long_polls
        self._publish = publish
        self._publish_at_commit = publish_at_commit
        if db.is_postgresql:
            for engine in db.engines:
                event.listen(engine, "connect", set_up_connection)
        # Sends, and polls that acknowledge, that arrive while the database
        # is busy commit together, each kind on its own (group_commit.py);
        # `on_send_batch` and `on_poll_batch` are told each transaction's size.
        self._sends: GroupCommit[_Send, _Stored] = GroupCommit(
            self._store_messages_pg,
            max_in_flight=BATCHES_IN_FLIGHT,
            max_batch=BATCH_MAX,
            max_wait=BATCH_MAX_WAIT_SECS,
            on_batch=on_send_batch,
        )
        self._polls: GroupCommit[_Poll, list[Any]] = GroupCommit(
            self._poll_and_acknowledge_pg,
            max_in_flight=BATCHES_IN_FLIGHT,
            max_batch=BATCH_MAX,
            max_wait=BATCH_MAX_WAIT_SECS,
            on_batch=on_poll_batch,
        )

    def _publish_to_streams(self, pushed: dict[int, list[Json]]) -> None:
        """Wake the users whose streams got `pushed` (per user, as the stream shows them), handing them over."""
        self._publish([user_key(user_id) for user_id in pushed], pushed)

    def _fetch_prepared(self, prepared: PreparedStatement, **params: Any) -> list[Any]:
        """The rows of one hot read, on PostgreSQL on a bare cursor (`Database.fetch_all`)."""
        if self._db.is_postgresql:
            return self._db.fetch_all(prepared.call, {**prepared.defaults, **params})
        with self._db.reading() as connection:
            return connection.execute(prepared.statement, params).all()

    # Accounts and tokens -------------------------------------------------

    def register(self, username: str, password: str) -> Json:
        with self._db.reading() as connection:
            if connection.scalar(select(User.id).where(User.username == username)) is not None:
                raise _username_taken()
        password_hash = auth.hash_password(password)
        try:
            with self._db.writing() as connection:
                user_id = connection.scalar(
                    insert(User)
                    .values(username=username, password_hash=password_hash, created_at=utcnow())
                    .returning(User.id)
                )
                return wire.user_json(user_id, username)
        except IntegrityError:
            raise _username_taken() from None

    def sign_in(self, username: str | None, password: str) -> Json:
        """A new token for valid credentials; 401 otherwise, after the same work."""
        row = None
        if username is not None:
            with self._db.reading() as connection:
                row = connection.execute(
                    select(User.id, User.username, User.password_hash).where(User.username == username)
                ).one_or_none()
        if not auth.verify_password(row.password_hash if row else None, password) or row is None:
            raise ApiError(401, "invalid_credentials", "wrong username or password")
        token = auth.new_token()
        with self._db.writing() as connection:
            connection.execute(
                insert(Token).values(user_id=row.id, token_hash=auth.token_digest(token), created_at=utcnow())
            )
        return {"token": token, "user": wire.user_json(row.id, row.username)}

    def authenticate(self, token: str) -> Caller | None:
        rows = self._fetch_prepared(_AUTHENTICATE, token_hash=auth.token_digest(token))
        return Caller(rows[0].id, rows[0].username) if rows else None

    def revoke(self, token: str) -> None:
        """Delete the token; the long-polls waiting on it answer 401 at once."""
        token_hash = auth.token_digest(token)
        with self._db.writing() as connection:
            user_id = connection.scalar(
                Token.__table__.delete().where(Token.token_hash == token_hash).returning(Token.user_id)
            )
            if user_id is not None:
                # Other processes hear of it with this commit, before the wake-up
                # of anything committed later: a send's pushed events must not
                # answer their polls on this token (`publish_at_commit`).
                self._publish_at_commit(connection, [token_key(token_hash)])
        if user_id is not None:
            self._long_polls.wake_here([token_key(token_hash)])

    # Conversations --------------------------------------------------------

    def start_conversation(self, caller: Caller, peer_name: str | None) -> tuple[Json, bool]:
        """The conversation with `peer_name`, and whether this call created it."""
        with self._db.reading() as connection:
            peer_id = None
            if peer_name is not None:
                peer_id = connection.scalar(select(User.id).where(User.username == peer_name))
            if peer_id is None:
                raise ApiError(404, "user_not_found", "no such user")
            if peer_id == caller.id:
                raise ApiError(400, "invalid_peer", "you cannot start a conversation with yourself")
            low, high = sorted((caller.id, peer_id))
            existing = connection.scalar(
                select(Conversation.id).where(Conversation.user_low_id == low, Conversation.user_high_id == high)
            )
        if existing is not None:
            return self.conversation(caller, existing), False
        now = utcnow()
        try:
            with self._db.writing() as connection:
                conversation_id = connection.scalar(
                    insert(Conversation)
                    .values(user_low_id=low, user_high_id=high, created_at=now, last_activity_at=now, last_seq=0)
                    .returning(Conversation.id)
                )
                connection.execute(
                    insert(Member),
                    [
                        {"conversation_id": conversation_id, "user_id": low, "delivered_seq": 0, "read_seq": 0},
                        {"conversation_id": conversation_id, "user_id": high, "delivered_seq": 0, "read_seq": 0},
                    ],
                )
                _append_events(
                    connection,
                    {
                        low: [_event("conversation", conversation_id, subject_user_id=high)],
                        high: [_event("conversation", conversation_id, subject_user_id=low)],
                    },
                )
        except IntegrityError:
            # The other party created it at the same moment.
            with self._db.reading() as connection:
                conversation_id = connection.scalar(
                    select(Conversation.id).where(Conversation.user_low_id == low, Conversation.user_high_id == high)
                )
            return self.conversation(caller, conversation_id), False
        self._publish([user_key(low), user_key(high)])
        return self.conversation(caller, conversation_id), True

    def conversations(self, caller: Caller) -> list[Json]:
        with self._db.reading() as connection:
            return [wire.conversation_json(row) for row in connection.execute(_conversation_query(caller.id))]

    def conversation(self, caller: Caller, conversation_id: int) -> Json:
        with self._db.reading() as connection:
            row = connection.execute(
                _conversation_query(caller.id).where(Conversation.id == conversation_id)
            ).one_or_none()
        if row is None:
            raise _not_found()
        return wire.conversation_json(row)

    # Messages -------------------------------------------------------------

    def send(self, token: str | None, conversation_id: int, text: str, client_id: str | None) -> tuple[Json, bool]:
        """Store a message from the token's user; return it with whether it is new (False: a replay).

        401 for a bad token, 404 unless the user is in the conversation.
        Takes the token, not a Caller: on PostgreSQL the token lookup and
        the whole send are one round trip (`pg_functions.SEND_FUNCTION`, or
        `SEND_BATCH_FUNCTION` for sends committed together: `_sends`).
        """
        if token is None:
            raise unauthorized()
        now = utcnow()
        stored = None
        if self._db.is_postgresql:
            try:
                stored = self._sends.submit(_Send(auth.token_digest(token), conversation_id, text, client_id, now))
            except IntegrityError:
                pass  # A replayed client_id: the steps below answer it.
        if stored is None:
            try:
                stored = self._store_message_in_steps(token, conversation_id, text, client_id, now)
            except _Replay as replay:
                return replay.message, False
        message = wire.message(
            stored.message_id, conversation_id, stored.seq, stored.sender, text, client_id, stored.created_at
        )
        # Both streams got the message and, just above it, the sender's
        # receipt: pushed with the wake-up, so a waiting poll answers
        # without asking the database again.
        pushed = {
            user_id: [
                wire.message_event_json(head - 1, message),
                wire.receipt_json(head, conversation_id, stored.sender, stored.seq, stored.seq),
            ]
            for user_id, head in ((stored.user_low_id, stored.low_head), (stored.user_high_id, stored.high_head))
        }
        self._publish(
            [user_key(stored.user_low_id), user_key(stored.user_high_id), conversation_key(conversation_id)], pushed
        )
        return message, True

    def _store_message_in_steps(
        self, token: str, conversation_id: int, text: str, client_id: str | None, now: datetime
    ) -> _Stored:
        """`_store_message` for the token's user; raises `_Replay` for a replayed client_id."""
        caller = self.authenticate(token)
        if caller is None:
            raise unauthorized()
        try:
            return self._store_message(caller, conversation_id, text, client_id, now)
        except IntegrityError:
            # A concurrent send with the same client_id won the race; a
            # second attempt finds it under the lock and replays it.
            return self._store_message(caller, conversation_id, text, client_id, now)

    def _store_message(
        self, caller: Caller, conversation_id: int, text: str, client_id: str | None, now: datetime
    ) -> _Stored:
        with self._db.writing() as connection:
            # `now` was read before the conversation's row was locked, so a
            # message that took the lock earlier may have a later time: its
            # successor takes that time instead, as in `chatapi_send`.
            head = connection.execute(
                update(Conversation)
                .where(
                    Conversation.id == conversation_id,
                    or_(Conversation.user_low_id == caller.id, Conversation.user_high_id == caller.id),
                )
                .values(
                    last_seq=Conversation.last_seq + 1,
                    last_activity_at=case(
                        (Conversation.last_activity_at > now, Conversation.last_activity_at), else_=now
                    ),
                )
                .returning(
                    Conversation.last_seq,
                    Conversation.user_low_id,
                    Conversation.user_high_id,
                    Conversation.last_activity_at,
                )
            ).one_or_none()
            if head is None:
                raise _not_found()
            if client_id is not None:
                _check_replay(connection, conversation_id, caller.id, client_id, text)
            seq = head.last_seq
            message_id = connection.scalar(
                insert(Message)
                .values(
                    conversation_id=conversation_id,
                    seq=seq,
                    sender_id=caller.id,
                    text=text,
                    client_id=client_id,
                    created_at=head.last_activity_at,
                )
                .returning(Message.id)
            )
            # Sending counts as reading (and so as delivery) up to one's own message.
            connection.execute(
                update(Member)
                .where(Member.conversation_id == conversation_id, Member.user_id == caller.id)
                .values(read_seq=seq, delivered_seq=seq)
            )
            events = [
                _event("message", conversation_id, message_id=message_id),
                _event("receipt", conversation_id, caller.id, delivered_seq=seq, read_seq=seq),
            ]
            stored = _append_events(connection, {head.user_low_id: events, head.user_high_id: events})
        return _Stored(
            caller.username,
            head.user_low_id,
            head.user_high_id,
            seq,
            message_id,
            stored[head.user_low_id][-1]["pos"],
            stored[head.user_high_id][-1]["pos"],
            head.last_activity_at,
        )

    def _store_messages_pg(self, sends: list[_Send]) -> list[_Stored | Exception]:
        """`_store_message` for each of `sends`, in one round trip and one transaction.

        One send calls `chatapi_send`, several `chatapi_send_batch`
        (`pg_functions`). An outcome is an exception for a bad token (401), a
        sender outside the conversation (404), or a replayed client_id
        (IntegrityError: `send` answers it through `_store_message_in_steps`).
        """
        if len(sends) == 1:
            return [self._store_message_pg(sends[0])]
        params = {
            "token_hashes": [send.token_hash for send in sends],
            "conversation_ids": [send.conversation_id for send in sends],
            "texts": [send.text for send in sends],
            "client_ids": [send.client_id for send in sends],
            "nows": [send.now for send in sends],
        }
        rows = self._fetch_batch(pg_functions.CALL_SEND_BATCH, params)
        if rows is None:
            # A replayed client_id, most likely: only that send must fail.
            return [self._store_message_pg(send) for send in sends]
        return [_stored_from_row(row) for row in rows]

    def _fetch_batch(self, statement: str, params: dict[str, Any]) -> list[Any] | None:
        """The rows of a batch call, or None when PostgreSQL certainly rolled all of it back.

        Certainly: a constraint violation (SQLSTATE class 23), a
        serialization failure or a deadlock (40001, 40P01, 40002); the caller
        then runs the batch's calls again one by one, so that each gets its
        own outcome. After a lost connection, or 40003 (statement completion
        unknown), a commit may or may not have happened, and running them
        again could store a send twice: that error is raised, to every call
        of the batch.
        """
        try:
            return self._db.fetch_all(statement, params)
        except DBAPIError as exc:
            if certainly_rolled_back(exc):
                return None
            raise

    def _store_message_pg(self, send: _Send) -> _Stored | Exception:
        """One send's outcome through `chatapi_send` (`pg_functions.SEND_FUNCTION`), in one round trip."""
        try:
            rows = self._db.fetch_all(pg_functions.CALL_SEND, send._asdict())
        except DBAPIError as exc:
            return exc
        return _stored_from_row(rows[0]) if rows else unauthorized()

    def mark_read(self, caller: Caller, conversation_id: int, seq: int) -> Json:
        with self._db.writing() as connection:
            conversation = _membership(connection, caller.id, conversation_id)
            if seq > conversation.last_seq:
                raise ApiError(400, "invalid_seq", f"seq must be at most last_seq ({conversation.last_seq})")
            receipts = _advance_with_receipts(connection, caller, conversation, seq, read=True)
        if receipts:
            self._publish_to_streams(receipts)
        return self.conversation(caller, conversation_id)

    def messages(
        self,
        caller: Caller,
        token: str,
        conversation_id: int,
        *,
        after: int | None,
        before: int | None,
        limit: int,
        timeout: float,
        acknowledge: bool = True,
    ) -> Page:
        """A conversation's messages: its history, or those after a cursor, long-polling.

        The cursor acknowledges delivery up to it, unless not `acknowledge`.
        """
        with self._db.reading() as connection:
            conversation = _membership(connection, caller.id, conversation_id)
            if after is None:
                return _history(connection, conversation_id, before, limit, conversation.last_seq)
        upto = min(after, conversation.last_seq)
        if acknowledge and upto > conversation.delivered_seq:
            self._acknowledge_conversation(caller, conversation_id, upto)

        def check(connection: Connection) -> tuple[Page, bool]:
            head = connection.scalar(select(Conversation.last_seq).where(Conversation.id == conversation_id))

            def messages() -> list[Json]:
                rows = connection.execute(
                    _MESSAGE_ROWS.where(Message.conversation_id == conversation_id, Message.seq > after)
                    .order_by(Message.seq)
                    .limit(limit)
                )
                return [wire.message_json(row) for row in rows]

            return page_after(after, head, messages, "seq")

        keys = [conversation_key(conversation_id)]
        return self._long_poll(keys, caller.id, token, timeout, check)

    # The event stream -----------------------------------------------------

    def events(self, token: str | None, *, after: int, limit: int, timeout: float, acknowledge: bool = True) -> Page:
        """The events of the token's user after `after`, long-polling up to `timeout`; 401 for a bad token.

        `after` acknowledges the message events up to it, unless not `acknowledge`.

        Takes the token, not a Caller: on PostgreSQL the token lookup, the
        acknowledgement and the first check are one round trip
        (`pg_functions.POLL_FUNCTION`, or `POLL_BATCH_FUNCTION` for polls
        committed together: `_polls`), the hottest path of the service.
        """
        if token is None:
            raise unauthorized()
        if self._db.is_postgresql:
            return self._events_pg(token, after, limit, timeout, acknowledge)
        caller = self.authenticate(token)
        if caller is None:
            raise unauthorized()
        if acknowledge:
            self._acknowledge_events(caller, after)

        def check(connection: Connection) -> tuple[Page, bool]:
            head = connection.execute(_EVENT_HEAD, {"user_id": caller.id}).scalar_one()
            return page_after(after, head, lambda: _events_after(connection, caller.id, after, limit), "pos")

        return self._long_poll([user_key(caller.id)], caller.id, token, timeout, check, pushed_events(after, limit))

    def _events_pg(self, token: str, after: int, limit: int, timeout: float, acknowledge: bool) -> Page:
        # The re-checks' parameters: they never acknowledge. The first call
        # does (unless only looking), grouped with others (`_polls`).
        params = {
            "token_hash": auth.token_digest(token),
            "after": after,
            "limit": limit,
            "lazy_step": ACKED_POS_LAZY_STEP,
            "acknowledge": False,
        }
        deadline = time.monotonic() + timeout
        since = self._long_polls.sequence
        if acknowledge:
            rows = self._polls.submit(_Poll(params["token_hash"], after, limit))
        else:
            rows = self._db.fetch_all(pg_functions.CALL_POLL, params)
        if not rows:
            raise unauthorized()
        caller_id, receipts = rows[0].caller_id, rows[0].receipts
        if receipts:
            pushed = _receipts_from_array(receipts, rows[0].caller_name)
            self._publish_to_streams(pushed)
        page, ready = _poll_page(rows, after)
        del rows  # Not kept alive while the request waits: idle long-polls are many.

        def check() -> tuple[Page, bool]:
            rows = self._db.fetch_all(pg_functions.CALL_POLL, params)
            if not rows:
                raise unauthorized()  # Revoked while waiting (`revoke` wakes it).
            return _poll_page(rows, after)

        return self._long_polls.wait(
            [user_key(caller_id), token_key(params["token_hash"])],
            caller_id,
            deadline,
            check,
            since,
            page,
            ready,
            pushed_events(after, limit),
        )

    def _poll_and_acknowledge_pg(self, polls: list[_Poll]) -> list[list[Any] | Exception]:
        """Each poll's rows of `chatapi_poll` (acknowledging), in one round trip and one transaction.

        One poll calls `chatapi_poll`, several `chatapi_poll_batch`
        (`pg_functions`). No rows: the poll's token is not valid.
        """
        if len(polls) == 1:
            return [self._poll_and_acknowledge_one_pg(polls[0])]
        params = {
            "token_hashes": [poll.token_hash for poll in polls],
            "afters": [poll.after for poll in polls],
            "limits": [poll.limit for poll in polls],
            "lazy_step": ACKED_POS_LAZY_STEP,
        }
        rows = self._fetch_batch(pg_functions.CALL_POLL_BATCH, params)
        if rows is None:
            # A deadlock with a transaction outside the lock order, say.
            return [self._poll_and_acknowledge_one_pg(poll) for poll in polls]
        answers: dict[int, list[Any]] = {}
        for row in rows:
            answers.setdefault(row.poll, []).append(row)
        return [answers.get(number, []) for number in range(1, len(polls) + 1)]

    def _poll_and_acknowledge_one_pg(self, poll: _Poll) -> list[Any] | Exception:
        params = {**poll._asdict(), "lazy_step": ACKED_POS_LAZY_STEP, "acknowledge": True}
        try:
            return self._db.fetch_all(pg_functions.CALL_POLL, params)
        except DBAPIError as exc:
            return exc

    # Long-polling ---------------------------------------------------------

    def _long_poll(
        self,
        keys: list[str],
        user_id: int,
        token: str,
        timeout: float,
        check: Callable[[Connection], tuple[Page, bool]],
        pushed_page: PushedPage | None = None,
    ) -> Page:
        """Answer as soon as `check` has something, or with an empty page at the timeout.

        `check` returns the page and whether to answer now. The caller has
        just checked `token`; every re-check after a wake-up checks it again,
        so a waiting request answers 401 once it is revoked (`revoke` wakes it).
        """
        token_hash = auth.token_digest(token)
        keys = [*keys, token_key(token_hash)]

        def check_now() -> tuple[Page, bool]:
            with self._db.reading() as connection:
                return check(connection)

        def recheck() -> tuple[Page, bool]:
            with self._db.reading() as connection:
                if run_prepared(connection, _AUTHENTICATE, token_hash=token_hash).one_or_none() is None:
                    raise unauthorized()
                return check(connection)

        deadline = time.monotonic() + timeout
        since = self._long_polls.sequence
        page, ready = check_now()
        return self._long_polls.wait(keys, user_id, deadline, recheck, since, page, ready, pushed_page)

    # Delivery receipts ----------------------------------------------------

    def _acknowledge_conversation(self, caller: Caller, conversation_id: int, upto: int) -> None:
        with self._db.writing() as connection:
            conversation = _membership(connection, caller.id, conversation_id)
            receipts = _advance_with_receipts(connection, caller, conversation, upto, read=False)
        if receipts:
            self._publish_to_streams(receipts)

    def _acknowledge_events(self, caller: Caller, after: int) -> None:
        """Every message event at pos <= `after` is now delivered to the caller.

        On SQLite; PostgreSQL runs `pg_functions.ACKNOWLEDGE_FUNCTION` instead.
        The scan for newly delivered messages is a read; a write transaction
        follows only when a delivered mark can grow, or when the cursor has
        moved `ACKED_POS_LAZY_STEP` positions without delivering anything.
        """
        with self._db.reading() as connection:
            acked, head = connection.execute(_ACK_CURSOR, {"user_id": caller.id}).one()
            after = min(after, head)
            if after <= acked:
                return
            params = {"user_id": caller.id, "acked": acked, "after": after}
            newest = connection.execute(_NEWLY_DELIVERED, params).all()
        if not newest and after - acked < ACKED_POS_LAZY_STEP:
            return
        with self._db.writing() as connection:
            receipts: dict[int, list[Json]] = {}
            for conversation_id, upto, peer_id in newest:
                grown = _advance(connection, caller.id, conversation_id, upto, read=False)
                if grown:
                    receipt = _event("receipt", conversation_id, caller.id, *grown)
                    receipts.setdefault(caller.id, []).append(receipt)
                    receipts.setdefault(peer_id, []).append(receipt)
            stored = _append_events(connection, receipts, acked_pos=(caller.id, after))
        if receipts:
            pushed = _receipts_json(stored, caller.username)
            self._publish_to_streams(pushed)


# Queries and row-level steps ------------------------------------------------

# A poll that delivers nothing new writes its cursor (users.acked_pos) only
# once it has moved this many positions: re-scanning up to this many events,
# none of them a new message from the peer, costs far less than a write
# transaction on every poll (measured in docs/performance.md).
ACKED_POS_LAZY_STEP = 64
# Group commit on PostgreSQL (group_commit.py), for sends and for
# acknowledging polls alike: per worker, one transaction of each kind at a
# time, of at most 64 calls. One in flight did as well as two or four in
# `throughput`, better at R=1000 and no worse at R=200 (docs/performance.md,
# change 27). A call queued for 50 ms starts a batch of its own, so a call
# stuck on a row lock holds the others back no longer.
BATCHES_IN_FLIGHT = 1
BATCH_MAX = 64
BATCH_MAX_WAIT_SECS = 0.05
# Besides class 23, the SQLSTATEs after which PostgreSQL has certainly
# rolled a batch back (not 40003, statement completion unknown).
CERTAINLY_ROLLED_BACK = frozenset({"40001", "40002", "40P01"})


def certainly_rolled_back(error: DBAPIError) -> bool:
    """Whether PostgreSQL certainly rolled back the transaction that raised `error`."""
    code = getattr(error.orig, "pgcode", None) or ""
    return code.startswith("23") or code in CERTAINLY_ROLLED_BACK


# Hot-path statements (prepared.py).
_AUTHENTICATE = PreparedStatement(
    "chatapi_authenticate",
    select(User.id, User.username)
    .join(Token, Token.user_id == User.id)
    .where(Token.token_hash == bindparam("token_hash")),
)
# The event stream's reads on SQLite, where the steps run in Python
# (PostgreSQL runs them inside `chatapi_poll`).
_EVENT_HEAD = select(User.event_head).where(User.id == bindparam("user_id"))
_ACK_CURSOR = select(User.acked_pos, User.event_head).where(User.id == bindparam("user_id"))
_PEER = case(
    (Conversation.user_low_id == bindparam("user_id"), Conversation.user_high_id),
    else_=Conversation.user_low_id,
)
# Per conversation, the newest message from the peer among the caller's
# events in (acked, after]: how far delivery has now reached.
_NEWLY_DELIVERED = (
    select(Message.conversation_id, func.max(Message.seq), _PEER)
    .join(Event, Event.message_id == Message.id)
    .join(Conversation, Conversation.id == Message.conversation_id)
    .where(
        Event.user_id == bindparam("user_id"),
        Event.pos > bindparam("acked"),
        Event.pos <= bindparam("after"),
        Event.kind == "message",
        Message.sender_id != bindparam("user_id"),
    )
    .group_by(Message.conversation_id, _PEER)
    .order_by(Message.conversation_id)
)

# _append_events: move a user's event head by `count` (and its delivery cursor).
_bump_head = (
    update(User)
    .where(User.id == bindparam("b_user_id"))
    .values(event_head=User.event_head + bindparam("count"))
    .returning(User.event_head)
)
_BUMP_HEAD = PreparedStatement("chatapi_bump_head", _bump_head)
# Only SQLite runs it (PostgreSQL acknowledges in pg_functions), but preparing
# it on each PostgreSQL connection checks users.acked_pos is there: a schema
# without it fails the set-up, which /readyz names (SchemaNotMigrated).
_BUMP_HEAD_AND_ACK = PreparedStatement(
    "chatapi_bump_head_and_ack",
    _bump_head.values(acked_pos=case((User.acked_pos < bindparam("acked"), bindparam("acked")), else_=User.acked_pos)),
)
_INSERT_EVENTS = insert(Event)


def _advance_statement(*, read: bool) -> Any:
    mark = Member.read_seq if read else Member.delivered_seq
    values: dict[str, Any] = {
        "delivered_seq": case((Member.delivered_seq < bindparam("seq"), bindparam("seq")), else_=Member.delivered_seq)
    }
    if read:
        values["read_seq"] = bindparam("seq")
    return (
        update(Member)
        .where(
            Member.conversation_id == bindparam("b_conversation_id"),
            Member.user_id == bindparam("b_user_id"),
            mark < bindparam("seq"),
        )
        .values(**values)
        .returning(Member.delivered_seq, Member.read_seq)
    )


# _advance: the conditional UPDATE that grows a member's marks.
_ADVANCE_DELIVERED = PreparedStatement("chatapi_advance_delivered", _advance_statement(read=False))
_ADVANCE_READ = PreparedStatement("chatapi_advance_read", _advance_statement(read=True))


def _username_taken() -> ApiError:
    return ApiError(409, "username_taken", "that username is taken")


def _event(
    kind: str,
    conversation_id: int,
    subject_user_id: int | None = None,
    delivered_seq: int | None = None,
    read_seq: int | None = None,
    message_id: int | None = None,
) -> Json:
    return {
        "kind": kind,
        "conversation_id": conversation_id,
        "message_id": message_id,
        "subject_user_id": subject_user_id,
        "delivered_seq": delivered_seq,
        "read_seq": read_seq,
    }


def _append_events(
    connection: Connection, events_by_user: dict[int, list[Json]], acked_pos: tuple[int, int] | None = None
) -> dict[int, list[Json]]:
    """Give each user's new events the next positions of its stream and store them.

    Returns them as stored, per user (with "user_id" and "pos"), for the wake-up to push.

    Users are locked in ascending id order (see the module docstring).
    `acked_pos` (user id, pos) also moves that user's delivery cursor under
    the same lock.
    """
    user_ids = set(events_by_user)
    if acked_pos is not None:
        user_ids.add(acked_pos[0])
    stored: dict[int, list[Json]] = {}
    for user_id in sorted(user_ids):
        events = events_by_user.get(user_id, [])
        if acked_pos is not None and acked_pos[0] == user_id:
            head = run_prepared(
                connection, _BUMP_HEAD_AND_ACK, b_user_id=user_id, count=len(events), acked=acked_pos[1]
            )
        else:
            head = run_prepared(connection, _BUMP_HEAD, b_user_id=user_id, count=len(events))
        first = head.scalar_one() - len(events) + 1
        if events:
            stored[user_id] = [{**event, "user_id": user_id, "pos": first + i} for i, event in enumerate(events)]
    rows = [row for rows in stored.values() for row in rows]
    if rows:
        connection.execute(_INSERT_EVENTS, rows)
    return stored


def _check_replay(
    connection: Connection, conversation_id: int, sender_id: int, client_id: str | None, text: str
) -> None:
    row = connection.execute(
        _MESSAGE_ROWS.where(
            Message.conversation_id == conversation_id,
            Message.sender_id == sender_id,
            Message.client_id == client_id,
        )
    ).one_or_none()
    if row is None:
        return
    if row.text != text:
        raise ApiError(409, "client_id_reused", "this client_id was used for a different message")
    raise _Replay(wire.message_json(row))


def _membership(connection: Connection, user_id: int, conversation_id: int) -> Any:
    """The conversation's head and the caller's progress, or 404 for non-members."""
    row = connection.execute(
        select(
            Conversation.id.label("conversation_id"),
            Conversation.last_seq,
            Conversation.user_low_id,
            Conversation.user_high_id,
            Member.delivered_seq,
            Member.read_seq,
        )
        .join(Member, and_(Member.conversation_id == Conversation.id, Member.user_id == user_id))
        .where(Conversation.id == conversation_id)
    ).one_or_none()
    if row is None:
        raise _not_found()
    return row


def _advance(
    connection: Connection, user_id: int, conversation_id: int, seq: int, *, read: bool
) -> tuple[int, int] | None:
    """Move the user's delivered (and read) marks up to `seq`, never down.

    Returns the new (delivered_seq, read_seq) if anything grew, else None.
    The conditional UPDATE makes concurrent calls emit one receipt per growth.
    """
    statement = _ADVANCE_READ if read else _ADVANCE_DELIVERED
    row = run_prepared(
        connection, statement, b_conversation_id=conversation_id, b_user_id=user_id, seq=seq
    ).one_or_none()
    return (row.delivered_seq, row.read_seq) if row else None


def _advance_with_receipts(
    connection: Connection, caller: Caller, conversation: Any, seq: int, *, read: bool
) -> dict[int, list[Json]]:
    """`_advance` the caller's marks in `conversation` (a `_membership` row) and, if they grew,
    store the receipt in both users' streams; return it as pushed events (empty: nothing grew)."""
    grown = _advance(connection, caller.id, conversation.conversation_id, seq, read=read)
    if grown is None:
        return {}
    receipt = _event("receipt", conversation.conversation_id, caller.id, *grown)
    stored = _append_events(connection, {conversation.user_low_id: [receipt], conversation.user_high_id: [receipt]})
    return _receipts_json(stored, caller.username)


def _receipts_json(stored: dict[int, list[Json]], subject: str) -> dict[int, list[Json]]:
    """Receipts of `subject` as `_append_events` stored them, per user, as the stream shows them."""
    return {
        user_id: [
            wire.receipt_json(row["pos"], row["conversation_id"], subject, row["delivered_seq"], row["read_seq"])
            for row in rows
        ]
        for user_id, rows in stored.items()
    }


def _receipts_from_array(receipts: list[int], subject: str) -> dict[int, list[Json]]:
    """`_receipts_json` for `chatapi_acknowledge`'s answer: (user, pos, conversation, delivered, read) flattened."""
    by_user: dict[int, list[Json]] = {}
    for i in range(0, len(receipts), 5):
        user_id, pos, conversation_id, delivered_seq, read_seq = receipts[i : i + 5]
        by_user.setdefault(user_id, []).append(
            wire.receipt_json(pos, conversation_id, subject, delivered_seq, read_seq)
        )
    return by_user


def _history(connection: Connection, conversation_id: int, before: int | None, limit: int, head: int) -> Page:
    query = _MESSAGE_ROWS.where(Message.conversation_id == conversation_id).order_by(Message.seq.desc()).limit(limit)
    # Up to the head read before, whatever committed since: on PostgreSQL
    # each statement reads its own snapshot, and the page must not hold a
    # message above the `last_seq` it answers.
    query = query.where(Message.seq <= (head if before is None else min(before - 1, head)))
    rows = list(connection.execute(query))
    rows.reverse()
    return Page([wire.message_json(row) for row in rows], head)


def _conversation_query(user_id: int) -> Select:
    me = aliased(Member, name="me")
    peer = aliased(Member, name="peer")
    peer_user = aliased(User, name="peer_user")
    last = aliased(Message, name="last")
    last_sender = aliased(User, name="last_sender")
    return (
        select(
            Conversation.id,
            Conversation.created_at,
            Conversation.last_seq,
            me.read_seq,
            peer.delivered_seq.label("peer_delivered_seq"),
            peer.read_seq.label("peer_read_seq"),
            peer_user.username.label("peer"),
            last.id.label("last_id"),
            last.text.label("last_text"),
            last.client_id.label("last_client_id"),
            last.created_at.label("last_created_at"),
            last_sender.username.label("last_sender"),
        )
        .join(me, and_(me.conversation_id == Conversation.id, me.user_id == user_id))
        .join(peer, and_(peer.conversation_id == Conversation.id, peer.user_id != user_id))
        .join(peer_user, peer_user.id == peer.user_id)
        .outerjoin(last, and_(last.conversation_id == Conversation.id, last.seq == Conversation.last_seq))
        .outerjoin(last_sender, last_sender.id == last.sender_id)
        .order_by(Conversation.last_activity_at.desc(), Conversation.id.desc())
    )


def _events_after_query() -> Select:
    subject = aliased(User, name="subject")
    return (
        select(
            Event.pos,
            Event.kind,
            Event.conversation_id.label("event_conversation_id"),
            Event.delivered_seq,
            Event.read_seq,
            subject.username.label("subject"),
            Conversation.created_at.label("conversation_created_at"),
            *_MESSAGE_COLUMNS,
        )
        .outerjoin(Message, Message.id == Event.message_id)
        .outerjoin(_SENDER, _SENDER.id == Message.sender_id)
        .outerjoin(subject, subject.id == Event.subject_user_id)
        .outerjoin(Conversation, and_(Conversation.id == Event.conversation_id, Event.kind == "conversation"))
        .where(Event.user_id == bindparam("user_id"), Event.pos > bindparam("after"))
        .order_by(Event.pos)
        .limit(bindparam("limit"))
    )


_EVENTS_AFTER = _events_after_query()


def _events_after(connection: Connection, user_id: int, after: int, limit: int) -> list[Json]:
    rows = connection.execute(_EVENTS_AFTER, {"user_id": user_id, "after": after, "limit": limit})
    return [wire.event_json(row) for row in rows]


def _poll_page(rows: list[Any], after: int) -> tuple[Page, bool]:
    """The page of a `chatapi_poll` answer, and whether to answer now (`check` in `Chat.events`)."""
    return page_after(after, rows[0].head, lambda: [wire.event_json(row) for row in rows if row.pos is not None], "pos")
