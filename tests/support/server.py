"""A real chatapi server for integration tests: gunicorn with gevent workers,
started from the shipped gunicorn.conf.py on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.ports import free_port, wait_until_answering

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    def __init__(
        self,
        database_url: str,
        workers: int = 1,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        port: int | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.database_url = database_url
        self.workers = workers
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.extra_env = env or {}
        self.log_path = log_path
        # More gunicorn command-line options, e.g. another --worker-class.
        self.extra_args = args or []
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> ServerProcess:
        env = {
            **os.environ,
            "CHATAPI_DATABASE_URL": self.database_url,
            "CHATAPI_RATE_LIMITS": "off",
            # Idle keep-alive connections close after this long.
            "CHATAPI_KEEPALIVE_SECS": "1",
            **self.extra_env,
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "gunicorn.conf.py",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(self.workers),
                *self.extra_args,
                "wsgi:app",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            wait_until_answering(
                self.process,
                self.base_url + "/readyz",
                timeout,
                ready=lambda response: response.status_code == 200,
                describe=lambda: f"see {self.log_path}",
            )
        except TimeoutError:
            self.stop()
            raise
        # All workers booted: each answers readyz; give the others a moment.
        self.wait_workers()
        return self

    def wait_workers(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        # SQLite always runs one worker, whatever was asked.
        expected = 1 if self.database_url.startswith("sqlite") else self.workers
        while len(self.worker_pids()) < expected and time.monotonic() < deadline:
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def signal(self, sig: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """kill -9 of the master and every worker."""
        if self.process is None:
            return
        pids = self.worker_pids()
        for pid in [self.process.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(10)
