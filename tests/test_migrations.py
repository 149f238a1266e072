"""The Alembic migrations build exactly the schema the models describe, on
SQLite and on PostgreSQL, and take a deployment's data through upgrades,
downgrades, concurrent starts and a code rollback (docs/deploy.md,
"Upgrades and rollbacks")."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from argon2 import PasswordHasher
from sqlalchemy import MetaData, create_engine, insert, inspect, select, text, update

from chatapi.config import Settings
from chatapi.db import MIGRATIONS_DIR, code_revisions
from chatapi.models import Base, User
from tests.conftest import alembic_config, migrate
from tests.support.api import PASSWORD, Api
from tests.support.server import REPO


def assert_schema_matches_models(url: str) -> None:
    migrate(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request) -> str:
    """A fresh, empty database, once SQLite and once PostgreSQL (its URL pinned to psycopg2, as the app's)."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    return Settings.from_env({"CHATAPI_DATABASE_URL": url}).database_url


def test_migrations_match_models(database_url: str) -> None:
    assert_schema_matches_models(database_url)


def test_migrating_again_keeps_the_data(sqlite_url: str) -> None:
    """Every start migrates (CHATAPI_MIGRATE): a second run must leave schema and rows as they were."""
    migrate(sqlite_url)
    engine = create_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(insert(User).values(username="alice", password_hash="x", created_at=datetime(2026, 1, 1)))
    migrate(sqlite_url)
    with engine.connect() as connection:
        assert connection.scalars(select(User.username)).all() == ["alice"]
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


def test_the_app_reads_the_same_head_and_revisions_as_alembic() -> None:
    """/readyz compares the database's revision with these (read without alembic, see chatapi.db)."""
    scripts = ScriptDirectory(str(MIGRATIONS_DIR))
    assert code_revisions() == (scripts.get_current_head(), {script.revision for script in scripts.walk_revisions()})


def test_the_app_reads_revisions_written_as_alembics_own_template_writes_them(tmp_path: Path) -> None:
    (tmp_path / "versions").mkdir()
    (tmp_path / "versions" / "a1_first.py").write_text('revision: str = "a1"\ndown_revision: str | None = None\n')
    second = "revision: str = 'b2'\ndown_revision: Union[str, None] = 'a1'\n"
    (tmp_path / "versions" / "b2_second.py").write_text(second)
    (tmp_path / "versions" / "__init__.py").write_text("")  # not a migration; alembic skips it too
    assert code_revisions(tmp_path) == ("b2", {"a1", "b2"})
    # A merge names its parents in a list or a tuple.
    (tmp_path / "versions" / "c3_branch.py").write_text("revision = 'c3'\ndown_revision = 'a1'\n")
    (tmp_path / "versions" / "d4_merge.py").write_text("revision = 'd4'\ndown_revision = ['b2', 'c3']\n")
    assert code_revisions(tmp_path) == ("d4", {"a1", "b2", "c3", "d4"})


def _revisions(url: str) -> set[str]:
    """The database's revisions, as alembic_version holds them."""
    engine = create_engine(url)
    with engine.connect() as connection:
        revisions = set(MigrationContext.configure(connection).get_current_heads())
    engine.dispose()
    return revisions


def _fill_as_release_0001_left_it(url: str) -> dict:
    """alice and bob as a release at revision 0001 stored them, written through that schema (reflected,
    not chatapi.models): alice started the conversation, three messages, bob has read up to his own,
    alice holds a token. Ids come from the database, as the app's did."""
    tables = MetaData()
    engine = create_engine(url)
    tables.reflect(engine)
    users, tokens, conversations, members, messages, events = (
        tables.tables[name] for name in ("users", "tokens", "conversations", "members", "messages", "events")
    )
    at = datetime(2026, 11, 24, 10, 0)
    token = secrets.token_urlsafe(32)
    with engine.begin() as connection:

        def user(name: str) -> int:
            row = {"username": name, "password_hash": PasswordHasher().hash(PASSWORD), "created_at": at}
            return connection.execute(insert(users).values(**row, event_head=0, acked_pos=0)).inserted_primary_key[0]

        alice, bob = user("alice"), user("bob")
        connection.execute(
            insert(tokens).values(user_id=alice, token_hash=hashlib.sha256(token.encode()).hexdigest(), created_at=at)
        )
        conversation = connection.execute(
            insert(conversations).values(
                user_low_id=alice, user_high_id=bob, created_at=at, last_activity_at=at, last_seq=0
            )
        ).inserted_primary_key[0]
        connection.execute(
            insert(members),
            [
                {"conversation_id": conversation, "user_id": who, "delivered_seq": 0, "read_seq": 0}
                for who in (alice, bob)
            ],
        )
        heads = {alice: 0, bob: 0}

        def to_both(**event) -> None:
            for who in heads:
                heads[who] += 1
                connection.execute(
                    insert(events).values(user_id=who, pos=heads[who], conversation_id=conversation, **event)
                )

        for who, peer in ((alice, bob), (bob, alice)):
            heads[who] += 1
            connection.execute(
                insert(events).values(
                    user_id=who, pos=heads[who], kind="conversation", conversation_id=conversation, subject_user_id=peer
                )
            )
        sent = [(alice, "Hi Bob!", "alice-1"), (bob, "Hi Alice", "bob-1"), (alice, "How are you?", "alice-2")]
        for seq, (sender, words, client_id) in enumerate(sent, start=1):
            moment = at + timedelta(minutes=seq)
            message = connection.execute(
                insert(messages).values(
                    conversation_id=conversation,
                    seq=seq,
                    sender_id=sender,
                    text=words,
                    client_id=client_id,
                    created_at=moment,
                )
            ).inserted_primary_key[0]
            connection.execute(
                update(members)
                .where(members.c.conversation_id == conversation, members.c.user_id == sender)
                .values(delivered_seq=seq, read_seq=seq)
            )
            connection.execute(
                update(conversations)
                .where(conversations.c.id == conversation)
                .values(last_seq=seq, last_activity_at=moment)
            )
            to_both(kind="message", message_id=message)
            to_both(kind="receipt", subject_user_id=sender, delivered_seq=seq, read_seq=seq)
        for who, acked in ((alice, heads[alice]), (bob, 5)):
            connection.execute(update(users).where(users.c.id == who).values(event_head=heads[who], acked_pos=acked))
    engine.dispose()
    return {"conversation": conversation, "alice_token": token, "events": heads[bob]}


def test_a_database_at_0001_with_data_upgrades_at_start_and_is_served_as_before(database_url: str, start_server):
    """The first upgrade a deployment makes: the master migrates its 0001 database at start, and
    every user, token, message, receipt and event position is there, and the chat goes on from them."""
    migrate(database_url, "0001")
    stored = _fill_as_release_0001_left_it(database_url)
    server = start_server(database_url)
    assert _revisions(database_url) == {code_revisions()[0]}
    conversation_id = stored["conversation"]

    alice = Api(server.base_url, stored["alice_token"])  # signed in before the upgrade
    assert alice.get("/api/v1/me").json()["username"] == "alice"
    signed_in = Api(server.base_url).post("/api/v1/tokens", {"username": "Bob", "password": PASSWORD})
    assert signed_in.status_code == 201, signed_in.text
    bob = Api(server.base_url, signed_in.json()["token"])

    [listed] = bob.get("/api/v1/conversations").json()["conversations"]
    assert listed["id"] == conversation_id and listed["peer"] == "alice"
    assert (listed["last_seq"], listed["read_seq"], listed["unread"]) == (3, 2, 1)
    assert (listed["peer_delivered_seq"], listed["peer_read_seq"]) == (3, 3)
    assert listed["last_message"]["text"] == "How are you?"
    history = bob.messages(conversation_id)["messages"]
    assert [(m["seq"], m["sender"], m["text"], m["client_id"]) for m in history] == [
        (1, "alice", "Hi Bob!", "alice-1"),
        (2, "bob", "Hi Alice", "bob-1"),
        (3, "alice", "How are you?", "alice-2"),
    ]
    assert history[0]["created_at"] == "2026-11-24T10:01:00.000000Z"
    page = bob.events(after=0)
    assert page["last_pos"] == stored["events"] == 7
    assert [event["type"] for event in page["events"]] == ["conversation"] + ["message", "receipt"] * 3
    assert [event["pos"] for event in page["events"]] == list(range(1, 8))
    assert page["events"][5]["message"]["text"] == "How are you?"

    # It goes on: a replayed client_id is still recognised, seq and pos continue without a gap.
    replay = alice.post(
        f"/api/v1/conversations/{conversation_id}/messages", {"text": "How are you?", "client_id": "alice-2"}
    )
    assert (replay.status_code, replay.json()["seq"]) == (200, 3)
    assert alice.send(conversation_id, "Still there?", "alice-3")["seq"] == 4
    assert [(event["pos"], event["type"]) for event in bob.events(after=7)["events"]][0] == (8, "message")
    read = bob.post(f"/api/v1/conversations/{conversation_id}/read", {"seq": 4})
    assert read.status_code == 200 and read.json()["unread"] == 0
    assert alice.get(f"/api/v1/conversations/{conversation_id}").json()["peer_read_seq"] == 4
    # Usernames stay unique; new accounts and conversations get new ids.
    taken = Api(server.base_url).post("/api/v1/users", {"username": "Alice", "password": PASSWORD})
    assert taken.status_code == 409
    carol = Api(server.base_url).signed_up("carol")
    assert carol.start("alice")["id"] != conversation_id
    # The token from before the upgrade signs out like any other.
    assert alice.request("DELETE", "/api/v1/tokens/current").status_code == 204
    assert alice.get("/api/v1/me").status_code == 401
    assert "Traceback" not in server.log_path.read_text()


def test_each_revision_downgrades_and_upgrades_again_keeping_the_data(database_url: str) -> None:
    """`alembic downgrade` works one revision at a time, down to an empty database; the rows of
    the tables a revision keeps stay (0002's downgrade drops only the wake-up signing key)."""
    migrate(database_url)
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(insert(User).values(username="alice", password_hash="x", created_at=datetime(2026, 1, 1)))
    config = alembic_config(database_url)
    for script in ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions():  # head first
        assert _revisions(database_url) == {script.revision}
        command.downgrade(config, "-1")
        assert _revisions(database_url) == ({script.down_revision} if script.down_revision else set())
        if script.down_revision:
            with engine.connect() as connection:
                assert connection.scalars(select(User.username)).all() == ["alice"]
    with engine.connect() as connection:
        assert inspect(connection).get_table_names() == ["alembic_version"]
    engine.dispose()
    assert_schema_matches_models(database_url)  # and up again, from nothing


# `alembic upgrade head` as the master runs it, but with everything imported before it says it is
# ready and waits for the word to go: the hosts then reach the database within milliseconds of each other.
_UPGRADE_ON_CUE = """
import sys
import alembic.config, chatapi.config, chatapi.models, psycopg2
print("ready", flush=True)
sys.stdin.readline()
alembic.config.main(["-c", sys.argv[1], "upgrade", "head"])
"""


@pytest.mark.postgres
def test_hosts_that_start_at_once_on_an_empty_database_migrate_it_once(postgres_url: str) -> None:
    """Four masters' `alembic upgrade head` at the same moment: without the advisory lock
    (migrations/env.py) two or three of them failed on PostgreSQL's catalog (duplicate pg_type)."""
    url = Settings.from_env({"CHATAPI_DATABASE_URL": postgres_url}).database_url
    env = {**os.environ, "CHATAPI_DATABASE_URL": url}
    hosts = [
        subprocess.Popen(
            [sys.executable, "-c", _UPGRADE_ON_CUE, str(REPO / "alembic.ini")],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    assert [host.stdout.readline() for host in hosts] == ["ready\n"] * 4
    for host in hosts:
        host.stdin.write("go\n")
        host.stdin.flush()
    outputs = [host.communicate(timeout=60)[0] for host in hosts]
    assert [host.returncode for host in hosts] == [0, 0, 0, 0], outputs
    assert sum("Running upgrade  -> 0001" in output for output in outputs) == 1
    assert _revisions(url) == {code_revisions()[0]}
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM secrets")) == 1  # one key for every host
    engine.dispose()


def test_a_start_on_a_database_a_newer_release_migrated_warns_and_serves(database_url: str, start_server) -> None:
    """Code rolled back after an upgrade, or an old instance restarted during a rolling deploy: its
    migrations do not know the database's revision. The start leaves the database as it is, says so
    in one warning, and serves; /readyz is ready (on PostgreSQL it tells when the schema lacks what
    the code needs). Before, the master died with two tracebacks (alembic's `Can't locate revision`)."""
    migrate(database_url)
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0003'"))
    engine.dispose()
    server = start_server(database_url)  # and /readyz answers 200
    alice, bob = Api(server.base_url).signed_up(), Api(server.base_url).signed_up()
    alice.send(alice.start(bob.username)["id"], "after the rollback")
    assert _revisions(database_url) == {"0003"}
    log = server.log_path.read_text()
    head = code_revisions()[0]
    assert f"the database is at revision 0003, which this code's migrations (head {head}) do not know" in log
    assert f"`alembic downgrade {head}` with that newer release's code" in log
    assert "Traceback" not in log, log
    # By hand, without the start's `-x newer_database=keep`, alembic refuses in one line.
    env = {**os.environ, "CHATAPI_DATABASE_URL": database_url}
    by_hand = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=REPO, env=env, capture_output=True, text=True
    )
    said = by_hand.stdout + by_hand.stderr
    assert by_hand.returncode != 0 and "FAILED: Can't locate revision identified by '0003'" in said
    assert "Traceback" not in said
