"""The hot units of work on PostgreSQL, as server-side functions.

One round trip each instead of five to eight and, called on an autocommit
connection, each is one transaction without a BEGIN or COMMIT round trip
(an error anywhere in it rolls all of it back). `install` creates them in
`pg_temp` on each new connection, so they live as long as the connection
and always match the code that calls them: no migration, and a rolling
deploy never runs one version's Python against another's SQL.

They follow the Python steps of chat.py (used on SQLite) statement for
statement: same locks, same order, same events; the API tests run both.
Why they exist, and what each saved: docs/performance.md.
"""

from __future__ import annotations

from typing import Any

# `Chat._store_message` (chat.py) without the replay check, after the token lookup: no
# row for a bad token; a row with NULL seq when the user is not in the
# conversation. A replayed client_id violates the unique constraint here
# (IntegrityError), and `send` answers it through `_store_message`.
SEND_FUNCTION = """
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

# `Chat._acknowledge_events` (chat.py) after its arguments are known: returns the
# receipts it added to streams, flattened as (user id, pos, conversation id,
# delivered_seq, read_seq) five at a time, to wake and push to those users;
# empty if there were none.
ACKNOWLEDGE_FUNCTION = """
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

# `Chat.events` (chat.py) on PostgreSQL: the token lookup, the acknowledgement (when
# `p_acknowledge`) and the long-poll check (`check` in `Chat.events`) in one
# round trip. No row: the token is not valid. Otherwise the first row carries
# the caller, the receipts the acknowledgement added and the stream's head,
# and the rows carry the events after `p_after` (the event columns are NULL
# when there are none), with the columns of `_events_after_query`. The head is
# read in the same statement as the events, so it is never below one of them.
POLL_FUNCTION = """
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
CALL_SEND = "EXECUTE chatapi_send (%(token_hash)s, %(conversation_id)s, %(text)s, %(client_id)s, %(now)s)"
CALL_POLL = "EXECUTE chatapi_poll (%(token_hash)s, %(after)s, %(limit)s, %(lazy_step)s, %(acknowledge)s)"


def install(cursor: Any) -> None:
    """Create the functions and prepare their calls on a new connection (a psycopg2 cursor)."""
    # Plan the functions' statements and the prepared ones once per
    # connection. Left to choose, PostgreSQL kept re-planning several
    # of them on every call (pos ranges and LIMITs make a generic plan
    # look dearer than it is); all of them are index lookups, whose
    # generic plan is the plan (docs/performance.md, change 18).
    cursor.execute("SET plan_cache_mode = force_generic_plan")
    cursor.execute(SEND_FUNCTION)
    cursor.execute(ACKNOWLEDGE_FUNCTION)
    cursor.execute(POLL_FUNCTION)
    for statement in _PREPARE_CALLS:
        cursor.execute(statement)
