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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import and_, bindparam, case, event, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from chatapi import auth
from chatapi.db import Database
from chatapi.errors import ApiError
from chatapi.models import Conversation, Event, Member, Message, Token, User
from chatapi.wakeups import Pushed, Waiter, Wakeups, conversation_key, tokens_key, user_key

Json = dict[str, Any]


@dataclass(frozen=True)
class Caller:
    """The authenticated user of a request."""

    id: int
    username: str


@dataclass(frozen=True)
class Page:
    items: list[Json]
    head: int


class _Stored(NamedTuple):
    """A message as stored: who sent it, the conversation's two users, its seq and id,
    and the two users' stream heads after it (its receipt's pos; the message is just below)."""

    sender: str
    user_low_id: int
    user_high_id: int
    seq: int
    message_id: int
    low_head: int
    high_head: int


class _Replay(Exception):
    """A send whose client_id was seen before: answer with the original."""

    def __init__(self, message: Json):
        self.message = message


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "a valid bearer token is required")


def _not_found() -> ApiError:
    return ApiError(404, "conversation_not_found", "no such conversation")


def _user_json(user_id: int, username: str) -> Json:
    return {"id": user_id, "username": username}


def _message_json(row: Any) -> Json:
    return {
        "id": row.id,
        "conversation_id": row.conversation_id,
        "seq": row.seq,
        "sender": row.sender,
        "text": row.text,
        "client_id": row.client_id,
        "created_at": rfc3339(row.created_at),
    }


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


class Chat:
    def __init__(
        self,
        db: Database,
        wakeups: Wakeups,
        publish: Callable[[Iterable[str], Pushed | None], None],
        on_woken: Callable[[bool], None] = lambda pushed: None,
    ):
        self._db = db
        self._wakeups = wakeups
        self._publish = publish
        # Told, for each woken long-poll, whether pushed events answered it.
        self._on_woken = on_woken
        if db.is_postgresql:
            for engine in db.engines:
                event.listen(engine, "connect", _prepare_statements)

    def _publish_to_streams(self, pushed: dict[int, list[Json]]) -> None:
        """Wake the users whose streams got `pushed` (per user, as the stream shows them), handing them over."""
        self._publish([user_key(user_id) for user_id in pushed], pushed)

    def _read(self, hot: _Hot, **params: Any) -> list[Any]:
        """The rows of one hot read, on PostgreSQL on a bare cursor (`Database.fetch_all`)."""
        if self._db.is_postgresql:
            return self._db.fetch_all(hot.call, {**hot.defaults, **params})
        with self._db.reading() as connection:
            return connection.execute(hot.statement, params).all()

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
                return _user_json(user_id, username)
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
        return {"token": token, "user": _user_json(row.id, row.username)}

    def authenticate(self, token: str) -> Caller | None:
        rows = self._read(_AUTHENTICATE, token_hash=auth.token_digest(token))
        return Caller(rows[0].id, rows[0].username) if rows else None

    def revoke(self, token: str) -> None:
        """Delete the token; the long-polls waiting on it answer 401 at once."""
        with self._db.writing() as connection:
            user_id = connection.scalar(
                Token.__table__.delete().where(Token.token_hash == auth.token_digest(token)).returning(Token.user_id)
            )
        if user_id is not None:
            self._publish([user_key(user_id), tokens_key(user_id)])

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
            return [_conversation_json(row) for row in connection.execute(_conversation_query(caller.id))]

    def conversation(self, caller: Caller, conversation_id: int) -> Json:
        with self._db.reading() as connection:
            row = connection.execute(
                _conversation_query(caller.id).where(Conversation.id == conversation_id)
            ).one_or_none()
        if row is None:
            raise _not_found()
        return _conversation_json(row)

    # Messages -------------------------------------------------------------

    def send(self, token: str | None, conversation_id: int, text_: str, client_id: str | None) -> tuple[Json, bool]:
        """Store a message from the token's user; return it with whether it is new (False: a replay).

        401 for a bad token, 404 unless the user is in the conversation.
        Takes the token, not a Caller: on PostgreSQL the token lookup and
        the whole send are one round trip (`_SEND_FUNCTION`).
        """
        if token is None:
            raise unauthorized()
        now = utcnow()
        stored = None
        if self._db.is_postgresql:
            try:
                stored = self._store_message_pg(token, conversation_id, text_, client_id, now)
            except IntegrityError:
                pass  # A replayed client_id: the steps below answer it.
        if stored is None:
            try:
                stored = self._store_message_in_steps(token, conversation_id, text_, client_id, now)
            except _Replay as replay:
                return replay.message, False
        message = {
            "id": stored.message_id,
            "conversation_id": conversation_id,
            "seq": stored.seq,
            "sender": stored.sender,
            "text": text_,
            "client_id": client_id,
            "created_at": rfc3339(now),
        }
        # Both streams got the message and, just above it, the sender's
        # receipt: pushed with the wake-up, so a waiting poll answers
        # without asking the database again.
        pushed = {
            user_id: [
                _message_event_json(head - 1, message),
                _receipt_json(head, conversation_id, stored.sender, stored.seq, stored.seq),
            ]
            for user_id, head in ((stored.user_low_id, stored.low_head), (stored.user_high_id, stored.high_head))
        }
        self._publish(
            [user_key(stored.user_low_id), user_key(stored.user_high_id), conversation_key(conversation_id)], pushed
        )
        return message, True

    def _store_message_in_steps(
        self, token: str, conversation_id: int, text_: str, client_id: str | None, now: datetime
    ) -> _Stored:
        """`_store_message` for the token's user; raises `_Replay` for a replayed client_id."""
        caller = self.authenticate(token)
        if caller is None:
            raise unauthorized()
        try:
            return self._store_message(caller, conversation_id, text_, client_id, now)
        except IntegrityError:
            # A concurrent send with the same client_id won the race; a
            # second attempt finds it under the lock and replays it.
            return self._store_message(caller, conversation_id, text_, client_id, now)

    def _store_message(
        self, caller: Caller, conversation_id: int, text_: str, client_id: str | None, now: datetime
    ) -> _Stored:
        with self._db.writing() as connection:
            head = connection.execute(
                update(Conversation)
                .where(
                    Conversation.id == conversation_id,
                    or_(Conversation.user_low_id == caller.id, Conversation.user_high_id == caller.id),
                )
                .values(last_seq=Conversation.last_seq + 1, last_activity_at=now)
                .returning(Conversation.last_seq, Conversation.user_low_id, Conversation.user_high_id)
            ).one_or_none()
            if head is None:
                raise _not_found()
            if client_id is not None:
                _check_replay(connection, conversation_id, caller.id, client_id, text_)
            seq = head.last_seq
            message_id = connection.scalar(
                insert(Message)
                .values(
                    conversation_id=conversation_id,
                    seq=seq,
                    sender_id=caller.id,
                    text=text_,
                    client_id=client_id,
                    created_at=now,
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
        )

    def _store_message_pg(
        self, token: str, conversation_id: int, text_: str, client_id: str | None, now: datetime
    ) -> _Stored:
        """`_store_message` in one round trip: the function `chatapi_send` (see `_SEND_FUNCTION`).

        A replayed client_id violates the unique constraint there
        (IntegrityError), and `send` answers it through `_store_message`.
        """
        params = {
            "token_hash": auth.token_digest(token),
            "conversation_id": conversation_id,
            "text": text_,
            "client_id": client_id,
            "now": now,
        }
        rows = self._db.fetch_all(_CALL_SEND, params)
        if not rows:
            raise unauthorized()
        row = rows[0]
        if row.seq is None:
            raise _not_found()
        return _Stored(
            row.sender, row.user_low_id, row.user_high_id, row.seq, row.message_id, row.low_head, row.high_head
        )

    def mark_read(self, caller: Caller, conversation_id: int, seq: int) -> Json:
        with self._db.writing() as connection:
            conversation = _membership(connection, caller.id, conversation_id)
            if seq > conversation.last_seq:
                raise ApiError(400, "invalid_seq", f"seq must be at most last_seq ({conversation.last_seq})")
            grown = _advance(connection, caller.id, conversation_id, seq, read=True)
            if grown:
                receipts = _append_receipts(connection, caller, conversation, grown)
        if grown:
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
    ) -> Page:
        with self._db.reading() as connection:
            conversation = _membership(connection, caller.id, conversation_id)
            if after is None:
                return _history(connection, conversation_id, before, limit, conversation.last_seq)
        upto = min(after, conversation.last_seq)
        if upto > conversation.delivered_seq:
            self._acknowledge_conversation(caller, conversation_id, upto)

        def check(connection: Connection) -> tuple[Page, bool]:
            head = connection.scalar(select(Conversation.last_seq).where(Conversation.id == conversation_id))

            def messages() -> list[Json]:
                rows = connection.execute(
                    select(*_MESSAGE_COLUMNS)
                    .join(_SENDER, _SENDER.id == Message.sender_id)
                    .where(Message.conversation_id == conversation_id, Message.seq > after)
                    .order_by(Message.seq)
                    .limit(limit)
                )
                return [_message_json(row) for row in rows]

            return _page_after(after, head, messages, "seq")

        keys = [conversation_key(conversation_id), tokens_key(caller.id)]
        return self._long_poll(keys, caller.id, token, timeout, check)

    # The event stream -----------------------------------------------------

    def events(self, token: str | None, *, after: int, limit: int, timeout: float) -> Page:
        """The events of the token's user after `after`, long-polling up to `timeout`; 401 for a bad token.

        Takes the token, not a Caller: on PostgreSQL the token lookup, the
        acknowledgement and the first check are one round trip
        (`_POLL_FUNCTION`), the hottest path of the service.
        """
        if token is None:
            raise unauthorized()
        if self._db.is_postgresql:
            return self._events_pg(token, after, limit, timeout)
        caller = self.authenticate(token)
        if caller is None:
            raise unauthorized()
        self._acknowledge_events(caller, after)

        def check(connection: Connection) -> tuple[Page, bool]:
            head = connection.execute(_EVENT_HEAD, {"user_id": caller.id}).scalar_one()
            return _page_after(after, head, lambda: _events_after(connection, caller.id, after, limit), "pos")

        return self._long_poll([user_key(caller.id)], caller.id, token, timeout, check, _pushed_events(after, limit))

    def _events_pg(self, token: str, after: int, limit: int, timeout: float) -> Page:
        params = {
            "token_hash": auth.token_digest(token),
            "after": after,
            "limit": limit,
            "lazy_step": ACKED_POS_LAZY_STEP,
            "acknowledge": True,
        }
        deadline = time.monotonic() + timeout
        since = self._wakeups.sequence
        rows = self._db.fetch_all(_CALL_POLL, params)
        if not rows:
            raise unauthorized()
        caller_id, receipts = rows[0].caller_id, rows[0].receipts
        if receipts:
            pushed = _receipts_from_array(receipts, rows[0].caller_name)
            self._publish_to_streams(pushed)
        page, ready = _poll_page(rows, after)
        del rows  # Not kept alive while the request waits: idle long-polls are many.
        params["acknowledge"] = False

        def check() -> tuple[Page, bool]:
            rows = self._db.fetch_all(_CALL_POLL, params)
            if not rows:
                raise unauthorized()  # Revoked while waiting (`revoke` wakes it).
            return _poll_page(rows, after)

        return self._wait(
            [user_key(caller_id)], caller_id, deadline, check, since, page, ready, _pushed_events(after, limit)
        )

    # Long-polling ---------------------------------------------------------

    def _long_poll(
        self,
        keys: list[str],
        user_id: int,
        token: str,
        timeout: float,
        check: Callable[[Connection], tuple[Page, bool]],
        pushed_page: Callable[[Waiter], Page | None] | None = None,
    ) -> Page:
        """Answer as soon as `check` has something, or with an empty page at the timeout.

        `check` returns the page and whether to answer now. The caller has
        just checked `token`; every re-check after a wake-up checks it again,
        so a waiting request answers 401 once it is revoked (`revoke` wakes it).
        """
        token_hash = auth.token_digest(token)

        def check_now() -> tuple[Page, bool]:
            with self._db.reading() as connection:
                return check(connection)

        def recheck() -> tuple[Page, bool]:
            with self._db.reading() as connection:
                if _core(connection, _AUTHENTICATE, token_hash=token_hash).one_or_none() is None:
                    raise unauthorized()
                return check(connection)

        deadline = time.monotonic() + timeout
        since = self._wakeups.sequence
        page, ready = check_now()
        return self._wait(keys, user_id, deadline, recheck, since, page, ready, pushed_page)

    def _wait(
        self,
        keys: list[str],
        user_id: int,
        deadline: float,
        check: Callable[[], tuple[Page, bool]],
        since: int,
        page: Page,
        ready: bool,
        pushed_page: Callable[[Waiter], Page | None] | None = None,
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
                pushed = pushed_page(waiter) if woken and pushed_page is not None else None
                if woken:
                    self._on_woken(pushed is not None)
                if pushed is not None:
                    return pushed
                page, ready = check()
                if ready:
                    return page

    # Delivery receipts ----------------------------------------------------

    def _acknowledge_conversation(self, caller: Caller, conversation_id: int, upto: int) -> None:
        with self._db.writing() as connection:
            conversation = _membership(connection, caller.id, conversation_id)
            grown = _advance(connection, caller.id, conversation_id, upto, read=False)
            if grown:
                receipts = _append_receipts(connection, caller, conversation, grown)
        if grown:
            self._publish_to_streams(receipts)

    def _acknowledge_events(self, caller: Caller, after: int) -> None:
        """Every message event at pos <= `after` is now delivered to the caller.

        On SQLite; PostgreSQL runs `_ACKNOWLEDGE_FUNCTION` instead.
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


# Hot-path statements, built once and run as Core statements: building and
# running an ORM statement per call cost several times the database's own
# time (docs/performance.md).
class _Hot:
    """A hot-path statement: a Core statement, which PostgreSQL also plans once per connection.

    Planning these statements cost PostgreSQL about as much as running them,
    and psycopg2 never prepares on its own; so every pooled PostgreSQL
    connection PREPAREs each of them once (`_prepare_statements`) and runs
    `EXECUTE name (...)`. SQLite runs the Core statement.
    """

    all: list[_Hot] = []

    def __init__(self, name: str, statement: Any) -> None:
        self.statement = statement
        compiled = statement.compile(dialect=_PG_NUMBERED)
        self.prepare = f"PREPARE {name} AS {compiled.string}"
        # Literal values in the statement (e.g. a kind) became parameters too.
        self.defaults = {key: value for key, value in compiled.params.items() if value is not None}
        self.execute = text(f"EXECUTE {name} (" + ", ".join(f":{key}" for key in compiled.positiontup) + ")")
        # The same for `Database.fetch_all` (psycopg2's parameter style).
        self.call = f"EXECUTE {name} (" + ", ".join(f"%({key})s" for key in compiled.positiontup) + ")"
        _Hot.all.append(self)


_PG_NUMBERED = postgresql.psycopg2.dialect(paramstyle="numeric_dollar")

_AUTHENTICATE = _Hot(
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
_BUMP_HEAD = _Hot("chatapi_bump_head", _bump_head)
_BUMP_HEAD_AND_ACK = _Hot(
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
_ADVANCE_DELIVERED = _Hot("chatapi_advance_delivered", _advance_statement(read=False))
_ADVANCE_READ = _Hot("chatapi_advance_read", _advance_statement(read=True))


def _core(connection: Connection, hot: _Hot, **params: Any) -> Any:
    """Run a hot-path statement: its prepared plan on PostgreSQL, the Core statement on SQLite."""
    if connection.dialect.name == "postgresql":
        return connection.execute(hot.execute, {**hot.defaults, **params})
    return connection.execute(hot.statement, params)


# The hot units of work on PostgreSQL, as server-side functions: one round
# trip each instead of five to eight, and, called on an autocommit connection,
# each is one transaction without a BEGIN or COMMIT round trip (an error
# anywhere in it rolls all of it back). They are created in `pg_temp` on each
# new connection (`_prepare_statements`), so they live as long as the
# connection and always match the code that calls them: no migration, and a
# rolling deploy never runs one version's Python against another's SQL.
# They follow the Python steps above (used on SQLite) statement for
# statement: same locks, same order, same events; the API tests run both.

# `Chat._store_message` without the replay check, after the token lookup: no
# row for a bad token; a row with NULL seq when the user is not in the
# conversation. A replayed client_id violates the unique constraint here
# (IntegrityError), and `send` answers it through `_store_message`.
_SEND_FUNCTION = """
CREATE FUNCTION pg_temp.chatapi_send(
    p_token_hash varchar, p_conversation_id bigint, p_text text, p_client_id varchar, p_now timestamp
) RETURNS TABLE (
    sender varchar, seq bigint, user_low_id bigint, user_high_id bigint, message_id bigint,
    low_head bigint, high_head bigint
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    the_sender_id bigint;
    the_sender varchar;
    new_seq bigint;
    low_id bigint;
    high_id bigint;
    new_message_id bigint;
    low_stream_head bigint;
    high_stream_head bigint;
BEGIN
    SELECT users.id, users.username INTO the_sender_id, the_sender
    FROM tokens JOIN users ON users.id = tokens.user_id
    WHERE tokens.token_hash = p_token_hash;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE conversations SET last_seq = last_seq + 1, last_activity_at = p_now
    WHERE id = p_conversation_id AND the_sender_id IN (user_low_id, user_high_id)
    RETURNING last_seq, user_low_id, user_high_id INTO new_seq, low_id, high_id;
    IF NOT FOUND THEN
        RETURN QUERY SELECT the_sender, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint,
            NULL::bigint;
        RETURN;
    END IF;
    INSERT INTO messages (conversation_id, seq, sender_id, text, client_id, created_at)
    VALUES (p_conversation_id, new_seq, the_sender_id, p_text, p_client_id, p_now)
    RETURNING id INTO new_message_id;
    -- Sending counts as reading (and so as delivery) up to one's own message.
    UPDATE members SET read_seq = new_seq, delivered_seq = new_seq
    WHERE conversation_id = p_conversation_id AND user_id = the_sender_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'conversation % has no member row for user %', p_conversation_id, the_sender_id;
    END IF;
    -- Both users' streams, locked in ascending id order: the message at
    -- head - 1, the sender's receipt at head; one insert for the four rows.
    UPDATE users SET event_head = event_head + 2 WHERE id = low_id RETURNING event_head INTO low_stream_head;
    UPDATE users SET event_head = event_head + 2 WHERE id = high_id RETURNING event_head INTO high_stream_head;
    INSERT INTO events (user_id, pos, kind, conversation_id, message_id, subject_user_id, delivered_seq, read_seq)
    VALUES (low_id, low_stream_head - 1, 'message', p_conversation_id, new_message_id, NULL, NULL, NULL),
           (low_id, low_stream_head, 'receipt', p_conversation_id, NULL, the_sender_id, new_seq, new_seq),
           (high_id, high_stream_head - 1, 'message', p_conversation_id, new_message_id, NULL, NULL, NULL),
           (high_id, high_stream_head, 'receipt', p_conversation_id, NULL, the_sender_id, new_seq, new_seq);
    RETURN QUERY SELECT the_sender, new_seq, low_id, high_id, new_message_id, low_stream_head, high_stream_head;
END
$$
"""

# `Chat._acknowledge_events` after its arguments are known: returns the
# receipts it added to streams, flattened as (user id, pos, conversation id,
# delivered_seq, read_seq) five at a time, to wake and push to those users;
# empty if there were none.
_ACKNOWLEDGE_FUNCTION = """
CREATE FUNCTION pg_temp.chatapi_acknowledge(p_user_id bigint, p_after bigint, p_lazy_step bigint)
RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    cursor_pos bigint;
    stream_head bigint;
    upto_pos bigint;
    delivery record;
    grown record;
    conversation_ids bigint[] := '{}';
    peer_ids bigint[] := '{}';
    delivered_seqs bigint[] := '{}';
    read_seqs bigint[] := '{}';
    member_id bigint;
    received bigint;
    new_head bigint;
    receipt record;
    receipt_pos bigint;
    receipts bigint[] := '{}';
BEGIN
    SELECT acked_pos, event_head INTO cursor_pos, stream_head FROM users WHERE id = p_user_id;
    upto_pos := least(p_after, stream_head);
    IF upto_pos <= cursor_pos THEN
        RETURN '{}';
    END IF;
    -- Per conversation, the newest message from the peer among the events in
    -- (cursor_pos, upto_pos]: how far delivery has now reached. Member rows
    -- are locked in ascending conversation id order.
    FOR delivery IN
        SELECT m.conversation_id,
            max(m.seq) AS upto,
            CASE WHEN c.user_low_id = p_user_id THEN c.user_high_id ELSE c.user_low_id END AS peer_id
        FROM events e
        JOIN messages m ON m.id = e.message_id
        JOIN conversations c ON c.id = m.conversation_id
        WHERE e.user_id = p_user_id AND e.pos > cursor_pos AND e.pos <= upto_pos
            AND e.kind = 'message' AND m.sender_id <> p_user_id
        GROUP BY m.conversation_id, 3
        ORDER BY m.conversation_id
    LOOP
        UPDATE members SET delivered_seq = delivery.upto
        WHERE conversation_id = delivery.conversation_id AND user_id = p_user_id AND delivered_seq < delivery.upto
        RETURNING delivered_seq, read_seq INTO grown;
        IF FOUND THEN
            conversation_ids := conversation_ids || delivery.conversation_id;
            peer_ids := peer_ids || delivery.peer_id;
            delivered_seqs := delivered_seqs || grown.delivered_seq;
            read_seqs := read_seqs || grown.read_seq;
        END IF;
    END LOOP;
    IF cardinality(conversation_ids) = 0 THEN
        IF upto_pos - cursor_pos < p_lazy_step THEN
            RETURN '{}';
        END IF;
        -- Only the cursor moves: losing it in a crash just means the range
        -- is scanned again, so this need not wait for the disk.
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    -- Each receipt goes to the caller's stream and to its peer's; users are
    -- locked in ascending id order, and the caller's cursor moves under its lock.
    FOR member_id IN SELECT DISTINCT u FROM unnest(peer_ids || p_user_id) AS u ORDER BY u LOOP
        received := CASE WHEN member_id = p_user_id THEN cardinality(peer_ids)
            ELSE (SELECT count(*) FROM unnest(peer_ids) AS p WHERE p = member_id) END;
        UPDATE users SET event_head = event_head + received,
            acked_pos = CASE WHEN id = p_user_id THEN greatest(acked_pos, upto_pos) ELSE acked_pos END
        WHERE id = member_id
        RETURNING event_head INTO new_head;
        receipt_pos := new_head - received;
        FOR receipt IN
            SELECT r.c, r.d, r.rd
            FROM unnest(conversation_ids, peer_ids, delivered_seqs, read_seqs) WITH ORDINALITY AS r (c, p, d, rd, n)
            WHERE member_id = p_user_id OR r.p = member_id
            ORDER BY r.n
        LOOP
            receipt_pos := receipt_pos + 1;
            INSERT INTO events (user_id, pos, kind, conversation_id, message_id, subject_user_id, delivered_seq,
                read_seq)
            VALUES (member_id, receipt_pos, 'receipt', receipt.c, NULL, p_user_id, receipt.d, receipt.rd);
            receipts := receipts || ARRAY[member_id, receipt_pos, receipt.c, receipt.d, receipt.rd];
        END LOOP;
    END LOOP;
    RETURN receipts;
END
$$
"""

# `Chat.events` on PostgreSQL: the token lookup, the acknowledgement (when
# `p_acknowledge`) and the long-poll check (`check` in `Chat.events`) in one
# round trip. No row: the token is not valid. Otherwise the first row carries
# the caller, the receipts the acknowledgement added and the stream's head,
# and the rows carry the events after `p_after` (the event columns are NULL
# when there are none), with the columns of `_events_after_query`. The head is
# read in the same statement as the events, so it is never below one of them.
_POLL_FUNCTION = """
CREATE FUNCTION pg_temp.chatapi_poll(
    p_token_hash varchar, p_after bigint, p_limit integer, p_lazy_step bigint, p_acknowledge boolean
) RETURNS TABLE (
    caller_id bigint, caller_name varchar, receipts bigint[], head bigint,
    pos bigint, kind varchar, event_conversation_id bigint, delivered_seq bigint, read_seq bigint,
    subject varchar, conversation_created_at timestamp,
    id bigint, conversation_id bigint, seq bigint, sender varchar, text text, client_id varchar,
    created_at timestamp
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    the_caller record;
    the_receipts bigint[] := '{}';
BEGIN
    SELECT users.id, users.username, users.event_head, users.acked_pos INTO the_caller
    FROM tokens JOIN users ON users.id = tokens.user_id
    WHERE tokens.token_hash = p_token_hash;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Only when there is something to acknowledge (chatapi_acknowledge's own first test).
    IF p_acknowledge AND least(p_after, the_caller.event_head) > the_caller.acked_pos THEN
        the_receipts := pg_temp.chatapi_acknowledge(the_caller.id, p_after, p_lazy_step);
    END IF;
    -- Nothing after p_after (most calls: every poll that goes on to wait):
    -- answer with the head just read, without planning the page's joins. An
    -- acknowledgement that added receipts moved the head, so it re-reads.
    IF the_caller.event_head <= p_after AND cardinality(the_receipts) = 0 THEN
        RETURN QUERY SELECT the_caller.id, the_caller.username, the_receipts, the_caller.event_head,
            NULL::bigint, NULL::varchar, NULL::bigint, NULL::bigint, NULL::bigint, NULL::varchar, NULL::timestamp,
            NULL::bigint, NULL::bigint, NULL::bigint, NULL::varchar, NULL::text, NULL::varchar, NULL::timestamp;
        RETURN;
    END IF;
    RETURN QUERY
    SELECT the_caller.id, the_caller.username, the_receipts, u.event_head, page.*
    FROM users u
    LEFT JOIN LATERAL (
        SELECT e.pos, e.kind, e.conversation_id, e.delivered_seq, e.read_seq,
            subject.username, c.created_at,
            m.id, m.conversation_id, m.seq, sender.username, m.text, m.client_id, m.created_at
        FROM events e
        LEFT JOIN messages m ON m.id = e.message_id
        LEFT JOIN users sender ON sender.id = m.sender_id
        LEFT JOIN users subject ON subject.id = e.subject_user_id
        LEFT JOIN conversations c ON c.id = e.conversation_id AND e.kind = 'conversation'
        WHERE e.user_id = u.id AND e.pos > p_after
        ORDER BY e.pos
        LIMIT p_limit
    ) AS page ON true
    WHERE u.id = the_caller.id
    ORDER BY page.pos;
END
$$
"""

# Each connection also prepares the calls, so their plans are made once.
_PREPARE_CALLS = (
    "PREPARE chatapi_send (varchar, bigint, text, varchar, timestamp) AS "
    "SELECT * FROM pg_temp.chatapi_send($1, $2, $3, $4, $5)",
    "PREPARE chatapi_poll (varchar, bigint, integer, bigint, boolean) AS "
    "SELECT * FROM pg_temp.chatapi_poll($1, $2, $3, $4, $5)",
)
# Run with `Database.fetch_all` (psycopg2's parameter style).
_CALL_SEND = "EXECUTE chatapi_send (%(token_hash)s, %(conversation_id)s, %(text)s, %(client_id)s, %(now)s)"
_CALL_POLL = "EXECUTE chatapi_poll (%(token_hash)s, %(after)s, %(limit)s, %(lazy_step)s, %(acknowledge)s)"


def _prepare_statements(dbapi_connection: Any, _record: Any) -> None:
    """On each new PostgreSQL connection: create the functions and prepare the hot statements.

    Both live as long as the connection does.
    """
    with dbapi_connection.cursor() as cursor:
        # Plan the functions' statements and the prepared ones once per
        # connection. Left to choose, PostgreSQL kept re-planning several
        # of them on every call (pos ranges and LIMITs make a generic plan
        # look dearer than it is); all of them are index lookups, whose
        # generic plan is the plan (docs/performance.md, change 18).
        cursor.execute("SET plan_cache_mode = force_generic_plan")
        cursor.execute(_SEND_FUNCTION)
        cursor.execute(_ACKNOWLEDGE_FUNCTION)
        cursor.execute(_POLL_FUNCTION)
        for statement in _PREPARE_CALLS:
            cursor.execute(statement)
        for hot in _Hot.all:
            cursor.execute(hot.prepare)
    # psycopg2 opened a transaction for these on a non-autocommit connection; end it.
    dbapi_connection.commit()


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
            head = _core(connection, _BUMP_HEAD_AND_ACK, b_user_id=user_id, count=len(events), acked=acked_pos[1])
        else:
            head = _core(connection, _BUMP_HEAD, b_user_id=user_id, count=len(events))
        first = head.scalar_one() - len(events) + 1
        if events:
            stored[user_id] = [{**event, "user_id": user_id, "pos": first + i} for i, event in enumerate(events)]
    rows = [row for rows in stored.values() for row in rows]
    if rows:
        connection.execute(_INSERT_EVENTS, rows)
    return stored


def _check_replay(
    connection: Connection, conversation_id: int, sender_id: int, client_id: str | None, text_: str
) -> None:
    row = connection.execute(
        select(*_MESSAGE_COLUMNS)
        .join(_SENDER, _SENDER.id == Message.sender_id)
        .where(
            Message.conversation_id == conversation_id,
            Message.sender_id == sender_id,
            Message.client_id == client_id,
        )
    ).one_or_none()
    if row is None:
        return
    if row.text != text_:
        raise ApiError(409, "client_id_reused", "this client_id was used for a different message")
    raise _Replay(_message_json(row))


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
    row = _core(connection, statement, b_conversation_id=conversation_id, b_user_id=user_id, seq=seq).one_or_none()
    return (row.delivered_seq, row.read_seq) if row else None


def _append_receipts(
    connection: Connection, caller: Caller, conversation: Any, grown: tuple[int, int]
) -> dict[int, list[Json]]:
    """Store the receipt of the caller's grown marks in both users' streams; return it as pushed events."""
    receipt = _event("receipt", conversation.conversation_id, caller.id, *grown)
    stored = _append_events(connection, {conversation.user_low_id: [receipt], conversation.user_high_id: [receipt]})
    return _receipts_json(stored, caller.username)


def _message_event_json(pos: int, message: Json) -> Json:
    return {"pos": pos, "type": "message", "message": message}


def _receipt_json(pos: int, conversation_id: int, user: str, delivered_seq: int, read_seq: int) -> Json:
    return {
        "pos": pos,
        "type": "receipt",
        "conversation_id": conversation_id,
        "user": user,
        "delivered_seq": delivered_seq,
        "read_seq": read_seq,
    }


def _receipts_json(stored: dict[int, list[Json]], subject: str) -> dict[int, list[Json]]:
    """Receipts of `subject` as `_append_events` stored them, per user, as the stream shows them."""
    return {
        user_id: [
            _receipt_json(row["pos"], row["conversation_id"], subject, row["delivered_seq"], row["read_seq"])
            for row in rows
        ]
        for user_id, rows in stored.items()
    }


def _receipts_from_array(receipts: list[int], subject: str) -> dict[int, list[Json]]:
    """`_receipts_json` for `chatapi_acknowledge`'s answer: (user, pos, conversation, delivered, read) flattened."""
    by_user: dict[int, list[Json]] = {}
    for i in range(0, len(receipts), 5):
        user_id, pos, conversation_id, delivered_seq, read_seq = receipts[i : i + 5]
        by_user.setdefault(user_id, []).append(_receipt_json(pos, conversation_id, subject, delivered_seq, read_seq))
    return by_user


def _history(connection: Connection, conversation_id: int, before: int | None, limit: int, head: int) -> Page:
    query = (
        select(*_MESSAGE_COLUMNS)
        .join(_SENDER, _SENDER.id == Message.sender_id)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.seq.desc())
        .limit(limit)
    )
    if before is not None:
        query = query.where(Message.seq < min(before, head + 1))
    rows = list(connection.execute(query))
    rows.reverse()
    return Page([_message_json(row) for row in rows], head)


def _conversation_query(user_id: int):
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


def _conversation_json(row: Any) -> Json:
    last_message = None
    if row.last_id is not None:
        last_message = {
            "id": row.last_id,
            "conversation_id": row.id,
            "seq": row.last_seq,
            "sender": row.last_sender,
            "text": row.last_text,
            "client_id": row.last_client_id,
            "created_at": rfc3339(row.last_created_at),
        }
    return {
        "id": row.id,
        "peer": row.peer,
        "created_at": rfc3339(row.created_at),
        "last_seq": row.last_seq,
        # Every message above the caller's read mark is the peer's: sending
        # moves one's own read mark to one's own message.
        "unread": row.last_seq - row.read_seq,
        "read_seq": row.read_seq,
        "peer_delivered_seq": row.peer_delivered_seq,
        "peer_read_seq": row.peer_read_seq,
        "last_message": last_message,
    }


def _new_conversation_json(row: Any) -> Json:
    """A conversation as it is at creation: the payload of `conversation` events."""
    return {
        "id": row.event_conversation_id,
        "peer": row.subject,
        "created_at": rfc3339(row.conversation_created_at),
        "last_seq": 0,
        "unread": 0,
        "read_seq": 0,
        "peer_delivered_seq": 0,
        "peer_read_seq": 0,
        "last_message": None,
    }


def _events_after_query():
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
    return [_event_json(row) for row in rows]


def _pushed_events(after: int, limit: int) -> Callable[[Waiter], Page | None]:
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


def _poll_page(rows: list[Any], after: int) -> tuple[Page, bool]:
    """The page of a `chatapi_poll` answer, and whether to answer now (`check` in `Chat.events`)."""
    return _page_after(after, rows[0].head, lambda: [_event_json(row) for row in rows if row.pos is not None], "pos")


def _page_after(after: int, head: int, items: Callable[[], list[Json]], position: str) -> tuple[Page, bool]:
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


def _event_json(row: Any) -> Json:
    if row.kind == "message":
        return _message_event_json(row.pos, _message_json(row))
    if row.kind == "receipt":
        return _receipt_json(row.pos, row.event_conversation_id, row.subject, row.delivered_seq, row.read_seq)
    return {"pos": row.pos, "type": "conversation", "conversation": _new_conversation_json(row)}
