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

# The console script beside the interpreter, as bin/serve and the systemd unit
# run it: a binary upgrade (SIGUSR2) re-executes the master's own command line,
# and `python -m gunicorn` re-executes as a script that puts gunicorn's package
# first on sys.path (its `http` shadows the standard library's).
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


def children(pid: int) -> list[int]:
    """The processes `pid` started (a master's workers, say)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(child) for child in out.split()]


class ServerProcess:
    def __init__(
        self,
        database_url: str | None,
        workers: int | None = 1,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        port: int | None = None,
        args: list[str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        # None: the default, an SQLite file in the working directory `cwd`.
        self.database_url = database_url
        self.cwd = cwd
        self.workers = workers
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.extra_env = env or {}
        self.log_path = log_path
        # More gunicorn command-line options, e.g. another --worker-class.
        self.extra_args = args or []
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30, ready_path: str = "/readyz") -> ServerProcess:
        """Start it and wait until `ready_path` answers 200 (/healthz: the process runs, whatever the database)."""
        # The shipped defaults, but for what each test sets: no setting of
        # the environment the tests run in reaches the server.
        inherited = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("CHATAPI_") and name not in ("DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")
        }
        database = {"CHATAPI_DATABASE_URL": self.database_url} if self.database_url else {}
        env = {**inherited, **database, "CHATAPI_RATE_LIMITS": "off", **self.extra_env}
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [
                GUNICORN,
                "-c",
                str(REPO / "gunicorn.conf.py"),
                "--bind",
                f"127.0.0.1:{self.port}",
                # None: gunicorn.conf.py's own choice.
                *(["--workers", str(self.workers)] if self.workers else []),
                *self.extra_args,
                "wsgi:app",
            ],
            cwd=self.cwd,
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            wait_until_answering(
                self.process,
                self.base_url + ready_path,
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
        expected = (self.workers or 1) if (self.database_url or "").startswith("postgresql") else 1
        while len(self.worker_pids()) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.worker_pids())} of {expected} workers running; see {self.log_path}")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        return children(self.process.pid) if self.process else []

    def client_connections(self) -> dict[int, int]:
        """Each worker's established connections on the server's port (from /proc: no tools needed)."""
        inodes: set[str] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as rows:
                for row in list(rows)[1:]:
                    fields = row.split()
                    local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
                    if local_port == self.port and state == "01":  # ESTABLISHED
                        inodes.add(f"socket:[{inode}]")
        counts = {}
        for pid in self.worker_pids():
            fd_dir = Path(f"/proc/{pid}/fd")
            counts[pid] = sum(1 for fd in fd_dir.iterdir() if _readlink(fd) in inodes)
        return counts

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


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""
