"""The tables. The schema itself is owned by the Alembic migrations in
`migrations/`; these classes must match them (a test compares the two)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only gives auto-increment ids to INTEGER PRIMARY KEY columns.
BigId = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    username: Mapped[str] = mapped_column(String(32), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    # Highest `pos` handed out in this user's event stream. Taken under this
    # row's lock, so positions become visible in order (see docs/design.md).
    event_head: Mapped[int] = mapped_column(BigInteger, default=0)
    # Highest `pos` this user has acknowledged by asking for events after it.
    acked_pos: Mapped[int] = mapped_column(BigInteger, default=0)


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # SHA-256 of the token: the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (UniqueConstraint("user_low_id", "user_high_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # The pair is stored in id order so alice->bob and bob->alice collide on
    # the unique constraint.
    user_low_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    user_high_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    last_activity_at: Mapped[datetime] = mapped_column(DateTime)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)


class Member(Base):
    """One party's progress in a conversation."""

    __tablename__ = "members"

    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    delivered_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    read_seq: Mapped[int] = mapped_column(BigInteger, default=0)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "seq"),
        # Idempotent sends: the database, not a read-then-write check, refuses
        # a second copy. NULL client_ids never collide.
        UniqueConstraint("conversation_id", "sender_id", "client_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    sender_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    text: Mapped[str] = mapped_column(Text)
    client_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Event(Base):
    """One entry of a user's event stream.

    `kind` is message, receipt or conversation; the columns a kind does not
    use are NULL. Messages are referenced, not copied.
    """

    __tablename__ = "events"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    pos: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True)
    subject_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    delivered_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    read_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


Index("ix_members_user_id", Member.user_id)


class Secret(Base):
    """Keys the service keeps to itself, made by the migrations. `wakeups`
    signs the wake-up notifications between processes (notify_pg.py): other
    database roles can send on the channel, but cannot read this table."""

    __tablename__ = "secrets"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
