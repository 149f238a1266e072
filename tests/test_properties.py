"""Property tests (Hypothesis) through the Flask test client on SQLite:
the text rules of the contract for any string, and one gapless order for
both parties whatever the interleaving of their sends and retries."""

from __future__ import annotations

import json
import os
import unicodedata

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

PASSWORD = "correct horse battery"
LONG = os.environ.get("CHATAPI_LONG_TESTS") == "1"
EXAMPLES = 2000 if LONG else 250
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


def _signed_in(client, username: str) -> dict[str, str]:
    assert client.post("/api/v1/users", json={"username": username, "password": PASSWORD}).status_code == 201
    answer = client.post("/api/v1/tokens", json={"username": username, "password": PASSWORD})
    return {"Authorization": f"Bearer {answer.get_json()['token']}"}


def _post(client, path: str, body: dict, headers: dict):
    # json.dumps escapes lone surrogates as \udxxx: valid JSON that decodes to them.
    return client.post(path, data=json.dumps(body), content_type="application/json", headers=headers)


def contract_accepts(text: str) -> bool:
    """The contract's text rule, written from API.md independently of chatapi.validation."""
    if not 1 <= len(text) <= 4000:
        return False
    if all(char.isspace() for char in text):
        return False
    for char in text:
        if unicodedata.category(char) == "Cc" and char not in "\t\n\r":
            return False
        if 0xD800 <= ord(char) <= 0xDFFF:
            return False
    return True


_TRICKY = " \t\n\r\x00\x01\x1f\x7f\x80\x85\x9f\xa0\u2028\u2029\u3000\u200b\ufeff\ud800\udfffa<>&\"'\\é😀"
texts = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
    st.text(st.sampled_from(_TRICKY), max_size=12),
    st.integers(3995, 4005).map(lambda n: "x" * n),
    st.integers(3990, 4001).flatmap(lambda n: st.just("😀" * n)),
    st.builds(lambda n, c: "a" * n + c, st.integers(3990, 4000), st.sampled_from(_TRICKY)),
)


@PROPERTY_SETTINGS
@given(text=texts)
@example(text="\ud800\udc00")
def test_any_text_is_stored_exactly_or_refused_with_invalid_text(client, text: str) -> None:
    # What the server is sent: JSON reads an escaped high surrogate followed by
    # an escaped low one as one character (RFC 8259, section 7), not two lone ones.
    text = json.loads(json.dumps(text))
    state = _pair(client)
    answer = _post(client, f"/api/v1/conversations/{state['id']}/messages", {"text": text}, state["alice"])
    if contract_accepts(text):
        assert answer.status_code == 201, (text, answer.get_json())
        sent = answer.get_json()
        assert sent["text"] == text
        stored = client.get(
            f"/api/v1/conversations/{state['id']}/messages",
            query_string={"after": sent["seq"] - 1, "timeout": 0},
            headers=state["bob"],
        ).get_json()["messages"]
        assert [m["text"] for m in stored] == [text]
    else:
        assert answer.status_code == 400, (text, answer.get_json())
        assert answer.get_json()["error"]["code"] == "invalid_text"


_made: dict[str, object] = {"app": None, "pair": None}


def _pair(client) -> dict:
    """alice and bob with a conversation, made once per app (Hypothesis reuses the function's client).

    The app itself is kept, not its id(): a later test's app could be given a
    freed app's id, and would then be handed tokens its database never had."""
    if _made["app"] is not client.application:
        alice, bob = _signed_in(client, "alice"), _signed_in(client, "bob")
        conversation = client.post("/api/v1/conversations", json={"peer": "bob"}, headers=alice).get_json()
        _made.update(app=client.application, pair={"alice": alice, "bob": bob, "id": conversation["id"], "n": 0})
    return _made["pair"]


# One of: ("send", side) a new message, ("retry", side) the side's last send again
# with its client_id (a lost response), ("read", side) reading the conversation.
steps = st.lists(
    st.tuples(st.sampled_from(["send", "send", "send", "retry", "read"]), st.sampled_from(["alice", "bob"])),
    min_size=1,
    max_size=25,
)


@settings(PROPERTY_SETTINGS, max_examples=EXAMPLES // 3)
@given(steps=steps)
def test_any_interleaving_gives_both_parties_one_gapless_order(client, steps) -> None:
    state = _pair(client)
    path = f"/api/v1/conversations/{state['id']}/messages"
    heads = {side: _events(client, state[side], 0)["last_pos"] for side in ("alice", "bob")}
    start = client.get(path, query_string={"limit": 1}, headers=state["alice"]).get_json()["last_seq"]
    expected: list[tuple[str, str]] = []
    last: dict[str, tuple[str, dict]] = {}
    for action, side in steps:
        if action == "read":
            answer = client.get(path, query_string={"after": start, "timeout": 0}, headers=state[side])
            assert [m["seq"] for m in answer.get_json()["messages"]] == list(
                range(start + 1, start + len(expected) + 1)
            )
            continue
        if action == "retry" and side in last:
            client_id, original = last[side]
            again = _post(client, path, {"text": original["text"], "client_id": client_id}, state[side])
            assert again.status_code == 200 and again.get_json() == original
            continue
        state["n"] += 1
        client_id = f"{side}-{state['n']}"
        text = f"{side} says {state['n']}"
        sent = _post(client, path, {"text": text, "client_id": client_id}, state[side])
        assert sent.status_code == 201
        assert sent.get_json()["seq"] == start + len(expected) + 1
        expected.append((side, text))
        last[side] = (client_id, sent.get_json())

    seqs = list(range(start + 1, start + len(expected) + 1))
    for side in ("alice", "bob"):
        page = client.get(path, query_string={"after": start, "limit": 1000, "timeout": 0}, headers=state[side])
        messages = page.get_json()["messages"]
        assert [(m["sender"], m["text"]) for m in messages] == expected
        assert [m["seq"] for m in messages] == seqs
        # The event stream shows the same messages in the same order, each once.
        events = _events(client, state[side], heads[side])["events"]
        streamed = [(e["message"]["sender"], e["message"]["text"]) for e in events if e["type"] == "message"]
        assert streamed == expected
        positions = [e["pos"] for e in events]
        assert positions == list(range(heads[side] + 1, heads[side] + len(events) + 1))


def _events(client, headers: dict, after: int) -> dict:
    answer = client.get("/api/v1/events", query_string={"after": after, "limit": 1000, "timeout": 0}, headers=headers)
    assert answer.status_code == 200
    return answer.get_json()
