"""The HTTP server class of gunicorn.conf.py, on its own (no gunicorn, no app)."""

from __future__ import annotations

import runpy
import socket
from collections.abc import Callable
from types import SimpleNamespace

import gevent
import gevent.event
import gevent.socket
from gevent.pool import Pool

from tests.support.server import REPO

CONF = runpy.run_path(str(REPO / "gunicorn.conf.py"))
SERVER = CONF["ChatapiServer"]


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


def _answers_sent(body: bytes) -> list[bytes]:
    """The send() calls of KeepAliveHandler for one answer with `body`."""
    sent: list[bytes] = []

    def record(handler: object, data: bytes) -> None:
        sent.append(bytes(data))
        CONF["KeepAliveHandler"]._sendall(handler, data)

    worker = SimpleNamespace(idle_connections=set(), cfg=SimpleNamespace(keepalive=5), alive=True)
    handler = type("Handler", (CONF["KeepAliveHandler"],), {"worker": worker, "_sendall": record})

    def app(environ: dict, start_response: Callable[..., object]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    log = SimpleNamespace(access_log_enabled=False, write=lambda _text: None)
    server = SERVER(("127.0.0.1", 0), application=app, spawn=Pool(10), log=log, handler_class=handler)
    server.start()
    try:
        with gevent.socket.create_connection(("127.0.0.1", server.address[1]), timeout=5) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := client.recv(1 << 20):
                answer += chunk
    finally:
        server.stop()
    assert answer == b"".join(sent) and answer.endswith(b"\r\n\r\n" + body), answer[:200]
    return sent


def test_an_api_answer_goes_out_in_one_send() -> None:
    # pywsgi sends the head and the body apart; one send() is dearer than
    # the copy (docs/performance.md, change 38).
    sent = _answers_sent(b'{"events": [], "last_pos": 0}')
    assert len(sent) == 1 and sent[0].startswith(b"HTTP/1.1 200 OK\r\n"), sent


def test_a_large_answer_is_sent_as_pywsgi_sends_it() -> None:
    # Past ONE_SEND_BODY_BYTES the copy would cost more than the send it saves.
    body = b"x" * (CONF["ONE_SEND_BODY_BYTES"] + 1)
    sent = _answers_sent(body)
    assert len(sent) == 2 and sent[1] == body, [len(data) for data in sent]


def test_a_graceful_stop_closes_idle_connections_but_not_one_whose_request_came_in_meanwhile() -> None:
    """SIGTERM closes the connections idle between requests (ChatapiWorker.handle_exit). A
    connection whose next request woke it in the same turn of the loop has left idle by the
    time the stop is delivered, and must serve that request: it was cut off mid-request (its
    database call interrupted, a 500) when the stop was only scheduled, not checked, at SIGTERM."""
    worker_class = CONF["ChatapiWorker"]
    worker = object.__new__(worker_class)
    worker.idle_connections = set()
    worker.alive = True
    served = []

    def connection(next_request: gevent.event.Event) -> None:
        # What KeepAliveHandler.read_requestline does around its read, then a request's work.
        me = gevent.getcurrent()
        worker.idle_connections.add(me)
        try:
            next_request.wait()
        finally:
            worker.idle_connections.discard(me)
        gevent.sleep(0.05)  # the request's database call
        served.append(next_request)

    request_arrives = gevent.event.Event()
    busy = gevent.spawn(connection, request_arrives)
    idle = gevent.spawn(connection, gevent.event.Event())
    gevent.sleep(0)  # both wait for a request
    request_arrives.set()  # the request's wake-up is queued in the loop...
    worker_class.handle_exit(worker, 15, None)  # ...before the signal's stop
    gevent.joinall([busy, idle], timeout=5)
    assert busy.successful() and served == [request_arrives]
    assert idle.dead and not worker.idle_connections
    assert not worker.alive
