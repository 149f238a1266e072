"""A minimal HTTP/1.1 keep-alive client on gevent sockets, for the load generator.

The benchmark's client must cost far less CPU than the server it measures, so
this speaks only the subset chatapi answers with (Content-Length bodies, no
chunking), with one `sendall` per request and no header objects. Import it
only in a process that gevent has monkey-patched.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

# A connection left unused this long is replaced before its next request:
# the server closes kept-alive connections after CHATAPI_KEEPALIVE_SECS (5 s
# by default), and a request written into a closing connection would fail.
MAX_IDLE_REUSE_SECS = 4.0


class HttpError(ConnectionError):
    """The connection failed or the answer was not parseable HTTP."""


class Connection:
    """One persistent connection. A request that fails is never sent again: a
    silent retry would hide a dropped request (a crashed worker, a reset
    long-poll) from the benchmark's checks."""

    def __init__(self, host: str, port: int, token: str | None = None, timeout: float = 90.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._last_used = 0.0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def connect(self) -> socket.socket:
        """Open the connection now (a request opens it when needed)."""
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._last_used = time.monotonic()
        return sock

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send one request; return (status, decoded JSON body or None)."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{self._auth}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        data = head.encode() + b"\r\n" + payload
        if self._sock is not None and time.monotonic() - self._last_used > MAX_IDLE_REUSE_SECS:
            self.close()
        try:
            answer = self._exchange(data)
        except OSError:
            self.close()
            raise
        self._last_used = time.monotonic()
        return answer

    def _exchange(self, data: bytes) -> tuple[int, Any]:
        sock = self._sock or self.connect()
        sock.sendall(data)
        buffer = self._buffer
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            chunk = sock.recv(65536)
            if not chunk:
                raise HttpError("connection closed before the response head")
            buffer += chunk
        head = buffer[:end].decode("latin-1")
        lines = head.split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(f"bad status line {lines[0]!r}") from None
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        start = end + 4
        while len(buffer) < start + length:
            chunk = sock.recv(max(65536, start + length - len(buffer)))
            if not chunk:
                raise HttpError("connection closed inside the response body")
            buffer += chunk
        body = buffer[start : start + length]
        self._buffer = buffer[start + length :]
        if close:
            self.close()
        return status, (json.loads(body) if body else None)
