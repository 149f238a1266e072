"""How rows become the API's JSON (docs/api.md): one function per shape.

The chat rules (chat.py) decide what to answer; these only spell it, so a
message, a receipt or a conversation reads the same wherever it appears.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

Json = dict[str, Any]


def rfc3339(moment: datetime) -> str:
    """A stored (naive, UTC) time as the contract spells it: always six decimals, then Z.

    isoformat takes less than half of strftime's time (1.0 µs against 2.4), and
    every message and event answered spells one (docs/performance.md, change 32).
    """
    return moment.isoformat(timespec="microseconds") + "Z"


def user_json(user_id: int, username: str) -> Json:
    return {"id": user_id, "username": username}


def message(
    message_id: int,
    conversation_id: int,
    seq: int,
    sender: str,
    text: str,
    client_id: str | None,
    created_at: datetime,
) -> Json:
    return {
        "id": message_id,
        "conversation_id": conversation_id,
        "seq": seq,
        "sender": sender,
        "text": text,
        "client_id": client_id,
        "created_at": rfc3339(created_at),
    }


def message_json(row: Any) -> Json:
    return message(row.id, row.conversation_id, row.seq, row.sender, row.text, row.client_id, row.created_at)


def message_event_json(pos: int, message: Json) -> Json:
    return {"pos": pos, "type": "message", "message": message}


def receipt_json(pos: int, conversation_id: int, user: str, delivered_seq: int, read_seq: int) -> Json:
    return {
        "pos": pos,
        "type": "receipt",
        "conversation_id": conversation_id,
        "user": user,
        "delivered_seq": delivered_seq,
        "read_seq": read_seq,
    }


def conversation_json(row: Any) -> Json:
    last_message = None
    if row.last_id is not None:
        last_message = message(
            row.last_id, row.id, row.last_seq, row.last_sender, row.last_text, row.last_client_id, row.last_created_at
        )
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


def new_conversation_json(row: Any) -> Json:
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


def event_json(row: Any) -> Json:
    if row.kind == "message":
        return message_event_json(row.pos, message_json(row))
    if row.kind == "receipt":
        return receipt_json(row.pos, row.event_conversation_id, row.subject, row.delivered_seq, row.read_seq)
    return {"pos": row.pos, "type": "conversation", "conversation": new_conversation_json(row)}


# A page stops short of `limit` items once its texts could pass this many
# bytes of JSON: 1,000 messages of 4,000 emoji would be 48 MB (JSON escapes
# each as two \uXXXX, 12 bytes), held in memory for as long as a client
# leaves the answer unread. Clients already ask again when the last item is
# below the head (the contract's "limit cut the page"). Escaping keeps every
# answer ASCII: a character that cannot be UTF-8 can never fail a response.
PAGE_MAX_BYTES = 1 << 20
_ITEM_BYTES = 256  # an item's JSON but its text, generously


def _text_bytes(text: str) -> int:
    r"""At most how long `text` is as escaped JSON, without encoding it: an
    ASCII character is one byte or a two-byte escape (\n, \"), any other
    one in the Basic Multilingual Plane \uXXXX, any beyond it two of those."""
    if text.isascii():
        return 2 * len(text)
    return (12 if max(text) > "\uffff" else 6) * len(text)


def _size(item: Json) -> int:
    message = item.get("message") or item
    return _ITEM_BYTES + _text_bytes(message.get("text") or "")


def within_page_size(items: list[Json], *, keep_last: bool = False) -> list[Json]:
    """`items` cut to PAGE_MAX_BYTES, always keeping one: the first ones, or the last ones
    (a page of history, which the client continues below its lowest item)."""
    ordered = reversed(items) if keep_last else items
    total = 0
    for count, item in enumerate(ordered):
        total += _size(item)
        if total > PAGE_MAX_BYTES and count > 0:
            return items[len(items) - count :] if keep_last else items[:count]
    return items
