"""Who may do what: every authenticated endpoint with no token, a malformed
one, a made-up one and a revoked one (401 with WWW-Authenticate: Bearer),
and every conversation endpoint for a stranger (404 conversation_not_found,
exactly as for a conversation that does not exist). Nothing of another
conversation may appear in any answer."""

from __future__ import annotations

import pytest
from flask import Flask

PASSWORD = "correct horse battery"
SECRET = "the secret plan"


def _token(client, username: str) -> str:
    answer = client.post("/api/v1/tokens", json={"username": username, "password": PASSWORD})
    assert answer.status_code == 201
    return answer.get_json()["token"]


@pytest.fixture
def app(app_on_each_database: Flask) -> Flask:
    """On both databases: PostgreSQL checks the token of a send or an event poll inside its query."""
    return app_on_each_database


@pytest.fixture
def world(client) -> dict:
    for name in ("alice", "bob", "carol", "dave"):
        assert client.post("/api/v1/users", json={"username": name, "password": PASSWORD}).status_code == 201
    tokens = {name: _token(client, name) for name in ("alice", "bob", "carol", "dave")}
    auth = {name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()}
    private = client.post("/api/v1/conversations", json={"peer": "bob"}, headers=auth["alice"]).get_json()["id"]
    others = client.post("/api/v1/conversations", json={"peer": "dave"}, headers=auth["carol"]).get_json()["id"]
    answer = client.post(f"/api/v1/conversations/{private}/messages", json={"text": SECRET}, headers=auth["alice"])
    assert answer.status_code == 201
    revoked = _token(client, "alice")
    assert client.delete("/api/v1/tokens/current", headers={"Authorization": f"Bearer {revoked}"}).status_code == 204
    return {"auth": auth, "private": private, "others": others, "revoked": revoked}


def _endpoints(conversation: int) -> list[tuple[str, str, dict | None, dict | None]]:
    """(method, path, query, body) of every authenticated endpoint."""
    c = f"/api/v1/conversations/{conversation}"
    return [
        ("GET", "/api/v1/me", None, None),
        ("DELETE", "/api/v1/tokens/current", None, None),
        ("GET", "/api/v1/conversations", None, None),
        ("POST", "/api/v1/conversations", None, {"peer": "bob"}),
        ("GET", c, None, None),
        ("GET", c + "/messages", None, None),
        ("GET", c + "/messages", {"after": 0, "timeout": 5}, None),
        ("GET", c + "/messages", {"before": 5}, None),
        ("POST", c + "/messages", None, {"text": "hi", "client_id": "x1"}),
        ("POST", c + "/read", None, {"seq": 1}),
        ("GET", "/api/v1/events", {"after": 0, "timeout": 5}, None),
    ]


_CONVERSATION_ENDPOINTS = [e for e in _endpoints(0) if "/conversations/" in e[1]]


def _call(client, method: str, path: str, query, body, headers: dict):
    return client.open(path, method=method, query_string=query, json=body, headers=headers)


def _bad_credentials(world: dict) -> dict[str, dict]:
    return {
        "none": {},
        "empty bearer": {"Authorization": "Bearer "},
        "other scheme": {"Authorization": "Basic YWxpY2U6Y29ycmVjdCBob3JzZSBiYXR0ZXJ5"},
        # A valid token counts only as a Bearer one.
        "valid token, other scheme": {"Authorization": "Token " + world["auth"]["alice"]["Authorization"].split()[1]},
        "made up": {"Authorization": "Bearer " + "A" * 43},
        "revoked": {"Authorization": f"Bearer {world['revoked']}"},
        "token without scheme": {"Authorization": world["auth"]["alice"]["Authorization"].split()[1]},
    }


def test_every_authenticated_endpoint_refuses_missing_bad_and_revoked_tokens(client, world) -> None:
    for label, headers in _bad_credentials(world).items():
        for method, path, query, body in _endpoints(world["private"]):
            answer = _call(client, method, path, query, body, headers)
            where = f"{label}: {method} {path}"
            assert answer.status_code == 401, where
            assert answer.headers.get("WWW-Authenticate") == "Bearer", where
            assert answer.get_json()["error"]["code"] == "unauthorized", where
            assert SECRET not in answer.get_data(as_text=True) and "bob" not in answer.get_data(as_text=True), where
    # Nothing was changed by any of those requests.
    alice = world["auth"]["alice"]
    history = client.get(f"/api/v1/conversations/{world['private']}/messages", headers=alice).get_json()
    assert [m["text"] for m in history["messages"]] == [SECRET]


def test_bad_credentials_win_over_bad_input(client, world) -> None:
    """A request that is both unauthenticated and malformed gets 401, on every endpoint that validates input."""
    c = f"/api/v1/conversations/{world['private']}"
    malformed = [
        ("POST", "/api/v1/conversations", None, {"peer": 5}),
        ("GET", c + "/messages", {"after": "x"}, None),
        ("POST", c + "/messages", None, {"text": ""}),
        ("POST", c + "/messages", None, {"text": "hi", "client_id": "bad id!"}),
        ("POST", c + "/read", None, {"seq": -1}),
        ("GET", "/api/v1/events", {"after": -1}, None),
        ("GET", "/api/v1/events", {"limit": 0, "timeout": "soon"}, None),
    ]
    for label, headers in _bad_credentials(world).items():
        for method, path, query, body in malformed:
            answer = _call(client, method, path, query, body, headers)
            assert answer.status_code == 401, f"{label}: {method} {path} {query or body}"
    # With a valid token, the same requests are refused as bad input.
    for method, path, query, body in malformed:
        answer = _call(client, method, path, query, body, world["auth"]["alice"])
        assert answer.status_code == 400, f"{method} {path} {query or body}"


def test_the_route_is_checked_before_the_token_and_the_body_size_before_both(client, world) -> None:
    """docs/api.md, "Order of checks": 413, then the route (404 not_found, 405), then 401."""
    for method, path, status, code in (
        ("PUT", "/api/v1/me", 405, "method_not_allowed"),
        ("GET", "/api/v1/conversations/abc", 404, "not_found"),
        ("GET", "/api/v1/nowhere", 404, "not_found"),
    ):
        answer = client.open(path, method=method)
        assert (answer.status_code, answer.get_json()["error"]["code"]) == (status, code), (method, path)
        big = client.open(path, method=method, data=b" " * 65_537, content_type="application/json")
        assert big.status_code == 413, (method, path)


def test_a_stranger_gets_404_on_every_conversation_endpoint_exactly_as_for_no_conversation(client, world) -> None:
    carol = world["auth"]["carol"]
    missing = world["private"] + world["others"] + 1000
    for method, template, query, body in _CONVERSATION_ENDPOINTS:
        private_path = template.replace("/conversations/0", f"/conversations/{world['private']}")
        missing_path = template.replace("/conversations/0", f"/conversations/{missing}")
        answer = _call(client, method, private_path, query, body, carol)
        nothing = _call(client, method, missing_path, query, body, carol)
        where = f"{method} {private_path}"
        assert answer.status_code == 404, where
        assert answer.get_json() == {"error": {"code": "conversation_not_found", "message": "no such conversation"}}
        # Indistinguishable from a conversation that does not exist.
        assert (nothing.status_code, nothing.get_json()) == (answer.status_code, answer.get_json()), where
    # The stranger's own views hold nothing of it.
    listing = client.get("/api/v1/conversations", headers=carol).get_data(as_text=True)
    events = client.get("/api/v1/events", query_string={"timeout": 0}, headers=carol).get_data(as_text=True)
    for text in (listing, events):
        assert SECRET not in text and '"bob"' not in text and '"alice"' not in text
    # And the members' view is unchanged: no message, no read mark from the stranger.
    alice = world["auth"]["alice"]
    conversation = client.get(f"/api/v1/conversations/{world['private']}", headers=alice).get_json()
    assert conversation["last_seq"] == 1 and conversation["peer_read_seq"] == 0


def test_members_cannot_reach_across_into_other_conversations(client, world) -> None:
    """alice is a member of one conversation; carol and dave's is as closed to her as to anyone."""
    alice = world["auth"]["alice"]
    for method, template, query, body in _CONVERSATION_ENDPOINTS:
        path = template.replace("/conversations/0", f"/conversations/{world['others']}")
        answer = _call(client, method, path, query, body, alice)
        assert answer.status_code == 404 and answer.get_json()["error"]["code"] == "conversation_not_found"
    # The members themselves get what is theirs.
    bob = world["auth"]["bob"]
    assert client.get(f"/api/v1/conversations/{world['private']}", headers=bob).status_code == 200


def test_a_revoked_token_stops_working_at_once_and_only_that_token(client, world) -> None:
    first, second = _token(client, "bob"), _token(client, "bob")
    me = {"Authorization": f"Bearer {first}"}
    assert client.get("/api/v1/me", headers=me).status_code == 200
    assert client.delete("/api/v1/tokens/current", headers=me).status_code == 204
    assert client.get("/api/v1/me", headers=me).status_code == 401
    assert client.delete("/api/v1/tokens/current", headers=me).status_code == 401
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {second}"}).status_code == 200
