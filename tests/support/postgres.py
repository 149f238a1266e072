"""A throwaway PostgreSQL cluster made from the installed binaries.

Tests that need PostgreSQL fail (never skip) when the binaries are missing:
`bin/test` and `.ci/run` install Debian's `postgresql` package first.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2

from tests.support.ports import free_port


@contextlib.contextmanager
def _cursor(database_url: str) -> Iterator[psycopg2.extensions.cursor]:
    """A cursor on a connection of its own (autocommit), closed after the block."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def query_value(database_url: str, sql: str) -> Any:
    """The first column of the first row `sql` returns, on a connection of its own (autocommit)."""
    with _cursor(database_url) as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def execute(database_url: str, sql: str) -> None:
    """Run `sql` on a connection of its own (autocommit)."""
    with _cursor(database_url) as cur:
        cur.execute(sql)


def database_connections(database_url: str, where: str = "TRUE") -> int:
    """The client connections to the URL's database (but the one asking) for which `where` holds."""
    return query_value(
        database_url,
        "SELECT count(*) FROM pg_stat_activity"
        f" WHERE datname = current_database() AND pid <> pg_backend_pid() AND ({where})",
    )


def find_pg_bin() -> Path:
    candidates = []
    if os.environ.get("CHATAPI_PG_BIN"):
        candidates.append(os.environ["CHATAPI_PG_BIN"])
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's "
        "'postgresql' package (bin/test does it as root) or set CHATAPI_PG_BIN"
    )


class PostgresCluster:
    def __init__(self, max_connections: int = 400) -> None:
        # 400 by default, room for every test; PostgreSQL's own default (100)
        # for a test of what a production-sized budget does.
        self.max_connections = max_connections
        self.bin = find_pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="chatapi-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._run_as: str | None = None
        if os.geteuid() == 0:
            # initdb refuses to run as root.
            self._run_as = "postgres"
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._databases = 0

    def _cmd(self, *args: str) -> list[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._run_as:
            command = ["runuser", "-u", self._run_as, "--", *command]
        return command

    def start(self) -> None:
        subprocess.run(
            self._cmd("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale"),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.pg_ctl("start")

    def pg_ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
            f"-c max_connections={self.max_connections} -c shared_buffers=128MB"
        )
        args = ["pg_ctl", "-D", str(self.data), "-w", "-l", str(self.root / "server.log")]
        if action in ("start", "restart"):
            args += ["-o", options]
        subprocess.run(self._cmd(*args, *extra, action), check=True, stdout=subprocess.DEVNULL)

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("stop", "-m", mode)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        self._databases += 1
        name = f"chatapi_test_{self._databases}"
        conn = psycopg2.connect(self.url())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        conn.close()
        return self.url(name)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(self.url()).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)
