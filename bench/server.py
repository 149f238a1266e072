"""Start chatapi as in production: gunicorn, gevent workers, the shipped
gunicorn.conf.py, only CHATAPI_RATE_LIMITS=off (and, for the idle workload,
more worker connections) added to the environment."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.httpc import Connection
from chatapi.config import Settings
from tests.support.postgres import database_connections
from tests.support.server import GUNICORN

REPO = Path(__file__).resolve().parents[1]


class Server:
    def __init__(self, database_url: str, port: int, log_path: Path, workers: int | None, env: dict[str, str]) -> None:
        self.database_url = database_url
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.workers = workers
        self.env = env
        self.process: subprocess.Popen | None = None
        # The workers' metrics files, in a directory of ours: the master
        # removes its own at exit, but not when it has to be killed.
        self.metrics_dir = tempfile.mkdtemp(prefix="chatapi-bench-metrics-")

    def start(self, timeout: float = 60) -> Server:
        env = {
            **os.environ,
            "CHATAPI_DATABASE_URL": self.database_url,
            "CHATAPI_RATE_LIMITS": "off",
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
            **self.env,
        }
        connections_before = database_connections(self.database_url)
        command = [GUNICORN, "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{self.port}"]
        if self.workers:
            command += ["--workers", str(self.workers)]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*command, "wsgi:app"], cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after {timeout}s; see {self.log_path}")
            time.sleep(0.1)
        # gunicorn.conf.py's count: 2 on PostgreSQL unless set (a whole number, which it also takes as "2.0").
        expected = self.workers or int(float(env.get("CHATAPI_WORKERS") or 2))
        while len(self.worker_pids()) < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        # A few requests, to reach every worker: none measured is its first.
        for _ in range(4 * expected):
            self._ready()
        # And its pool, in the background (CHATAPI_DB_POOL_WARM): a run
        # measures a started service, not one still opening connections.
        # Each worker holds its warm pool, its listener and its publisher.
        wanted = connections_before + expected * (Settings.from_env(env).db_pool_warm + 2)
        while database_connections(self.database_url) < wanted:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the workers did not open their {wanted} connections in {timeout}s")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        conn = Connection("127.0.0.1", self.port, timeout=2)
        try:
            return conn.request("GET", "/readyz")[0] == 200
        except OSError:
            return False
        finally:
            conn.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self, timeout: float = 30) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in [self.pid, *self.worker_pids()]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.process.wait(10)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
