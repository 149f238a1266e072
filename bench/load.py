"""The load generator: `python -m bench.load SPEC.json RESULT.json`.

Runs in its own process, on gevent, against servers that `bench` started.
Every latency is measured from the message's *scheduled* send time (open
loop), so a slow server cannot hide its queueing by slowing the client.
Every run ends with an audit that re-reads each user's whole event stream
and checks it against what the server acknowledged: nothing lost,
duplicated, out of order, and no `pos` gaps.
"""

from gevent import monkey

monkey.patch_all()

import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.lock  # noqa: E402

from bench import procs  # noqa: E402
from bench.httpc import Connection  # noqa: E402

# The long-poll timeout our clients ask for; shorter than the server's cap.
POLL_TIMEOUT_SECS = 20
# Open-loop sends in flight at once, across all senders; past this the
# schedule waits (and that wait shows up in the measured latency).
MAX_SENDS_IN_FLIGHT = 2000
# After the last send, how long everything acknowledged may take to arrive.
DRAIN_SECS = 15.0
EVENTS_PAGE = 1000
# How long the idle workload may take to get all its long-polls waiting.
IDLE_RAMP_MAX_SECS = 120.0


def percentiles(values: list[float]) -> dict:
    """p50/p90/p99/max in milliseconds, by nearest rank: the smallest value
    that at least q of the values do not exceed (never rounded down, so a
    small sample cannot understate the tail)."""
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        index = math.ceil(q * len(ordered) - 1e-9) - 1
        return round(ordered[min(len(ordered) - 1, max(0, index))] * 1000, 2)

    return {"count": len(ordered), "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": rank(1.0)}


class Target:
    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port

    def connect(self, token: str | None = None) -> Connection:
        return Connection(self.host, self.port, token)


class Ledger:
    """What was sent and acknowledged, and what each stream delivered."""

    def __init__(self) -> None:
        self.scheduled: dict[str, float] = {}  # client_id -> scheduled send time
        self.acked: dict[str, dict] = {}  # client_id -> message object from the 201
        self.acked_at: dict[str, float] = {}  # client_id -> when the 201 arrived
        self.ack_latency: list[float] = []
        # How late each send was written, against its schedule: the load
        # generator's own lag, to tell it apart from the server's queueing.
        self.send_lateness: list[float] = []
        self.delivery_latency: list[float] = []
        self.delivered_at: dict[str, float] = {}  # client_id -> first time its recipient had it
        self.expected: dict[str, tuple[int, int]] = {}  # client_id -> (sender uid, recipient uid)
        self.errors: list[str] = []
        self.outstanding = 0  # acked, not yet delivered to the recipient
        self.drained = gevent.event.Event()

    def misdelivered(self, client_id: str, user_id: int) -> bool:
        """Whether a message of ours showed up in the stream of a user who is neither party."""
        return client_id in self.expected and user_id not in self.expected[client_id]

    def error(self, what: str) -> None:
        if len(self.errors) < 50:
            self.errors.append(what)
        else:
            self.errors[-1] = f"... and more ({what})"


class Stream:
    """One user's /events loop; checks positions as they arrive."""

    def __init__(self, user: dict, target: Target, ledger: Ledger, track_delivery: bool) -> None:
        self.user = user
        self.conn = target.connect(user["token"])
        self.ledger = ledger
        self.track_delivery = track_delivery
        self.after = 0
        self.pos_gaps = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.misdelivered = 0
        self.seen: set[int] = set()
        self.last_seq: dict[int, int] = {}
        self.greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self.greenlet = gevent.spawn(self._loop)

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=True, timeout=5)
        self.conn.close()

    def _loop(self) -> None:
        while True:
            try:
                status, body = self.conn.request(
                    "GET", f"/api/v1/events?after={self.after}&limit={EVENTS_PAGE}&timeout={POLL_TIMEOUT_SECS}"
                )
            except OSError as exc:
                self.ledger.error(f"events {self.user['username']}: {exc}")
                gevent.sleep(0.1)
                continue
            now = time.monotonic()
            if status != 200:
                self.ledger.error(f"events {self.user['username']}: HTTP {status} {body}")
                gevent.sleep(0.1)
                continue
            for event in body["events"]:
                self._take(event, now)

    def _take(self, event: dict, now: float) -> None:
        pos = event["pos"]
        if pos != self.after + 1:
            self.pos_gaps += 1
        self.after = pos
        if event["type"] != "message":
            return
        message = event["message"]
        if message["id"] in self.seen:
            self.duplicates += 1
            return
        self.seen.add(message["id"])
        conversation = message["conversation_id"]
        if message["seq"] <= self.last_seq.get(conversation, 0):
            self.out_of_order += 1
        self.last_seq[conversation] = message["seq"]
        client_id = message["client_id"]
        ledger = self.ledger
        if ledger.misdelivered(client_id, self.user["id"]):
            self.misdelivered += 1
            return
        if not self.track_delivery or message["sender"] == self.user["username"] or client_id not in ledger.scheduled:
            return
        if client_id not in ledger.delivered_at:
            ledger.delivered_at[client_id] = now
            ledger.delivery_latency.append(now - ledger.scheduled[client_id])
            if client_id in ledger.acked:
                ledger.outstanding -= 1
                if ledger.outstanding == 0:
                    ledger.drained.set()


class Sender:
    """Sends for one user over a small pool of keep-alive connections."""

    def __init__(self, user: dict, target: Target, ledger: Ledger) -> None:
        self.user = user
        self.target = target
        self.ledger = ledger
        self.idle: list[Connection] = []

    def send(self, conversation_id: int, client_id: str, recipient_id: int) -> bool:
        ledger = self.ledger
        conn = self.idle.pop() if self.idle else self.target.connect(self.user["token"])
        ledger.expected[client_id] = (self.user["id"], recipient_id)
        ledger.send_lateness.append(time.monotonic() - ledger.scheduled[client_id])
        try:
            status, body = conn.request(
                "POST",
                f"/api/v1/conversations/{conversation_id}/messages",
                {"text": f"bench message {client_id}", "client_id": client_id},
            )
        except OSError as exc:
            conn.close()
            ledger.error(f"send {client_id}: {exc}")
            return False
        now = time.monotonic()
        self.idle.append(conn)
        if status != 201:
            ledger.error(f"send {client_id}: HTTP {status} {body}")
            return False
        ledger.acked[client_id] = body
        ledger.acked_at[client_id] = now
        ledger.ack_latency.append(now - ledger.scheduled[client_id])
        if client_id not in ledger.delivered_at:
            ledger.outstanding += 1
            ledger.drained.clear()
        return True


def audit(target: Target, users: list[dict], ledger: Ledger) -> dict:
    """Re-read every stream from pos 0 and compare with what was acknowledged."""
    counts = {"lost": 0, "duplicated": 0, "misdelivered": 0, "out_of_order": 0, "pos_gaps": 0, "seq_gaps": 0}
    appearances: dict[str, int] = {}
    by_id = {user["id"]: user for user in users}
    for user in users:
        conn = target.connect(user["token"])
        after, seqs, last_seq = 0, {}, {}
        while True:
            status, body = conn.request("GET", f"/api/v1/events?after={after}&limit={EVENTS_PAGE}&timeout=0")
            if status != 200:
                ledger.error(f"audit {user['username']}: HTTP {status}")
                break
            if not body["events"]:
                break
            for event in body["events"]:
                if event["pos"] != after + 1:
                    counts["pos_gaps"] += 1
                after = event["pos"]
                if event["type"] != "message":
                    continue
                message = event["message"]
                conversation = message["conversation_id"]
                if message["seq"] <= last_seq.get(conversation, 0):
                    counts["out_of_order"] += 1
                last_seq[conversation] = message["seq"]
                seqs.setdefault(conversation, []).append(message["seq"])
                client_id = message["client_id"]
                if client_id in ledger.expected:
                    if ledger.misdelivered(client_id, user["id"]):
                        counts["misdelivered"] += 1
                    key = f"{user['id']}:{client_id}"
                    appearances[key] = appearances.get(key, 0) + 1
        conn.close()
        for numbers in seqs.values():
            if sorted(set(numbers)) != list(range(1, max(numbers) + 1)):
                counts["seq_gaps"] += 1
    for client_id in ledger.acked:
        sender_id, recipient_id = ledger.expected[client_id]
        for uid in (sender_id, recipient_id):
            if uid not in by_id:
                continue
            seen = appearances.get(f"{uid}:{client_id}", 0)
            if seen == 0:
                counts["lost"] += 1
            elif seen > 1:
                counts["duplicated"] += seen - 1
    return counts


def _stream_totals(streams: list[Stream]) -> dict:
    return {
        "live_duplicates": sum(s.duplicates for s in streams),
        "live_out_of_order": sum(s.out_of_order for s in streams),
        "live_pos_gaps": sum(s.pos_gaps for s in streams),
        "live_misdelivered": sum(s.misdelivered for s in streams),
    }


def _drain(ledger: Ledger, seconds: float) -> None:
    if ledger.outstanding > 0:
        ledger.drained.clear()
        ledger.drained.wait(seconds)


class Window:
    """CPU seconds of the load generator, the servers and PostgreSQL over one measured window."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.started = time.monotonic()
        self.client = sum(os.times()[:2])
        self.server = procs.cpu_seconds(spec["server_pids"])
        self.postgres = procs.cpu_seconds([spec["postgres_pid"]])
        self.load_before = procs.load_average()
        self.targets = [Target(url) for url in spec["base_urls"]]
        self.requests = _requests_by_route(self.targets)

    def close(self) -> dict:
        requests = _requests_by_route(self.targets)
        self.requests_in_window = {
            key: int(value - self.requests.get(key, 0))
            for key, value in requests.items()
            if value > self.requests.get(key, 0) and "metrics" not in key
        }
        return {
            "wall_secs": round(time.monotonic() - self.started, 2),
            "client": round(sum(os.times()[:2]) - self.client, 2),
            "server": round(procs.cpu_seconds(self.spec["server_pids"]) - self.server, 2),
            "postgres": round(procs.cpu_seconds([self.spec["postgres_pid"]]) - self.postgres, 2),
            "load_average_before": self.load_before,
        }


def run_open_loop(
    spec: dict, target: Target, pairs: list[dict], rate: float, duration: float, ledger: Ledger
) -> tuple[int, float]:
    """Send `rate` messages/s in total, round-robin over the pairs, for `duration` s."""
    senders: dict[int, Sender] = {}
    for pair in pairs:
        for user in (pair["a"], pair["b"]):
            senders[user["id"]] = Sender(user, target, ledger)
    slots = gevent.lock.BoundedSemaphore(MAX_SENDS_IN_FLIGHT)
    total = int(rate * duration)
    started = time.monotonic() + 0.05
    jobs = []

    def one(index: int, pair: dict, forward: bool) -> None:
        with slots:
            sender, recipient = (pair["a"], pair["b"]) if forward else (pair["b"], pair["a"])
            senders[sender["id"]].send(pair["conversation_id"], f"m{index}", recipient["id"])

    for index in range(total):
        when = started + index / rate
        delay = when - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        pair = pairs[index % len(pairs)]
        forward = (index // len(pairs)) % 2 == 0
        ledger.scheduled[f"m{index}"] = when
        jobs.append(gevent.spawn(one, index, pair, forward))
    send_secs = time.monotonic() - started
    gevent.joinall(jobs, timeout=60)
    # Sends still unanswered now count as not acknowledged (the run failed to
    # keep up); stop them so that nothing changes under the audit.
    gevent.killall(jobs, timeout=10)
    return total, send_secs


def workload_latency(spec: dict, active: bool = False) -> dict:
    target = Target(spec["base_urls"][0])
    pairs = spec["pairs"]
    ledger = Ledger()
    users = [u for pair in pairs for u in (pair["a"], pair["b"])]
    streams = [Stream(user, target, ledger, track_delivery=True) for user in users]
    for stream in streams:
        stream.start()
    gevent.sleep(0.5)
    window = Window(spec)
    total, send_secs = run_open_loop(spec, target, pairs, spec["rate"], spec["duration"], ledger)
    _drain(ledger, DRAIN_SECS)
    cpu = window.close()
    for stream in streams:
        stream.stop()
    checks = {**audit(target, users, ledger), **_stream_totals(streams)}
    checks["not_acked"] = total - len(ledger.acked)
    checks["undelivered_at_drain"] = ledger.outstanding
    return {
        "params": {"pairs": len(pairs), "rate": spec["rate"], "duration": spec["duration"]},
        "scheduled": total,
        "acked": len(ledger.acked),
        "delivered": len(ledger.delivered_at),
        "achieved_send_rate": round(total / send_secs, 1) if send_secs > 0 else None,
        "send_late_ms": percentiles(ledger.send_lateness),
        "ack_ms": percentiles(ledger.ack_latency),
        "delivery_ms": percentiles(ledger.delivery_latency),
        "checks": checks,
        "errors": ledger.errors,
        "cpu_secs": cpu,
        "server_requests": window.requests_in_window,
        "samples": {"ack": ledger.ack_latency, "delivery": ledger.delivery_latency},
    }


def workload_throughput(spec: dict) -> dict:
    target = Target(spec["base_urls"][0])
    pairs = spec["pairs"]
    duration = spec["duration"]
    ledger = Ledger()
    # Recipients poll; senders only send (no second device).
    streams = [Stream(pair["b"], target, ledger, track_delivery=True) for pair in pairs]
    for stream in streams:
        stream.start()
    gevent.sleep(0.5)
    window = Window(spec)
    started = time.monotonic()
    deadline = started + duration
    counter = iter(range(10**9))

    def closed_loop(pair: dict) -> None:
        sender = Sender(pair["a"], target, ledger)
        while time.monotonic() < deadline:
            client_id = f"t{next(counter)}"
            ledger.scheduled[client_id] = time.monotonic()
            if not sender.send(pair["conversation_id"], client_id, pair["b"]["id"]):
                gevent.sleep(0.05)

    loops = [gevent.spawn(closed_loop, pair) for pair in pairs]
    gevent.joinall(loops, timeout=duration + 60)
    gevent.killall(loops, timeout=10)
    ended = time.monotonic()
    _drain(ledger, DRAIN_SECS)
    cpu = window.close()
    for stream in streams:
        stream.stop()
    in_window = sum(1 for t in ledger.delivered_at.values() if t <= ended)
    checks = {**audit(target, [u for p in pairs for u in (p["a"], p["b"])], ledger), **_stream_totals(streams)}
    checks["undelivered_at_drain"] = ledger.outstanding
    # Sends begun and never answered (killed at the limit), or answered with an error.
    checks["not_acked"] = len(ledger.expected) - len(ledger.acked)
    elapsed = ended - started
    return {
        "params": {"concurrency": len(pairs), "duration": duration},
        "acked": len(ledger.acked),
        "acked_per_sec": round(len(ledger.acked) / elapsed, 1),
        "delivered_per_sec": round(in_window / elapsed, 1),
        "ack_ms": percentiles(ledger.ack_latency),
        "delivery_ms": percentiles(ledger.delivery_latency),
        "checks": checks,
        "errors": ledger.errors,
        "cpu_secs": cpu,
        "server_requests": window.requests_in_window,
    }


def _metrics(target: Target) -> list[str]:
    """The server's /metrics lines (summed over its workers)."""
    with socket.create_connection((target.host, target.port), timeout=30) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode().splitlines()


def _waiting_longpolls(target: Target) -> float:
    try:
        lines = _metrics(target)
    except OSError:
        return 0.0  # busy (e.g. accepting thousands of connections): ask again later
    for line in lines:
        if line.startswith("chatapi_longpolls_waiting"):
            return float(line.split()[-1])
    return 0.0


def _requests_by_route(targets: list[Target]) -> dict[str, float]:
    """chatapi_http_requests_total per "METHOD route", the woken long-polls by how they
    were answered ("woken polls: pushed" or "woken polls: query"), and the send
    transactions with the sends they carried ("send transactions", "sends in them"),
    and the same for acknowledging polls, over all servers."""
    counts: dict[str, float] = {}
    for target in targets:
        for line in _metrics(target):
            for name, key in (
                ("chatapi_send_batch_size_count ", "send transactions"),
                ("chatapi_send_batch_size_sum ", "sends in them"),
                ("chatapi_poll_batch_size_count ", "acknowledging poll transactions"),
                ("chatapi_poll_batch_size_sum ", "polls in them"),
            ):
                if line.startswith(name):
                    counts[key] = counts.get(key, 0) + float(line.split()[-1])
            if line.startswith(("chatapi_http_requests_total{", "chatapi_woken_polls_total{")):
                labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
                labels = {name: value.strip(chr(34)) for name, value in labels.items()}
                if "answer" in labels:
                    key = f"woken polls: {labels['answer']}"
                else:
                    key = f"{labels['method']} {labels['route']}"
                counts[key] = counts.get(key, 0) + float(line.split()[-1])
    return counts


def workload_idle(spec: dict) -> dict:
    target = Target(spec["base_urls"][0])
    idle_users = spec["idle_users"]
    worker_pids = spec["worker_pids"]
    held_ok = {"early": 0, "errors": 0, "renewed": 0}
    # Baseline memory with the server warmed up by the active pairs' polls.
    ledger = Ledger()
    pairs = spec["pairs"]
    active_users = [u for pair in pairs for u in (pair["a"], pair["b"])]
    streams = [Stream(user, target, ledger, track_delivery=True) for user in active_users]
    for stream in streams:
        stream.start()
    gevent.sleep(1.0)
    rss_before = procs.rss_bytes(worker_pids)
    idle_secs = spec["idle_hold_secs"]
    opening = gevent.lock.BoundedSemaphore(200)
    stop = gevent.event.Event()

    def hold(user: dict) -> None:
        """Keep one long-poll waiting; renew it when the server's timeout answers it (empty)."""
        conn = target.connect(user["token"])
        try:
            with opening:
                conn.connect()
            while not stop.is_set():
                status, body = conn.request("GET", "/api/v1/events?after=0&timeout=60")
                if stop.is_set():
                    break
                if status != 200 or body["events"]:
                    held_ok["early" if status == 200 else "errors"] += 1
                    break
                held_ok["renewed"] += 1
        except OSError:
            if not stop.is_set():
                held_ok["errors"] += 1
        finally:
            conn.close()

    started = time.monotonic()
    holders = [gevent.spawn(hold, user) for user in idle_users]
    wanted = len(idle_users) + len(active_users)
    waiting = 0.0
    while time.monotonic() - started < IDLE_RAMP_MAX_SECS:
        gevent.sleep(0.5)
        waiting = _waiting_longpolls(target)
        if waiting >= wanted:
            break
    ramp_secs = time.monotonic() - started
    gevent.sleep(1.0)
    rss_after = procs.rss_bytes(worker_pids)
    window = Window(spec)
    # Active pairs keep talking while the idle connections wait.
    total, _ = run_open_loop(spec, target, pairs, spec["rate"], idle_secs, ledger)
    _drain(ledger, DRAIN_SECS)
    cpu = window.close()
    waiting_end = _waiting_longpolls(target)
    stop.set()
    gevent.killall(holders, block=True, timeout=10)
    for stream in streams:
        stream.stop()
    checks = {**audit(target, active_users, ledger), **_stream_totals(streams)}
    checks["not_acked"] = total - len(ledger.acked)
    checks["undelivered_at_drain"] = ledger.outstanding
    # The active streams may be between two polls when counted; the idle ones never are.
    all_waiting = waiting >= wanted and waiting_end >= len(idle_users)
    checks["idle_not_held"] = held_ok["early"] + held_ok["errors"] + (0 if all_waiting else 1)
    per_conn = (rss_after - rss_before) / max(1, len(idle_users))
    return {
        "params": {"idle": len(idle_users), "pairs": len(pairs), "rate": spec["rate"], "duration": idle_secs},
        "idle_waiting_seen": waiting - len(active_users),
        "idle_waiting_at_end": waiting_end - len(active_users),
        "ramp_secs": round(ramp_secs, 2),
        "idle_renewed": held_ok["renewed"],
        "server_rss_before_mib": round(rss_before / 2**20, 1),
        "server_rss_after_mib": round(rss_after / 2**20, 1),
        "rss_per_idle_kib": round(per_conn / 1024, 2),
        "ack_ms": percentiles(ledger.ack_latency),
        "delivery_ms": percentiles(ledger.delivery_latency),
        "checks": checks,
        "errors": ledger.errors,
        "send_late_ms": percentiles(ledger.send_lateness),
        "samples": {"ack": ledger.ack_latency, "delivery": ledger.delivery_latency},
        "cpu_secs": cpu,
        "server_requests": window.requests_in_window,
    }


def workload_wake(spec: dict) -> dict:
    """Send through instance A; wait on instance B (cross-process) and on A (same process)."""
    send_target = Target(spec["base_urls"][0])
    ledger = Ledger()
    results: dict[str, list[float]] = {"cross": [], "same": []}
    # From the 201 to the waiting poll's answer: the wake-up itself, without
    # the send's own transaction (0 when the poll answered first).
    after_ack: dict[str, list[float]] = {"cross": [], "same": []}
    samples = spec["samples"]
    pairs = spec["pairs"]
    rounds = math.ceil(samples / len(pairs))  # each pair's share, rounded up
    window = Window(spec)

    def pair_loop(index: int, pair: dict) -> None:
        sender = Sender(pair["a"], send_target, ledger)
        waiters = {
            "cross": Target(spec["base_urls"][1]).connect(pair["b"]["token"]),
            "same": send_target.connect(pair["b"]["token"]),
        }
        after = 0
        for round_ in range(rounds):
            kind = "cross" if round_ % 2 == 0 else "same"
            conn = waiters[kind]
            # Catch up (this also acknowledges, which appends receipts).
            while True:
                status, body = conn.request("GET", f"/api/v1/events?after={after}&timeout=0")
                if status != 200 or not body["events"]:
                    break
                after = body["events"][-1]["pos"]
            poll = gevent.spawn(conn.request, "GET", f"/api/v1/events?after={after}&timeout=10")
            gevent.sleep(0.03 + 0.002 * index)
            client_id = f"w{index}-{round_}"
            ledger.scheduled[client_id] = time.monotonic()
            sender.send(pair["conversation_id"], client_id, pair["b"]["id"])
            poll.join(timeout=15)
            if not poll.successful():
                ledger.error(f"wake poll failed: {poll.exception}")
                continue
            returned = time.monotonic()
            status, body = poll.value
            messages = [e for e in body["events"] if e["type"] == "message"]
            if status != 200 or not messages or messages[0]["message"]["client_id"] != client_id:
                ledger.error(f"wake poll answered without the message: {status} {body}")
                continue
            results[kind].append(returned - ledger.scheduled[client_id])
            if client_id in ledger.acked_at:
                after_ack[kind].append(max(0.0, returned - ledger.acked_at[client_id]))
            ledger.delivered_at[client_id] = returned
            ledger.outstanding -= 1
            after = body["events"][-1]["pos"]
        for conn in waiters.values():
            conn.close()

    loops = [gevent.spawn(pair_loop, i, pair) for i, pair in enumerate(pairs)]
    gevent.joinall(loops, timeout=120)
    # Stop the late ones, so that nothing changes under the audit.
    gevent.killall(loops, timeout=10)
    cpu = window.close()
    users = [u for pair in pairs for u in (pair["a"], pair["b"])]
    checks = audit(send_target, users, ledger)
    checks["undelivered_at_drain"] = ledger.outstanding
    checks["not_sampled"] = rounds * len(pairs) - len(results["cross"]) - len(results["same"])
    return {
        "params": {"samples": samples, "pairs": len(pairs)},
        "cross_process_ms": percentiles(results["cross"]),
        "same_process_ms": percentiles(results["same"]),
        "cross_process_after_ack_ms": percentiles(after_ack["cross"]),
        "same_process_after_ack_ms": percentiles(after_ack["same"]),
        "checks": checks,
        "errors": ledger.errors,
        "cpu_secs": cpu,
        "server_requests": window.requests_in_window,
    }


WORKLOADS = {
    "latency": workload_latency,
    "throughput": workload_throughput,
    "idle": workload_idle,
    "wake": workload_wake,
}


def main() -> int:
    spec_path, result_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The collector's full passes over the growing ledger stopped this
    # process for up to 100 ms at R=1000, delaying its reads of answers the
    # server had already sent: latency of ours, not the server's. A run is
    # bounded, and what its cycles leave is small.
    gc.disable()
    result = WORKLOADS[spec["workload"]](spec)
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
