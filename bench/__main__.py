"""The benchmark: `bin/bench WORKLOAD [options]` (see docs/performance.md).

Starts a throwaway PostgreSQL cluster and chatapi exactly as in production,
seeds users, runs the load generator (`bench.load`) in a separate process,
prints a table, writes JSON (and a latency plot) under bench/results/, and
stops everything it started. Exit status 1 when any message was lost,
duplicated, out of order, or a `pos`/`seq` gap was seen, whatever the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg2
import psycopg2.extras
from argon2 import PasswordHasher

from bench import report
from bench.httpc import Connection
from bench.server import REPO, Server
from chatapi.auth import token_digest
from tests.support.ports import free_port
from tests.support.postgres import PostgresCluster

DEFAULTS = {
    "latency": {"pairs": 50, "rate": 200.0, "duration": 10.0},
    "throughput": {"concurrency": 64, "duration": 10.0},
    "idle": {"idle": 10_000, "pairs": 5, "rate": 20.0, "duration": 10.0},
    "wake": {"samples": 200, "pairs": 10},
}
SMOKE = [
    ("latency", {"pairs": 5, "rate": 50.0, "duration": 2.0}),
    ("throughput", {"concurrency": 8, "duration": 2.0}),
    ("idle", {"idle": 200, "pairs": 2, "rate": 10.0, "duration": 2.0}),
    ("wake", {"samples": 20, "pairs": 2}),
]
SUITE = [
    ("latency", {"pairs": 50, "rate": 200.0, "duration": 10.0}),
    ("latency", {"pairs": 50, "rate": 1000.0, "duration": 20.0}),
    ("throughput", {"concurrency": 64, "duration": 10.0}),
    ("idle", {"idle": 10_000, "pairs": 5, "rate": 20.0, "duration": 10.0}),
    ("wake", {"samples": 200, "pairs": 10}),
]
CHECK_KEYS = (
    "lost",
    "duplicated",
    "misdelivered",
    "out_of_order",
    "pos_gaps",
    "seq_gaps",
    "live_duplicates",
    "live_out_of_order",
    "live_pos_gaps",
    "live_misdelivered",
    "undelivered_at_drain",
    "not_acked",
    "idle_not_held",
    "not_sampled",
)
PASSWORD = "bench password"


class Bench:
    """One PostgreSQL cluster for the whole run; a fresh database and server per workload."""

    def __init__(self, out: Path, workers: int | None, log: Callable[[str], None]) -> None:
        self.out = out
        self.workers = workers
        self.log = log
        self.cluster = PostgresCluster()
        self.password_hash = PasswordHasher().hash(PASSWORD)
        self.servers: list[Server] = []

    def __enter__(self) -> Bench:
        try:
            self.cluster.start()
        except BaseException:
            self.cluster.destroy()  # a postmaster that started anyway, and its directory
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.stop()
        self.cluster.destroy()

    @property
    def postgres_pid(self) -> int:
        return int((self.cluster.data / "postmaster.pid").read_text().split()[0])

    def start_server(self, database_url: str, name: str, env: dict[str, str]) -> Server:
        server = Server(database_url, free_port(), self.out / f"{name}.log", self.workers, env)
        self.servers.append(server)
        return server.start()

    def seed_users(self, database_url: str, count: int, prefix: str) -> list[dict]:
        """Users with tokens, written straight to the database: signing up 10,000
        users through argon2 would take minutes and is not what we measure."""
        stamp = time.time_ns()
        users = [{"username": f"{prefix}{i:05d}", "token": f"bench-{prefix}-{i}-{stamp}"} for i in range(count)]
        conn = psycopg2.connect(database_url)
        with conn, conn.cursor() as cur:
            rows = psycopg2.extras.execute_values(
                cur,
                "INSERT INTO users (username, password_hash, created_at, event_head, acked_pos) VALUES %s RETURNING id",
                [(u["username"], self.password_hash, 0, 0) for u in users],
                template="(%s, %s, now(), %s, %s)",
                fetch=True,
                page_size=1000,
            )
            for user, (uid,) in zip(users, rows, strict=True):
                user["id"] = uid
            psycopg2.extras.execute_values(
                cur,
                "INSERT INTO tokens (user_id, token_hash, created_at) VALUES %s",
                [(u["id"], token_digest(u["token"])) for u in users],
                template="(%s, %s, now())",
                page_size=1000,
            )
        conn.close()
        return users

    def make_pairs(self, server: Server, database_url: str, count: int, prefix: str) -> list[dict]:
        users = self.seed_users(database_url, 2 * count, prefix)
        pairs = []
        for i in range(count):
            a, b = users[2 * i], users[2 * i + 1]
            conn = Connection("127.0.0.1", server.port, a["token"])
            status, body = conn.request("POST", "/api/v1/conversations", {"peer": b["username"]})
            conn.close()
            if status != 201:
                raise RuntimeError(f"could not start a conversation: {status} {body}")
            pairs.append({"a": a, "b": b, "conversation_id": body["id"]})
        return pairs

    def run(self, workload: str, params: dict, tag: str) -> dict:
        database_url = self.cluster.new_database()
        env = {}
        if workload == "idle":
            # Each idle long-poll holds one connection slot; leave headroom
            # since gunicorn cannot choose which worker accepts.
            env["CHATAPI_WORKER_CONNECTIONS"] = str(max(10_000, 2 * params["idle"]))
        servers: list[Server] = []
        try:
            servers.append(self.start_server(database_url, f"{tag}-server", env))
            if workload == "wake":
                # A second instance on the same database: the multi-host case.
                servers.append(self.start_server(database_url, f"{tag}-server-b", env))
            return self._load(workload, params, tag, database_url, servers)
        finally:
            for s in servers:
                s.stop()
            self.servers = [s for s in self.servers if s not in servers]

    def _load(self, workload: str, params: dict, tag: str, database_url: str, servers: list[Server]) -> dict:
        """Seed the users, run the load generator against `servers`, and collect its result."""
        spec: dict = {"workload": workload, **params, "base_urls": [s.base_url for s in servers]}
        pair_count = params.get("pairs", params.get("concurrency", 1))
        spec["pairs"] = self.make_pairs(servers[0], database_url, pair_count, "pair")
        if workload == "idle":
            spec["idle_users"] = self.seed_users(database_url, params["idle"], "idle")
            spec["idle_hold_secs"] = params["duration"]
        spec["server_pids"] = [s.pid for s in servers]
        spec["worker_pids"] = [pid for s in servers for pid in s.worker_pids()]
        spec["postgres_pid"] = self.postgres_pid
        spec_path = self.out / f"{tag}-spec.json"
        result_path = self.out / f"{tag}-raw.json"
        spec_path.write_text(json.dumps(spec))
        bound = 240 + 2 * params.get("duration", 0) + params.get("idle", 0) / 50
        self.log(f"running {tag} (load average {report.loadavg()}) ...")
        sessions_before = database_sessions(database_url)
        subprocess.run(
            [sys.executable, "-m", "bench.load", str(spec_path), str(result_path)],
            cwd=REPO,
            check=True,
            timeout=bound,
        )
        result = json.loads(result_path.read_text())
        # Less the session of this count itself.
        result["postgres_sessions_opened"] = database_sessions(database_url) - sessions_before - 1
        result["workload"] = workload
        result["tag"] = tag
        result["workers"] = len(spec["worker_pids"]) // len(servers)
        return result


def database_sessions(database_url: str) -> int:
    """Sessions ever opened to the database (pg_stat_database.sessions, this one included).

    During a run, this is the pools growing, plus any churn: connections
    closed and re-opened, each a new backend with its functions and
    prepared statements (docs/performance.md, "Pool churn").
    """
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
            return cur.fetchone()[0]
    finally:
        conn.close()


def failures(result: dict) -> list[str]:
    checks = result.get("checks", {})
    found = [f"{key}={checks[key]}" for key in CHECK_KEYS if checks.get(key)]
    if result.get("errors"):
        found.append(f"errors={len(result['errors'])}")
    return found


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bin/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=["latency", "throughput", "idle", "wake", "smoke", "all"])
    parser.add_argument("--pairs", type=int, help="latency/idle/wake: pairs of users")
    parser.add_argument("--rate", type=float, help="latency/idle: messages per second, in total (open loop)")
    parser.add_argument("--duration", type=float, help="seconds of load")
    parser.add_argument("--concurrency", type=int, help="throughput: closed-loop senders")
    parser.add_argument("--idle", type=int, help="idle: idle long-polls to hold")
    parser.add_argument("--samples", type=int, help="wake: wake-up samples")
    parser.add_argument("--workers", type=int, help="gunicorn workers (default: gunicorn.conf.py's)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<time>)")
    parser.add_argument("--plot", type=Path, help="also copy the latency plot here (PNG)")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> list[tuple[str, dict]]:
    if args.workload == "smoke":
        return SMOKE
    if args.workload == "all":
        return SUITE
    params = dict(DEFAULTS[args.workload])
    for key in params:
        value = getattr(args, key, None)
        if value is not None:
            params[key] = value
    return [(args.workload, params)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or REPO / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    # 10,000 idle long-polls are 10,000 sockets in the server and in the client.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def stopped(signum: int, frame: object) -> None:
        # Unwinds like Ctrl-C: the load generator is killed, then the
        # servers and the cluster are stopped on the way out.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # run under nohup, it stays ignored
        signal.signal(signal.SIGHUP, stopped)
    results: list[dict] = []
    crashed: list[str] = []
    with Bench(out, args.workers, log) as bench:
        for index, (workload, params) in enumerate(plan(args)):
            tag = f"{index + 1}-{workload}"
            try:
                result = bench.run(workload, params, tag)
            except (subprocess.SubprocessError, RuntimeError) as exc:
                crashed.append(f"{tag}: {exc}")
                continue
            result["failures"] = failures(result)
            results.append(result)
    summary = {
        "machine": report.machine(),
        "command": "bin/bench " + " ".join(sys.argv[1:] if argv is None else argv),
        # The servers inherit the environment: a CHATAPI_ setting changes what is measured.
        "environment": {name: value for name, value in os.environ.items() if name.startswith("CHATAPI_")},
        "results": [{k: v for k, v in r.items() if k != "samples"} for r in results],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot = report.plot_latency(results, out / "latency.png")
    if plot and args.plot:
        args.plot.write_bytes(plot.read_bytes())
    print(json.dumps(summary["results"], indent=None if args.workload == "smoke" else 2))
    print(report.table(results))
    print(f"results: {out}")
    failed = [f"{r['tag']}: {', '.join(r['failures'])}" for r in results if r["failures"]] + crashed
    for line in failed:
        print("FAILED " + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
