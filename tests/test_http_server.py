"""The HTTP server class of gunicorn.conf.py, on its own (no gunicorn, no app)."""

from __future__ import annotations

import runpy
import socket
from collections.abc import Callable

import gevent
from gevent.pool import Pool

from tests.support.server import REPO

SERVER = runpy.run_path(str(REPO / "gunicorn.conf.py"))["ChatapiServer"]


def _hello(environ: dict, start_response: Callable[..., object]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def test_a_connection_accepted_before_a_graceful_stop_is_still_answered() -> None:
    # gunicorn closes the server as a graceful stop begins; connections it
    # had accepted but not yet started serving must be served, not reset.
    server = SERVER(("127.0.0.1", 0), application=_hello, spawn=Pool(10), log=None)
    server.start()
    client = socket.create_connection(("127.0.0.1", server.address[1]), timeout=5)
    try:
        client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        accepted = server.do_read()  # what the accept loop does, by hand so the close comes in between
        server.do_handle(*accepted)
        server.close()
        gevent.sleep(0.2)  # the connection's greenlet runs now
        answer = client.recv(4096)
    finally:
        client.close()
        server.stop()
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"hello"), answer
