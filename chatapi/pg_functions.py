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
# (IntegrityError), and `send` answers it through `_store_message_in_steps`.
SEND_FUNCTION = """
CREATE FUNCTION pg_temp.chatapi_send(
    p_token_hash varchar, p_conversation_id bigint, p_text text, p_client_id varchar, p_now timestamp
) RETURNS TABLE (
    sender varchar, seq bigint, user_low_id bigint, user_high_id bigint, message_id bigint,
    low_head bigint, high_head bigint, created_at timestamp
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    the_sender_id bigint;
    the_sender varchar;
    new_seq bigint;
    new_created_at timestamp;
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
    -- A message's time is never before its predecessor's (nor the
    -- conversation's start): p_now was read before the row lock was taken.
    UPDATE conversations SET last_seq = last_seq + 1, last_activity_at = greatest(last_activity_at, p_now)
    WHERE id = p_conversation_id AND the_sender_id IN (user_low_id, user_high_id)
    RETURNING last_seq, user_low_id, user_high_id, last_activity_at INTO new_seq, low_id, high_id, new_created_at;
    IF NOT FOUND THEN
        RETURN QUERY SELECT the_sender, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint,
            NULL::bigint, NULL::timestamp;
        RETURN;
    END IF;
    INSERT INTO messages (conversation_id, seq, sender_id, text, client_id, created_at)
    VALUES (p_conversation_id, new_seq, the_sender_id, p_text, p_client_id, new_created_at)
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
    RETURN QUERY SELECT the_sender, new_seq, low_id, high_id, new_message_id, low_stream_head, high_stream_head,
        new_created_at;
END
$$
"""

# `chatapi_send` for several sends in one transaction (group commit, see
# group_commit.py), with one row per send in the order given. The locks are
# taken class by class in the order every transaction takes them (docs/design.md,
# "Locks"): all conversation rows, ascending id (a conversation's sends in the
# order given, which is their seq order); then member rows, ascending
# (conversation id, user id); then user rows, ascending id. Taking them send by
# send instead would hold one conversation's user rows while waiting for the
# next conversation's row, which another batch may hold while it waits for
# those users: a deadlock. Each user's new positions are handed out in the
# order of the sends, two per send (the message, then the sender's receipt),
# as `chatapi_send` does. A replayed client_id fails the whole batch
# (IntegrityError), which rolls all of it back; the caller then runs the sends
# one by one.
SEND_BATCH_FUNCTION = """
CREATE FUNCTION pg_temp.chatapi_send_batch(
    p_token_hashes varchar[], p_conversation_ids bigint[], p_texts text[], p_client_ids varchar[], p_nows timestamp[]
) RETURNS TABLE (
    sender varchar, seq bigint, user_low_id bigint, user_high_id bigint, message_id bigint,
    low_head bigint, high_head bigint, created_at timestamp
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n integer := cardinality(p_token_hashes);
    sender_ids bigint[];
    sender_names varchar[];
    seqs bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    low_ids bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    high_ids bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    message_ids bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    low_heads bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    high_heads bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    created_ats timestamp[] := array_fill(NULL::timestamp, ARRAY[n]);
    i integer;
    new_seq bigint;
    new_created_at timestamp;
    new_message_id bigint;
    low_id bigint;
    high_id bigint;
    member record;
    stream record;
    next_pos bigint;
BEGIN
    SELECT array_agg(users.id ORDER BY t.n), array_agg(users.username ORDER BY t.n) INTO sender_ids, sender_names
    FROM unnest(p_token_hashes) WITH ORDINALITY AS t (h, n)
    LEFT JOIN tokens ON tokens.token_hash = t.h
    LEFT JOIN users ON users.id = tokens.user_id;
    -- Conversation rows, ascending id (and each conversation's sends in the order they came).
    FOR i IN
        SELECT t.n FROM unnest(p_conversation_ids) WITH ORDINALITY AS t (c, n)
        WHERE sender_ids[t.n] IS NOT NULL ORDER BY t.c, t.n
    LOOP
        UPDATE conversations SET last_seq = last_seq + 1, last_activity_at = greatest(last_activity_at, p_nows[i])
        WHERE id = p_conversation_ids[i] AND sender_ids[i] IN (user_low_id, user_high_id)
        RETURNING last_seq, user_low_id, user_high_id, last_activity_at INTO new_seq, low_id, high_id, new_created_at;
        IF FOUND THEN
            seqs[i] := new_seq;
            low_ids[i] := low_id;
            high_ids[i] := high_id;
            created_ats[i] := new_created_at;
            INSERT INTO messages (conversation_id, seq, sender_id, text, client_id, created_at)
            VALUES (p_conversation_ids[i], new_seq, sender_ids[i], p_texts[i], p_client_ids[i], new_created_at)
            RETURNING id INTO new_message_id;
            message_ids[i] := new_message_id;
        END IF;
    END LOOP;
    -- Member rows, ascending (conversation id, user id): each sender reads up to its last message.
    FOR member IN
        SELECT t.c, t.u, max(t.s) AS upto
        FROM unnest(p_conversation_ids, sender_ids, seqs) AS t (c, u, s)
        WHERE t.s IS NOT NULL GROUP BY t.c, t.u ORDER BY t.c, t.u
    LOOP
        UPDATE members SET read_seq = member.upto, delivered_seq = member.upto
        WHERE conversation_id = member.c AND user_id = member.u;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'conversation % has no member row for user %', member.c, member.u;
        END IF;
    END LOOP;
    -- User rows, ascending id: two positions per send in each of its users' streams.
    FOR stream IN
        SELECT t.u, count(*) AS sends
        FROM unnest(low_ids || high_ids) AS t (u) WHERE t.u IS NOT NULL GROUP BY t.u ORDER BY t.u
    LOOP
        UPDATE users SET event_head = event_head + 2 * stream.sends WHERE id = stream.u
        RETURNING event_head - 2 * stream.sends INTO next_pos;
        FOR i IN 1..n LOOP
            IF low_ids[i] = stream.u THEN
                next_pos := next_pos + 2;
                low_heads[i] := next_pos;
            ELSIF high_ids[i] = stream.u THEN
                next_pos := next_pos + 2;
                high_heads[i] := next_pos;
            END IF;
        END LOOP;
    END LOOP;
    INSERT INTO events (user_id, pos, kind, conversation_id, message_id, subject_user_id, delivered_seq, read_seq)
    SELECT e.*
    FROM unnest(p_conversation_ids, sender_ids, seqs, low_ids, high_ids, message_ids, low_heads, high_heads)
        AS t (c, u, s, lo, hi, m, lh, hh),
    LATERAL (VALUES
        (t.lo, t.lh - 1, 'message', t.c, t.m, NULL::bigint, NULL::bigint, NULL::bigint),
        (t.lo, t.lh, 'receipt', t.c, NULL, t.u, t.s, t.s),
        (t.hi, t.hh - 1, 'message', t.c, t.m, NULL, NULL, NULL),
        (t.hi, t.hh, 'receipt', t.c, NULL, t.u, t.s, t.s)
    ) AS e
    WHERE t.s IS NOT NULL;
    RETURN QUERY
    SELECT sender_names[t.n], seqs[t.n], low_ids[t.n], high_ids[t.n], message_ids[t.n], low_heads[t.n], high_heads[t.n],
        created_ats[t.n]
    FROM generate_series(1, n) AS t (n);
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


def _page_sql(after: str, limit: str) -> str:
    """The page of a poll (`_events_after_query` in chat.py, as SQL): the
    caller's events after `after`, at most `limit`, with what each shows."""
    return f"""
        SELECT e.pos, e.kind, e.conversation_id, e.delivered_seq, e.read_seq,
            subject.username, c.created_at,
            m.id, m.conversation_id, m.seq, sender.username, m.text, m.client_id, m.created_at
        FROM events e
        LEFT JOIN messages m ON m.id = e.message_id
        LEFT JOIN users sender ON sender.id = m.sender_id
        LEFT JOIN users subject ON subject.id = e.subject_user_id
        LEFT JOIN conversations c ON c.id = e.conversation_id AND e.kind = 'conversation'
        WHERE e.user_id = u.id AND e.pos > {after}
        ORDER BY e.pos
        LIMIT {limit}
    """


# A poll's row when no event follows its cursor: the event columns of `_page_sql`, NULL.
_NO_EVENT = """NULL::bigint, NULL::varchar, NULL::bigint, NULL::bigint, NULL::bigint, NULL::varchar, NULL::timestamp,
            NULL::bigint, NULL::bigint, NULL::bigint, NULL::varchar, NULL::text, NULL::varchar, NULL::timestamp"""


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
        RETURN QUERY SELECT the_caller.id, the_caller.username, the_receipts, the_caller.event_head, __NO_EVENT__;
        RETURN;
    END IF;
    RETURN QUERY
    SELECT the_caller.id, the_caller.username, the_receipts, u.event_head, page.*
    FROM users u
    LEFT JOIN LATERAL (__PAGE__) AS page ON true
    WHERE u.id = the_caller.id
    ORDER BY page.pos;
END
$$
""".replace("__PAGE__", _page_sql("p_after", "p_limit")).replace("__NO_EVENT__", _NO_EVENT)

# `chatapi_poll` with acknowledgement for several polls in one transaction
# (group commit, see group_commit.py): one row per poll as `chatapi_poll`
# answers it, with the poll's number in the batch (1-based) in front; no row for
# a poll whose token is not valid. The locks are taken class by class in the
# order every transaction takes them (docs/design.md, "Locks"): all member rows,
# ascending (conversation id, user id), then all user rows, ascending id, so
# two batches, or a batch and a send, cannot deadlock. The receipts get their
# positions in the order of the polls (each poll's in ascending conversation
# id), as the same polls one by one would give them. A user with several polls
# in the batch acknowledges once, as far as the furthest of them; its receipts
# are told to its first poll. Every page is read after all the
# acknowledgements, so a poll's page may already hold a receipt a later poll
# of the batch added: committed with it, as if that poll had come first.
POLL_BATCH_FUNCTION = """
CREATE FUNCTION pg_temp.chatapi_poll_batch(
    p_token_hashes varchar[], p_afters bigint[], p_limits integer[], p_lazy_step bigint
) RETURNS TABLE (
    poll integer, caller_id bigint, caller_name varchar, receipts bigint[], head bigint,
    pos bigint, kind varchar, event_conversation_id bigint, delivered_seq bigint, read_seq bigint,
    subject varchar, conversation_created_at timestamp,
    id bigint, conversation_id bigint, seq bigint, sender varchar, text text, client_id varchar,
    created_at timestamp
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n integer := cardinality(p_token_hashes);
    caller_ids bigint[];
    caller_names varchar[];
    heads bigint[];
    cursors bigint[];
    -- The users who acknowledge, ascending: from where, up to where, and their first poll.
    ack_users bigint[] := '{}';
    ack_cursors bigint[];
    ack_uptos bigint[];
    ack_polls integer[];
    moving_users bigint[];
    delivery record;
    grown record;
    -- The receipts of grown delivered marks: conversation, subject, peer, marks,
    -- the subject's first poll, and their positions in the subject's and the peer's streams.
    r_conversations bigint[] := '{}';
    r_subjects bigint[] := '{}';
    r_peers bigint[] := '{}';
    r_delivered bigint[] := '{}';
    r_read bigint[] := '{}';
    r_polls integer[] := '{}';
    r_subject_pos bigint[];
    r_peer_pos bigint[];
    in_order integer[];
    stream record;
    next_pos bigint;
    new_head bigint;
    updated_users bigint[] := '{}';
    updated_heads bigint[] := '{}';
    the_receipts bigint[];
    head_now bigint;
    i integer;
    k integer;
BEGIN
    SELECT array_agg(users.id ORDER BY t.n), array_agg(users.username ORDER BY t.n),
        array_agg(users.event_head ORDER BY t.n), array_agg(users.acked_pos ORDER BY t.n)
    INTO caller_ids, caller_names, heads, cursors
    FROM unnest(p_token_hashes) WITH ORDINALITY AS t (h, n)
    LEFT JOIN tokens ON tokens.token_hash = t.h
    LEFT JOIN users ON users.id = tokens.user_id;
    SELECT coalesce(array_agg(a.u ORDER BY a.u), '{}'), array_agg(a.c ORDER BY a.u), array_agg(a.upto ORDER BY a.u),
        array_agg(a.first ORDER BY a.u)
    INTO ack_users, ack_cursors, ack_uptos, ack_polls
    FROM (
        SELECT t.u, min(t.c) AS c, max(least(t.after, t.head)) AS upto, min(t.n)::integer AS first
        FROM unnest(caller_ids, cursors, heads, p_afters) WITH ORDINALITY AS t (u, c, head, after, n)
        WHERE t.u IS NOT NULL
        GROUP BY t.u
    ) AS a
    WHERE a.upto > a.c;
    -- Member rows, ascending (conversation id, user id): per user and
    -- conversation, the newest message from the peer among the events
    -- acknowledged is how far delivery has now reached.
    FOR delivery IN
        SELECT a.u, m.conversation_id, max(m.seq) AS upto,
            CASE WHEN c.user_low_id = a.u THEN c.user_high_id ELSE c.user_low_id END AS peer_id, a.first
        FROM unnest(ack_users, ack_cursors, ack_uptos, ack_polls) AS a (u, cursor_pos, upto_pos, first)
        JOIN events e ON e.user_id = a.u AND e.pos > a.cursor_pos AND e.pos <= a.upto_pos AND e.kind = 'message'
        JOIN messages m ON m.id = e.message_id AND m.sender_id <> a.u
        JOIN conversations c ON c.id = m.conversation_id
        GROUP BY a.u, m.conversation_id, 4, a.first
        ORDER BY m.conversation_id, a.u
    LOOP
        UPDATE members SET delivered_seq = delivery.upto
        WHERE conversation_id = delivery.conversation_id AND user_id = delivery.u AND delivered_seq < delivery.upto
        RETURNING delivered_seq, read_seq INTO grown;
        IF FOUND THEN
            r_conversations := r_conversations || delivery.conversation_id;
            r_subjects := r_subjects || delivery.u;
            r_peers := r_peers || delivery.peer_id;
            r_delivered := r_delivered || grown.delivered_seq;
            r_read := r_read || grown.read_seq;
            r_polls := r_polls || delivery.first;
        END IF;
    END LOOP;
    -- A cursor moves with a receipt, or once it is `p_lazy_step` behind (chatapi_acknowledge).
    SELECT coalesce(array_agg(a.u), '{}') INTO moving_users
    FROM unnest(ack_users, ack_cursors, ack_uptos) AS a (u, c, upto)
    WHERE a.upto - a.c >= p_lazy_step OR a.u = ANY (r_subjects);
    IF cardinality(r_subjects) = 0 AND cardinality(moving_users) > 0 THEN
        -- Only cursors move: losing them in a crash just means a rescan.
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    SELECT coalesce(array_agg(r.k ORDER BY r.poll, r.c), '{}') INTO in_order
    FROM unnest(r_polls, r_conversations) WITH ORDINALITY AS r (poll, c, k);
    r_subject_pos := array_fill(NULL::bigint, ARRAY[cardinality(r_subjects)]);
    r_peer_pos := array_fill(NULL::bigint, ARRAY[cardinality(r_subjects)]);
    -- User rows, ascending id: each receipt in its subject's and its peer's stream.
    FOR stream IN
        SELECT s.u, count(*) FILTER (WHERE s.receipt) AS received
        FROM (
            SELECT u, true AS receipt FROM unnest(r_subjects || r_peers) AS u
            UNION ALL SELECT u, false FROM unnest(moving_users) AS u
        ) AS s
        GROUP BY s.u ORDER BY s.u
    LOOP
        UPDATE users SET event_head = event_head + stream.received,
            acked_pos = CASE WHEN stream.u = ANY (moving_users)
                THEN greatest(acked_pos, ack_uptos[array_position(ack_users, stream.u)]) ELSE acked_pos END
        WHERE id = stream.u
        RETURNING event_head INTO new_head;
        updated_users := updated_users || stream.u;
        updated_heads := updated_heads || new_head;
        next_pos := new_head - stream.received;
        FOREACH k IN ARRAY in_order LOOP
            IF r_subjects[k] = stream.u THEN
                next_pos := next_pos + 1;
                r_subject_pos[k] := next_pos;
            ELSIF r_peers[k] = stream.u THEN
                next_pos := next_pos + 1;
                r_peer_pos[k] := next_pos;
            END IF;
        END LOOP;
    END LOOP;
    INSERT INTO events (user_id, pos, kind, conversation_id, message_id, subject_user_id, delivered_seq, read_seq)
    SELECT e.*
    FROM unnest(r_conversations, r_subjects, r_peers, r_delivered, r_read, r_subject_pos, r_peer_pos)
        AS r (c, s, p, d, rd, sp, pp),
    LATERAL (VALUES
        (r.s, r.sp, 'receipt', r.c, NULL::bigint, r.s, r.d, r.rd),
        (r.p, r.pp, 'receipt', r.c, NULL, r.s, r.d, r.rd)
    ) AS e;
    -- Each poll's answer, as chatapi_poll gives it.
    FOR i IN 1..n LOOP
        CONTINUE WHEN caller_ids[i] IS NULL;
        the_receipts := '{}';
        IF i = ANY (r_polls) THEN
            FOREACH k IN ARRAY in_order LOOP
                IF r_polls[k] = i THEN
                    the_receipts := the_receipts || ARRAY[
                        r_subjects[k], r_subject_pos[k], r_conversations[k], r_delivered[k], r_read[k],
                        r_peers[k], r_peer_pos[k], r_conversations[k], r_delivered[k], r_read[k]];
                END IF;
            END LOOP;
        END IF;
        head_now := coalesce(updated_heads[array_position(updated_users, caller_ids[i])], heads[i]);
        IF head_now <= p_afters[i] THEN
            RETURN QUERY SELECT i, caller_ids[i], caller_names[i], the_receipts, head_now, __NO_EVENT__;
            CONTINUE;
        END IF;
        RETURN QUERY
        SELECT i, caller_ids[i], caller_names[i], the_receipts, u.event_head, page.*
        FROM users u
        LEFT JOIN LATERAL (__PAGE__) AS page ON true
        WHERE u.id = caller_ids[i]
        ORDER BY page.pos;
    END LOOP;
END
$$
""".replace("__PAGE__", _page_sql("p_afters[i]", "p_limits[i]")).replace("__NO_EVENT__", _NO_EVENT)

# Each connection also prepares the calls, so their plans are made once.
_PREPARE_CALLS = (
    "PREPARE chatapi_send (varchar, bigint, text, varchar, timestamp) AS "
    "SELECT * FROM pg_temp.chatapi_send($1, $2, $3, $4, $5)",
    "PREPARE chatapi_send_batch (varchar[], bigint[], text[], varchar[], timestamp[]) AS "
    "SELECT * FROM pg_temp.chatapi_send_batch($1, $2, $3, $4, $5)",
    "PREPARE chatapi_poll (varchar, bigint, integer, bigint, boolean) AS "
    "SELECT * FROM pg_temp.chatapi_poll($1, $2, $3, $4, $5)",
    "PREPARE chatapi_poll_batch (varchar[], bigint[], integer[], bigint) AS "
    "SELECT * FROM pg_temp.chatapi_poll_batch($1, $2, $3, $4)",
)
# Run with `Database.fetch_all` (psycopg2's parameter style).
CALL_SEND = "EXECUTE chatapi_send (%(token_hash)s, %(conversation_id)s, %(text)s, %(client_id)s, %(now)s)"
CALL_SEND_BATCH = (
    "EXECUTE chatapi_send_batch (%(token_hashes)s, %(conversation_ids)s, %(texts)s, %(client_ids)s, %(nows)s)"
)
CALL_POLL = "EXECUTE chatapi_poll (%(token_hash)s, %(after)s, %(limit)s, %(lazy_step)s, %(acknowledge)s)"
CALL_POLL_BATCH = "EXECUTE chatapi_poll_batch (%(token_hashes)s, %(afters)s, %(limits)s, %(lazy_step)s)"


def install(cursor: Any) -> None:
    """Create the functions and prepare their calls on a new connection (a psycopg2 cursor)."""
    # Plan the functions' statements and the prepared ones once per
    # connection. Left to choose, PostgreSQL kept re-planning several
    # of them on every call (pos ranges and LIMITs make a generic plan
    # look dearer than it is); all of them are index lookups, whose
    # generic plan is the plan (docs/performance.md, change 18).
    cursor.execute("SET plan_cache_mode = force_generic_plan")
    cursor.execute(SEND_FUNCTION)
    cursor.execute(SEND_BATCH_FUNCTION)
    cursor.execute(ACKNOWLEDGE_FUNCTION)
    cursor.execute(POLL_FUNCTION)
    cursor.execute(POLL_BATCH_FUNCTION)
    for statement in _PREPARE_CALLS:
        cursor.execute(statement)
