from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answering(
    process: subprocess.Popen,
    url: str,
    timeout: float,
    *,
    ready: Callable[[requests.Response], bool] = lambda response: True,
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Wait until `url` answers with a response `ready` accepts; fail early if the process dies."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}: {describe()}")
        try:
            if ready(requests.get(url, timeout=2)):
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout} s: {describe()}")
        time.sleep(0.05)
