"""The benchmark's own checks must be able to fail: a run that loses, repeats
or misroutes a message, or whose connection is dropped, is reported, never
passed as "ok". Unit tests of the load generator's client and audit, without
a server (bench/load.py monkey-patches the process it runs in, so its part
runs in a subprocess)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest

from bench import httpc
from tests.support.server import REPO

AUDIT_SCRIPT = r"""
import json, sys
from bench import load

def message_event(pos, client_id, sender):
    message = {"id": int(client_id[1:]), "conversation_id": 1, "seq": int(client_id[1:]),
               "sender": sender, "client_id": client_id, "text": "x"}
    return {"pos": pos, "type": "message", "message": message}

class Streams:
    def __init__(self, by_token):
        self.by_token = by_token
    def connect(self, token=None):
        events = self.by_token[token]
        class Connection:
            def request(self, method, path, body=None):
                after = int(path.split("after=")[1].split("&")[0])
                return 200, {"events": [e for e in events if e["pos"] > after], "last_pos": len(events)}
            def close(self):
                pass
        return Connection()

alice = {"id": 1, "username": "alice", "token": "a"}
bob = {"id": 2, "username": "bob", "token": "b"}
carol = {"id": 3, "username": "carol", "token": "c"}
m1, m2 = message_event(1, "m1", "alice"), message_event(2, "m2", "alice")
cases = {
    "clean": {},
    "misdelivered": {"c": [message_event(1, "m2", "alice")]},
    "lost": {"b": [m1]},
    "duplicated": {"b": [m1, m2, message_event(3, "m2", "alice")]},
    "pos_gap": {"b": [m1, message_event(3, "m2", "alice")]},
}
results = {}
for case, changed in cases.items():
    streams = {"a": [m1, m2], "b": [m1, m2], "c": [], **changed}
    ledger = load.Ledger()
    for client_id in ("m1", "m2"):
        ledger.scheduled[client_id] = 0.0
        ledger.expected[client_id] = (alice["id"], bob["id"])
        ledger.acked[client_id] = {}
    target = Streams(streams)
    live = {}
    for user in (alice, bob, carol):
        stream = load.Stream(user, target, ledger, track_delivery=True)
        for event in streams[user["token"]]:
            stream._take(event, 1.0)
        live[user["username"]] = {"misdelivered": stream.misdelivered}
    results[case] = {"audit": load.audit(target, [alice, bob, carol], ledger), "live": live,
                     "delivered": sorted(ledger.delivered_at)}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def audits() -> dict:
    run = subprocess.run(
        [sys.executable, "-c", AUDIT_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(run.stdout)


def test_the_audit_passes_a_clean_run(audits) -> None:
    result = audits["clean"]
    assert set(result["audit"].values()) == {0}, result
    assert result["delivered"] == ["m1", "m2"]


@pytest.mark.parametrize("case", ["misdelivered", "lost", "duplicated", "pos_gap"])
def test_the_audit_counts_what_went_wrong(audits, case: str) -> None:
    result = audits[case]
    key = {"pos_gap": "pos_gaps"}.get(case, case)
    assert result["audit"][key] > 0, result
    assert sum(result["audit"].values()) >= 1


def test_a_copy_in_a_strangers_stream_is_not_taken_for_the_delivery(audits) -> None:
    result = audits["misdelivered"]
    assert result["live"]["carol"]["misdelivered"] == 1
    assert result["audit"]["misdelivered"] == 1
    assert result["audit"]["lost"] == 0


def _server(answer: bytes | None) -> tuple[socket.socket, list[socket.socket], threading.Thread]:
    """A loopback server that reads each request and answers `answer`, or closes unanswered."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            while conn.recv(65536):
                if answer is None:
                    conn.close()
                    break
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, accepted, thread


def _stop(listener: socket.socket, thread: threading.Thread) -> None:
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() that close() alone would leave blocked
    listener.close()
    thread.join(5)


def test_a_request_the_server_drops_is_an_error_not_a_silent_retry() -> None:
    listener, accepted, thread = _server(None)
    client = httpc.Connection("127.0.0.1", listener.getsockname()[1], timeout=5)
    client.connect()
    with pytest.raises(OSError):
        client.request("GET", "/api/v1/events?after=0")
    _stop(listener, thread)
    assert len(accepted) == 1


def test_a_connection_idle_past_the_servers_keep_alive_is_replaced_before_use(monkeypatch) -> None:
    listener, accepted, thread = _server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    client = httpc.Connection("127.0.0.1", listener.getsockname()[1], timeout=5)
    assert client.request("GET", "/healthz") == (200, {})
    assert client.request("GET", "/healthz") == (200, {})
    assert len(accepted) == 1
    monkeypatch.setattr(httpc, "MAX_IDLE_REUSE_SECS", 0.0)
    assert client.request("GET", "/healthz") == (200, {})
    assert len(accepted) == 2
    client.close()
    _stop(listener, thread)
