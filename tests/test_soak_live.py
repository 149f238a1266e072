"""Soak: steady traffic plus many idle long-polls on a live server
(PostgreSQL, 2 workers). After a warm-up, the workers' memory (RSS) and
open file descriptors must stay flat, and every request must be answered.

CI runs it for about 35 s; CHATAPI_LONG_TESTS=1 for 10 minutes.
"""

from __future__ import annotations

import os
import selectors
import socket
import statistics
import threading
import time

import pytest
import requests

from tests.support.api import Api
from tests.support.faults import Background
from tests.support.server import ServerProcess

LONG = os.environ.get("CHATAPI_LONG_TESTS") == "1"
pytestmark = [pytest.mark.postgres, *([pytest.mark.slow] if LONG else [])]

DURATION_SECS = 600 if LONG else 35
WARM_UP_SECS = DURATION_SECS / 3
IDLE_USERS = 20
IDLE_POLLS_PER_USER = 3
# Long enough to be idle, short enough that the waiters churn (register, time out, re-register).
IDLE_TIMEOUT_SECS = 7
RSS_TOLERANCE_BYTES = 8 * 2**20
RSS_TOLERANCE_RATIO = 0.10
# Open descriptors are compared summed over the workers: an idle client that
# reconnects may be accepted by the other worker, which moves its socket.
FD_TOLERANCE = 8


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class IdlePolls:
    """Many idle long-polls on raw sockets, re-opened as they time out, from one thread."""

    def __init__(self, server: ServerProcess, tokens: list[str]) -> None:
        self.port = server.port
        self.tokens = tokens
        self.answers: dict[int, int] = {}
        self.selector = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, token: str) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.sendall(
            f"GET /api/v1/events?after=0&timeout={IDLE_TIMEOUT_SECS} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode()
        )
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, {"token": token, "data": b""})

    def _run(self) -> None:
        for token in self.tokens:
            for _ in range(IDLE_POLLS_PER_USER):
                self._open(token)
        while not self.stop.is_set():
            for key, _ in self.selector.select(timeout=0.5):
                sock, state = key.fileobj, key.data
                try:
                    chunk = sock.recv(65536)
                except OSError:  # reset: counted as status 0 below, and the test fails on it
                    chunk, state["data"] = b"", b""
                if chunk:
                    state["data"] += chunk
                    continue
                self.selector.unregister(sock)
                sock.close()
                status = int(state["data"].split(b" ", 2)[1]) if state["data"] else 0
                self.answers[status] = self.answers.get(status, 0) + 1
                if not self.stop.is_set():
                    self._open(state["token"])
        for key in list(self.selector.get_map().values()):
            self.selector.unregister(key.fileobj)
            key.fileobj.close()

    def start(self) -> IdlePolls:
        self.thread.start()
        return self

    def finish(self) -> dict[int, int]:
        self.stop.set()
        self.thread.join(30)
        return self.answers


# pytest-timeout's default (300 s) is shorter than the long variant.
@pytest.mark.timeout(DURATION_SECS + 240)
def test_memory_and_file_descriptors_stay_flat_under_steady_traffic(postgres_url: str, start_server) -> None:
    server = start_server(postgres_url, workers=2)
    api = Api(server.base_url)
    alice, bob = api.signed_up(), api.signed_up()
    conversation = alice.start(bob.username)["id"]
    idle = IdlePolls(server, [api.signed_up().token for _ in range(IDLE_USERS)]).start()
    stop = threading.Event()
    sent: list[int] = []
    failures: list[str] = []
    stopped_by = [float("inf")]  # the reader's deadline to catch up, once traffic stops
    sender_finished = threading.Event()

    def send() -> None:
        client = Api(server.base_url, alice.token)
        n = 0
        while not stop.is_set():
            n += 1
            answer = client.post(f"/api/v1/conversations/{conversation}/messages", {"text": f"soak {n}"}, timeout=30)
            if answer.status_code != 201:
                failures.append(f"send {answer.status_code} {answer.text[:200]}")
            else:
                sent.append(answer.json()["seq"])
            time.sleep(0.02)

    def read() -> int:
        client = Api(server.base_url, bob.token)
        pos, received = 0, 0
        for rounds in range(1_000_000):
            if sender_finished.is_set() and (received >= len(sent) or time.monotonic() > stopped_by[0]):
                break
            page = client.events(after=pos, timeout=2)
            received += sum(1 for e in page["events"] if e["type"] == "message")
            pos = page["events"][-1]["pos"] if page["events"] else pos
            # Conversations list and history too: the other read paths.
            if rounds % 20 == 0:
                assert client.get("/api/v1/conversations").status_code == 200
                assert client.get(f"/api/v1/conversations/{conversation}/messages", params={"limit": 50}).ok
        return received

    sender, reader = Background(send), Background(read)
    started = time.monotonic()
    samples: list[tuple[float, dict[int, tuple[int, int]]]] = []
    pids = server.worker_pids()
    assert len(pids) == 2
    while (elapsed := time.monotonic() - started) < DURATION_SECS:
        samples.append((elapsed, {pid: (_rss_bytes(pid), _open_fds(pid)) for pid in pids}))
        assert sender.done is False and reader.done is False, "traffic stopped early"
        time.sleep(1)
    stop.set()
    sender.join(60)
    stopped_by[0] = time.monotonic() + 30
    sender_finished.set()
    received = reader.join(60)
    answers = idle.finish()

    assert failures == []
    assert received == len(sent) and sorted(sent) == list(range(1, len(sent) + 1))
    assert set(answers) <= {200}, answers
    expected_rounds = IDLE_USERS * IDLE_POLLS_PER_USER * (DURATION_SECS // IDLE_TIMEOUT_SECS - 1)
    assert answers.get(200, 0) >= expected_rounds * 0.8, "the idle long-polls did not keep cycling"
    assert server.worker_pids() == pids, "a worker was replaced during the soak"

    warm = [s for t, s in samples if WARM_UP_SECS - 5 <= t <= WARM_UP_SECS]
    end = [s for _, s in samples[-5:]]
    report = []
    for pid in pids:
        rss_warm = statistics.median(s[pid][0] for s in warm)
        rss_end = statistics.median(s[pid][0] for s in end)
        fds_warm = statistics.median(s[pid][1] for s in warm)
        fds_end = statistics.median(s[pid][1] for s in end)
        report.append(
            f"worker {pid}: RSS {rss_warm / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB, fds {fds_warm} -> {fds_end}"
        )
        assert rss_end <= rss_warm * (1 + RSS_TOLERANCE_RATIO) + RSS_TOLERANCE_BYTES, report
    fds_warm = statistics.median(sum(s[pid][1] for pid in pids) for s in warm)
    fds_end = statistics.median(sum(s[pid][1] for pid in pids) for s in end)
    report.append(f"workers' fds {fds_warm} -> {fds_end}")
    assert fds_end <= fds_warm + FD_TOLERANCE, report
    print(f"{len(sent)} messages, {answers.get(200, 0)} idle long-poll rounds; " + "; ".join(report))
    metrics = requests.get(server.base_url + "/metrics", timeout=10).text
    assert 'status="5' not in metrics
