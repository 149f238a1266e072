"""gunicorn settings for chatapi: `gunicorn -c gunicorn.conf.py wsgi:app`.

Every value can be overridden on the command line (--bind, --workers, ...)
or through the CHATAPI_* variables read here. No application module is
imported at the top of this file: gevent must patch the standard library in
each worker before the app (and psycopg2) load. (gevent itself and gunicorn's
gevent worker are imported, as gunicorn does to load any gevent worker; that
patches nothing.)
"""

from __future__ import annotations

import atexit
import fcntl
import gc
import glob
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import gevent
import gunicorn
import gunicorn.util
from gevent import Timeout
from gevent.pywsgi import Input
from gunicorn.errors import HaltServer
from gunicorn.http.errors import ParseException
from gunicorn.workers.ggevent import GeventPyWSGIWorker, GeventWorker, PyWSGIHandler, PyWSGIServer

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Mapping
    from types import FrameType

    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

# chatapi.config.DEFAULT_DATABASE_URL, which the master must not import (see _switch).
_DEFAULT_DATABASE_URL = "sqlite:///chatapi.sqlite3"


def _database_in(env: Mapping[str, str]) -> tuple[str, str]:
    """The variable that names the database, and its URL, as chatapi.config.Settings.from_env reads them."""
    for name in ("CHATAPI_DATABASE_URL", "DATABASE_URL"):
        if env.get(name):
            return name, env[name]
    return "CHATAPI_DATABASE_URL", _DEFAULT_DATABASE_URL


_database_url = _database_in(os.environ)[1]


def _is_postgresql(url: str) -> bool:
    return url.startswith(("postgresql", "postgres"))


# Settings this file refuses, each with its reason. At the first read in a
# process (a start, `--check-config`) a refusal stops it at once. gunicorn
# reads the file again at a reload, in the same master, where an exception
# would end it at once and orphan its workers: there they are collected, and
# on_reload stops it gracefully (_check_setup).
_refused: list[str] = []
_read_before = getattr(gunicorn, "chatapi_conf_read", False)
gunicorn.chatapi_conf_read = True  # type: ignore[attr-defined]


def _refuse(reason: str) -> None:
    if not _read_before:
        raise SystemExit(reason)
    _refused.append(reason)


bind = os.environ.get("CHATAPI_BIND") or "127.0.0.1:8000"


def _switch(name: str) -> bool:
    """An on/off variable, default on, in the words chatapi.config accepts
    (which the master must not import: it would load the app before gevent)."""
    value = os.environ.get(name) or "on"
    word = value.strip().lower()
    if word in ("1", "on", "true", "yes"):
        return True
    if word in ("0", "off", "false", "no"):
        return False
    raise SystemExit(f"{name} must be on or off, not {value!r}")


# Each worker freezes what it built at start-up out of the cyclic garbage
# collector's passes and collects its youngest generation every 10,000
# allocations instead of Python's 700. With the defaults, under load, a
# full collection walked the app's ~100,000 long-lived objects every few
# seconds and stopped the worker for 60-110 ms each time, about 8% of its
# CPU in all (docs/performance.md, change 30).
GC_YOUNGEST_THRESHOLD = 10_000

# pywsgi reads a connection through a buffer of 8 KiB by default, allocated
# for as long as the connection is open (every waiting long-poll). A request
# line and its headers fit in 1 KiB; a larger body is read past the buffer.
READ_BUFFER_BYTES = 1024


def _protocol_error(status: str, reason: str, message: str, code: str = "invalid_request") -> bytes:
    """A whole response in the contract's JSON error shape, for requests refused before the app sees them."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _seconds(name: str, default: str) -> float:
    given = os.environ.get(name) or default
    try:
        value = float(given)
    except ValueError:
        value = 0
    if not 0 < value < float("inf"):
        _refuse(f"{name} must be a number of seconds above 0, not {given!r}")
        return float(default)
    return value


# Seconds a request's body may take to arrive, counted from the end of its
# head. A client that announces a body and sends it slowly, or never, would
# otherwise hold its connection and greenlet for as long as it likes. 30 s
# carries the largest body (64 KiB) over a link of about 2 KB/s.
BODY_TIMEOUT_SECS = _seconds("CHATAPI_BODY_TIMEOUT_SECS", "30")


class BodyWithDeadline(Input):
    """pywsgi's request body, read by a deadline: past it the app's read
    raises a 408 (werkzeug's RequestTimeout, answered in the contract's
    error shape) and the connection closes after the answer."""

    __slots__ = ("deadline", "timed_out")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = time.monotonic() + BODY_TIMEOUT_SECS
        self.timed_out = False

    def _by_deadline(self, read: Any, *args: Any, **kwargs: Any) -> bytes:
        # What is already buffered is read even past the deadline: a request
        # that waited for the CPU is not the client's fault.
        with Timeout(max(self.deadline - time.monotonic(), 0.001), False):
            return read(*args, **kwargs)
        self.timed_out = True
        from werkzeug.exceptions import RequestTimeout  # not at the top: see the module's docstring

        raise RequestTimeout(f"the request body did not arrive within {BODY_TIMEOUT_SECS:g} s")

    def _do_read(self, *args: Any, **kwargs: Any) -> bytes:
        return self._by_deadline(super()._do_read, *args, **kwargs)

    def _chunked_read(self, *args: Any, **kwargs: Any) -> bytes:
        return self._by_deadline(super()._chunked_read, *args, **kwargs)

    def _discard(self) -> None:
        # After the answer pywsgi reads what the app left of the body, to
        # reach the next request. Past the deadline the connection closes
        # instead: a closed rfile ends pywsgi's loop over its requests.
        try:
            if not self.timed_out:
                super()._discard()
        except Exception:
            if not self.timed_out:
                raise
        if self.timed_out:
            self.rfile.close()


# An answer whose body is at most this long goes out in one send(), head and
# body together: pywsgi sends them apart, to spare copying a large body, and
# a send() is a dear system call (the second cost about 6% of a worker's CPU
# per request; docs/performance.md, change 38). Most answers of the API are
# a few hundred bytes; a larger one (a page of long messages, a file of the
# web page) is sent as pywsgi sends it.
ONE_SEND_BODY_BYTES = 64 * 1024

# pywsgi answers these with an empty body; every error of ours is JSON.
PROTOCOL_ERRORS = {
    "400": _protocol_error("400", "Bad Request", "malformed HTTP request"),
    "414": _protocol_error("414", "URI Too Long", "request line over 8 KiB"),
}


# Seconds a request's line and head may take to arrive when keep-alive is
# off (CHATAPI_KEEPALIVE_SECS=0); with it on, `keepalive` bounds them.
# Unbounded, a client that sends half a head holds its connection for ever.
HEAD_TIMEOUT_SECS = 5


# A Content-Length value as HTTP spells it (RFC 9110, section 8.6: 1*DIGIT).
# pywsgi reads it with int(), which also takes "+2", "1_0" and spaces inside.
_CONTENT_LENGTH = re.compile(r"[0-9]+", re.ASCII)

# gunicorn's parser's RFC9110_5_3_SINGLETON_FIELDS (Content-Length has its own check).
SINGLE_VALUE_FIELDS = ("Host", "Content-Type")


class RefusingHandler(PyWSGIHandler):
    """pywsgi's handler, refusing a request whose body's length is invalid or
    ambiguous or whose Host or Content-Type is given twice, and answering
    every request it refuses in the contract's error shape (pywsgi's own
    answers have an empty body).

    The base of KeepAliveHandler, and what post_worker_init gives gunicorn's
    own `gevent_pywsgi` worker when the command line chooses it."""

    def MessageClass(self, *args: Any) -> Any:  # noqa: N802 (pywsgi's name)
        # A request whose body length is invalid or ambiguous is refused (400,
        # closed), as RFC 9112 section 6 asks: pywsgi would read any
        # Transfer-Encoding but exactly "chunked" as no body, Transfer-Encoding
        # over Content-Length, and "+2" as 2, so the bytes left over would be
        # taken for the next request on the connection (request smuggling,
        # behind a proxy that framed the body the other way).
        headers = super().MessageClass(*args)
        encodings = headers.get_all("Transfer-Encoding")
        lengths = headers.get_all("Content-Length")
        if encodings and ([value.strip().lower() for value in encodings] != ["chunked"] or lengths):
            raise ValueError(f"Transfer-Encoding {encodings} with Content-Length {lengths}")
        if lengths and (len(set(lengths)) > 1 or not _CONTENT_LENGTH.fullmatch(lengths[0].strip())):
            raise ValueError(f"Content-Length given as {lengths}")
        # A field of one value given twice is read as the first here and may
        # be read as the last by a proxy (RFC 9110 section 5.3): refused, as
        # gunicorn's own parser refuses it.
        for name in SINGLE_VALUE_FIELDS:
            if len(headers.get_all(name) or ()) > 1:
                raise ValueError(f"{name} given twice")
        return headers

    def handle_one_request(self) -> Any:
        # pywsgi refuses a malformed request line or head (or one over its
        # limits) itself, with a (status, whole response) pair.
        result = super().handle_one_request()
        if isinstance(result, tuple) and result[0] in PROTOCOL_ERRORS:
            return result[0], PROTOCOL_ERRORS[result[0]]
        return result

    def _closing(self) -> bool:
        """Whether this answer is the connection's last. After a malformed
        chunked body the app answers 400, but where the body ends is
        unknown, so no next request can be read after it."""
        return self.wsgi_input._chunked_input_error

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        # pywsgi closes the connection after an answer that says so.
        if self._closing() and not any(name.lower() == "connection" for name, _ in headers):
            headers = [*headers, ("Connection", "close")]
        return super().start_response(status, headers, exc_info)


class BodyFramingErrors:
    """A request body as gunicorn's own parser (`--worker-class gevent`) reads
    it, keeping the framing error a read meets (a malformed chunk). The app
    is told the body was cut short (an OSError, which Werkzeug answers 400):
    gunicorn's own error, reaching the app, was taken for a bug (500)."""

    __slots__ = ("_body", "error")

    def __init__(self, body: Any) -> None:
        self._body = body
        self.error: ParseException | None = None

    def read(self, size: int | None = None) -> bytes:
        return self._reading(self._body.read, size)

    def readline(self, size: int | None = None) -> bytes:
        return self._reading(self._body.readline, size)

    def readlines(self, size: int | None = None) -> list[bytes]:
        return self._reading(self._body.readlines, size)

    def __iter__(self) -> Any:
        return iter(self.readline, b"")

    def _reading(self, read: Callable[[int | None], Any], size: int | None) -> Any:
        try:
            return read(size)
        except ParseException as error:
            self.error = error
            raise OSError(f"malformed request body: {error}") from error


def _refusing_malformed_bodies(app: Callable[..., Any]) -> Callable[..., Any]:
    """`app` under gunicorn's own parser: a request whose body turns out to be
    malformed is refused by gunicorn itself (400 in the error shape, and the
    connection closed: _write_error), whatever the app answered, as
    RefusingHandler does under pywsgi. Kept alive, the connection's next
    request would be read from the rest of the bad body."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        body = environ["wsgi.input"] = BodyFramingErrors(environ["wsgi.input"])
        answer = app(environ, start_response)
        if body.error is not None:
            if hasattr(answer, "close"):
                answer.close()
            raise body.error  # before a byte of the app's answer was sent
        return answer

    return wsgi


def _write_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error in the contract's error shape, not as an HTML page.

    gunicorn's own HTTP parser (its `gevent` worker, when the command line
    chooses it) answers the requests it refuses through that function."""
    code = "invalid_request" if status_int < 500 else "internal_error"
    gunicorn.util.write_nonblock(sock, _protocol_error(str(status_int), reason, mesg or reason, code))


class KeepAliveHandler(RefusingHandler):
    """gunicorn's keep-alive rules for gevent's pywsgi; `worker` is set per worker."""

    worker = None

    @property
    def _head_timeout(self) -> float:
        return self.worker.cfg.keepalive or HEAD_TIMEOUT_SECS

    def __init__(self, sock: socket.socket, address: Any, server: Any, rfile: Any = None) -> None:
        super().__init__(sock, address, server, rfile or sock.makefile("rb", READ_BUFFER_BYTES))

    def read_requestline(self) -> str | None:
        # A connection that sends no request within `keepalive` seconds (or
        # HEAD_TIMEOUT_SECS) is closed (returning None does that), and so is
        # one waiting for its next request when the worker starts to shut down.
        idle = gevent.getcurrent()
        self.worker.idle_connections.add(idle)
        try:
            with Timeout(self._head_timeout, False):
                return super().read_requestline()
            return None
        finally:
            self.worker.idle_connections.discard(idle)

    def read_request(self, raw_requestline: str) -> Any:
        # The same for a request head that stalls (False answers 400 and closes).
        with Timeout(self._head_timeout, False):
            parsed = super().read_request(raw_requestline)
            if parsed and self.path.lower().startswith(("http://", "https://")):
                self._from_absolute_form()
            return parsed
        return False

    def _from_absolute_form(self) -> None:
        # A request target may be a whole URL (RFC 9112, section 3.2.2), as
        # sent to a proxy. pywsgi took all of it for the path (a 404), where
        # gunicorn's own parser takes its path. (Its host would replace the
        # Host header, which nothing in chatapi reads.)
        target = urlsplit(self.path)
        self.path = (target.path or "/") + (f"?{target.query}" if target.query else "")

    def get_environ(self) -> dict[str, Any]:
        # The body is read by a deadline. And it is always read through its
        # length: pywsgi hands the bare socket to a request with "Connection:
        # upgrade" (for WebSockets, which chatapi does not serve), and Werkzeug
        # then read a POST's body until the client closed the connection.
        environ = super().get_environ()
        self.wsgi_input = BodyWithDeadline(
            self.rfile, self.content_length, socket=self.wsgi_input.socket, chunked_input=self.wsgi_input.chunked_input
        )
        environ["wsgi.input"] = self.wsgi_input
        environ["wsgi.input_terminated"] = True
        return environ

    def log_request(self) -> None:
        # gunicorn's handler builds the access log's record (two datetimes,
        # a response object, the request's headers) for every request and
        # only then finds the log off, as it is by default: 2% of a worker
        # under load (docs/performance.md, change 32).
        if self.server.log.access_log_enabled:
            if self.environ is None:
                # A request refused before it had an environ or response headers
                # (PROTOCOL_ERRORS): gunicorn's access log reads both, and raised,
                # a traceback in the error log for every malformed request anyone sends.
                address = self.client_address[0] if isinstance(self.client_address, tuple) else "-"
                self.environ = {"REMOTE_ADDR": address, "REQUEST_METHOD": "-", "RAW_URI": "-", "SERVER_PROTOCOL": "-"}
                self.response_headers = self.response_headers or []
            super().log_request()

    def _write_with_headers(self, data: bytes) -> None:
        # pywsgi's own, but for the one send() (ONE_SEND_BODY_BYTES).
        self.headers_sent = True
        self.finalize_headers()
        head = bytearray(b"HTTP/1.1 ")
        head += self.status
        head += b"\r\n"
        for header, value in self.response_headers:
            head += header
            head += b": "
            head += value
            head += b"\r\n"
        head += b"\r\n"
        if self.response_use_chunked or len(data) > ONE_SEND_BODY_BYTES:
            self._sendall(head)
            self._write(data)
        else:
            head += data
            self._sendall(head)

    def _closing(self) -> bool:
        # Once the worker is shutting down, no connection is kept alive. Nor
        # is one whose body was late (as one that was malformed): the app
        # answers 408, but where the body ends is unknown.
        return super()._closing() or not self.worker.alive or not self.worker.cfg.keepalive or self.wsgi_input.timed_out


class ChatapiServer(PyWSGIServer):
    """pywsgi's server, accepting up to 100 waiting connections each time the
    socket is ready, and serving each connection without gevent's helper.

    With several worker processes pywsgi accepts one connection per turn of
    the event loop (`set_max_accept`), to spread connections evenly. Under
    load a turn takes long, and a busy worker then accepted about 7
    connections a second: in `bin/bench latency --rate 1000` over a thousand
    new connections waited in the listen queue for up to 18 s while the
    requests on open connections were answered in under 0.5 s. gevent's
    default of 100 took that tail away (docs/performance.md, change 28).

    gevent starts each connection's greenlet on a helper that calls the
    handler as `handle(*args)`, a call that goes through C. A waiting
    long-poll keeps every C-level call on its greenlet's saved stack: about
    430 bytes for each of thousands of idle connections (docs/performance.md,
    change 35). `_serve_connection` does the helper's work with plain calls.
    """

    max_accept = 100

    def set_max_accept(self) -> None:
        pass  # keep max_accept

    def do_handle(self, sock: socket.socket, address: Any) -> None:
        if self._spawn is None:
            super().do_handle(sock, address)
            return
        try:
            # The handler is taken now, as gevent's helper takes it: a
            # graceful stop closes the server (which drops `_handle`) while
            # connections it has accepted may not have started yet.
            self._spawn(self._serve_connection, self._handle, sock, address)
        except BaseException:
            self.do_close(sock, address)
            raise

    def _serve_connection(self, handle: Callable[..., Any], sock: socket.socket, address: Any) -> None:
        try:
            handle(sock, address)
        finally:
            self.do_close(sock, address)


class ChatapiWorker(GeventPyWSGIWorker):
    """gunicorn's gevent worker on gevent's pywsgi HTTP server.

    pywsgi parses HTTP with the standard library's C-accelerated parts and
    costs about 60 µs less CPU per request than gunicorn's parser, written
    in Python (docs/performance.md, change 26). gunicorn's own `gevent_pywsgi`
    worker never closes an idle keep-alive connection and keeps serving them
    during a graceful stop, which then lasts `graceful_timeout` whenever a
    client holds one open. KeepAliveHandler restores gunicorn's rules, and
    goes one better: a graceful stop closes idle connections at once, where
    gunicorn's own worker waits up to `keepalive` seconds for each.
    """

    server_class = ChatapiServer

    def init_process(self) -> None:
        self.idle_connections = set()
        self.wsgi_handler = type("KeepAliveHandler", (KeepAliveHandler,), {"worker": self})
        super().init_process()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # SIGTERM: gunicorn stops accepting and waits for requests in flight;
        # connections idle between requests close now. (Waiting long-polls
        # answer through post_worker_init's hook.)
        super().handle_exit(sig, frame)
        loop = gevent.get_hub().loop
        for idle in list(self.idle_connections):
            loop.run_callback(self._close_if_still_idle, idle)

    def _close_if_still_idle(self, connection: gevent.Greenlet) -> None:
        # Checked as the stop is delivered, not when it was scheduled: a
        # connection whose next request woke it in between is serving that
        # request, and a stop thrown into it then cut it off mid-request (its
        # database call interrupted, a 500). This runs in the event loop, so
        # a connection found here is still waiting in read_requestline.
        if connection in self.idle_connections:
            connection.throw(gevent.GreenletExit)


def _whole(name: str, default: int, low: int) -> int:
    """A whole-number variable, `low` or more; unset or empty, the default."""
    value = os.environ.get(name, "").strip()
    try:
        number = float(value) if value else float(default)
    except ValueError:
        number = math.nan
    if not (number >= low and number.is_integer()):  # 20.0 is 20
        _refuse(f"{name} must be a whole number, {low} or more, not {value!r}")
        return default
    return int(number)


worker_class = ChatapiWorker
# SQLite wakes waiters in-process, so it runs exactly one worker. On
# PostgreSQL, workers wake each other through LISTEN/NOTIFY.
workers = _whole("CHATAPI_WORKERS", 2 if _is_postgresql(_database_url) else 1, low=1)
# Each waiting long-poll is one greenlet and one socket; they are cheap.
worker_connections = _whole("CHATAPI_WORKER_CONNECTIONS", 10000, low=1)
# Seconds an idle keep-alive connection stays open (a graceful stop closes
# idle ones at once). A polling client asks again at once, so a short value
# costs nothing. A proxy in front must use a shorter upstream keep-alive
# (deploy/nginx/chatapi.conf uses 4 s).
keepalive = _whole("CHATAPI_KEEPALIVE_SECS", 5, low=0)
# SIGTERM: long-polls answer at once (post_worker_init) and sends in
# flight get this long to finish.
graceful_timeout = _whole("CHATAPI_GRACEFUL_TIMEOUT_SECS", 20, low=0)
# A worker whose event loop has not run for this long (a call that blocks
# outside gevent) stops telling the master it is alive, and is killed and
# replaced. Waiting long-polls do not count: they wait on the loop.
timeout = 30
accesslog = os.environ.get("CHATAPI_ACCESS_LOG") or None
loglevel = os.environ.get("CHATAPI_LOG_LEVEL") or "info"
# gunicorn would take a misspelt level for info.
if loglevel.lower() not in ("debug", "info", "warning", "error", "critical"):
    _refuse(f"CHATAPI_LOG_LEVEL must be debug, info, warning, error or critical, not {loglevel!r}")
    loglevel = "info"
proc_name = "chatapi"
# gunicorn's control socket defaults to one path per user, which several
# instances on one host would fight over; set a path to turn it on.
control_socket = os.environ.get("CHATAPI_CONTROL_SOCKET", "")
control_socket_disable = not control_socket


def on_starting(server: Arbiter) -> None:
    """In the master, once: check the setup, migrate the schema, prepare shared metrics storage."""
    if server.cfg.preload_app:
        # Loaded in the master, the app would be imported before gevent
        # patches each worker (see the top of this file), and the workers
        # would share one wake-up origin and no metrics directory: wake-ups
        # between them were lost, and /metrics was empty.
        raise SystemExit("chatapi cannot run with --preload (preload_app): each worker must load the app itself")
    _check_setup(server)
    variable, database_url = _database_of(server)
    sqlite_file = _sqlite_file(database_url)
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given and not (os.path.isdir(given) and os.access(given, os.W_OK | os.X_OK)):
        # prometheus_client opens its files there as each worker starts: it failed to boot.
        raise SystemExit(f"PROMETHEUS_MULTIPROC_DIR must be a directory that chatapi can write to, not {given!r}")
    if given and sqlite_file and sqlite_file.endswith(".db"):
        # prometheus_client takes every *.db in its directory for its own.
        if os.path.dirname(os.path.abspath(sqlite_file)) == os.path.abspath(given):
            raise SystemExit(f"PROMETHEUS_MULTIPROC_DIR must not hold the database {sqlite_file} (a .db file)")
    if sqlite_file:
        _lock_sqlite_file(sqlite_file, variable)
    _migrate()
    if given:
        # A binary upgrade's new master (GUNICORN_PID set) leaves them: the
        # old master's workers still write there.
        if "GUNICORN_PID" not in os.environ:
            _remove_metrics_files(given)
    else:
        metrics_dir = tempfile.mkdtemp(prefix="chatapi-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        master = os.getpid()
        # Removed when the master exits, however it does (gunicorn's on_exit
        # is not called when it fails to start, say on a port in use), and
        # not when a worker, forked from it with this hook, exits.
        atexit.register(lambda: os.getpid() == master and shutil.rmtree(metrics_dir, ignore_errors=True))


def on_reload(server: Arbiter) -> None:
    """SIGHUP (`systemctl reload`): new workers run the code now on disk, so
    its migrations run first, as at a start."""
    try:
        _check_setup(server)
        _migrate()
    except SystemExit as exc:
        # New code must not serve an old schema. Raised as it is, this would
        # end the master at once and orphan its workers; HaltServer stops
        # them gracefully and exits 1, with the reason in the log (a
        # supervisor's restart then migrates again, or fails visibly).
        reason = exc.reason if isinstance(exc, _MigrationFailed) else exc.code
        raise HaltServer(f"reload stopped: {reason}", 1) from None


def nworkers_changed(server: Arbiter, new_value: int, old_value: int | None) -> None:
    """SQLite wakes waiters in-process, so it runs exactly one worker: a
    second one would miss the first one's wake-ups (its polls would answer
    only at their timeout). Held at every change of the count: at start,
    at a reload (which reads `workers` again) and at SIGTTIN."""
    if not _is_postgresql(_database_of(server)[1]) and new_value > 1:
        server.log.warning("SQLite runs one worker process; ignoring workers=%s", new_value)
        server.cfg.set("workers", 1)
        server.num_workers = 1


def _check_setup(server: Arbiter) -> None:
    """Raise what this file refused, and a worker class chatapi cannot run under."""
    refused = list(_refused)
    # The app waits on gevent events and greenlet-local state: under a
    # sync or threaded worker its requests hang, or fail after committing.
    if not issubclass(server.cfg.worker_class, GeventWorker):
        refused.append(
            f"chatapi needs gevent workers, not {server.cfg.worker_class_str!r}: "
            "leave --worker-class unset (gunicorn.conf.py's) or use gevent"
        )
    if refused:
        raise SystemExit("\n".join(refused))


def _database_of(server: Arbiter) -> tuple[str, str]:
    """The database the workers will use (the variable that names it, and its
    URL). gunicorn applies `-e` (raw_env) after it has read this file, so it
    is looked up here, and it wins."""
    return _database_in({**os.environ, **server.cfg.env})


def _remove_metrics_files(directory: str) -> None:
    """prometheus_client's files of an earlier run (it requires them wiped
    before a start): they kept counting, and their waiting polls stayed in
    the gauge. Only its own names (`counter_<pid>.db`, ...): the directory
    may hold other files, a SQLite database among them."""
    for path in glob.glob(os.path.join(directory, "*_*.db")):
        if re.fullmatch(r"(counter|gauge_[a-z]+|histogram|summary)_\d+\.db", os.path.basename(path)):
            os.remove(path)


class _MigrationFailed(SystemExit):
    """`alembic upgrade head` failed: exits with its status, and keeps the line that says why."""

    def __init__(self, status: int, last_line: str) -> None:
        super().__init__(status)
        self.reason = last_line or f"alembic upgrade head failed (exit status {status})"


def _migrate() -> None:
    """`alembic upgrade head`; a failure raises _MigrationFailed, after alembic's own error on stderr."""
    if _switch("CHATAPI_MIGRATE"):
        # In a child process, so the master never imports the app: workers
        # must import gevent-sensitive modules only after gevent patches them.
        # It runs in the master's working directory, as the workers do: the
        # default SQLite file is found there (alembic.ini finds the rest).
        # A database a newer release migrated is kept as it is (migrations/env.py).
        alembic_ini = os.path.join(os.path.dirname(os.path.abspath(__file__)), "alembic.ini")
        command = [sys.executable, "-m", "alembic", "-c", alembic_ini, "-x", "newer_database=keep", "upgrade", "head"]
        # Its output goes on to stderr as it comes; its last line is why it
        # failed, in one line (migrations/env.py), kept for a reload's log.
        last_line = ""
        with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace") as migration:
            for line in migration.stderr:
                sys.stderr.write(line)
                last_line = line.strip() or last_line
        if migration.returncode:
            # The master's own traceback would add nothing to what it said.
            raise _MigrationFailed(migration.returncode, last_line)


def _sqlite_file(url: str) -> str | None:
    """The file a SQLite URL names, as SQLAlchemy reads it (sqlite:///relative,
    sqlite:////absolute, %-escapes decoded); None for a database in memory,
    and for any other URL (PostgreSQL's, or one the app refuses when it reads it)."""
    parts = urlsplit(url)
    if parts.scheme not in ("sqlite", "sqlite+pysqlite"):
        return None
    path = unquote(parts.path[1:])
    return None if not path or path == ":memory:" else path


def _lock_sqlite_file(path: str, variable: str) -> None:
    """Refuse to serve a SQLite file that another chatapi instance serves.

    Wake-ups on SQLite stay in their process, so a second instance on the
    same file would leave the first one's long-polls asleep until their
    timeout. The lock (flock on `<file>.lock`) is the master's for its whole
    life, through reloads, and its workers inherit it; it goes with the last
    of them, however they end.
    """
    lock_path = path + ".lock"
    unusable = f"{variable} must be a SQLite file that chatapi can write, in a directory it can write to"
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise SystemExit(f"{unusable}: cannot open {lock_path}: {exc.strerror}") from None
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        raise SystemExit(f"{unusable}: {path} is not writable")
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(
            f"another chatapi instance serves {path}: SQLite is for one process; use PostgreSQL for more"
        ) from None


def child_exit(server: Arbiter, worker: Worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _log_to_the_error_log(worker: Worker) -> None:
    """chatapi's own log and Flask-Limiter's go where gunicorn's error log goes
    (--error-logfile, syslog), in its format. Unset, chatapi's warnings went
    to stderr bare (Python's last resort) and Flask-Limiter's nowhere at all:
    it logs through a NullHandler that a limit store it cannot reach (the
    limits then off, `swallow_errors`) could not be seen through. Flask-Limiter
    from WARNING: at INFO it writes a line for every refused request. A logger
    the operator's own logging configuration (--log-config-json, ...) gave
    handlers is left as it is.
    """
    from flask.logging import default_handler

    error_log = worker.log.error_log
    for name, level in (("chatapi", error_log.level), ("flask-limiter", max(error_log.level, logging.WARNING))):
        logger = logging.getLogger(name)
        # Not the operator's: Flask-Limiter's NullHandler, and the handler Flask
        # gives the app's logger (also "chatapi") if it is used while the app loads.
        if any(
            not isinstance(handler, logging.NullHandler) and handler is not default_handler
            for handler in logger.handlers
        ):
            continue
        logger.handlers = list(error_log.handlers)
        logger.setLevel(level)
        logger.propagate = False


def post_worker_init(worker: Worker) -> None:
    """In each worker, after gevent has patched it and the app is loaded."""
    from psycogreen.gevent import patch_psycopg

    _log_to_the_error_log(worker)
    patch_psycopg()
    gc.freeze()
    gc.set_threshold(GC_YOUNGEST_THRESHOLD, *gc.get_threshold()[1:])

    # Whatever the worker class, a request its HTTP server refuses is answered
    # in the contract's error shape: gunicorn's own parser (`gevent`) wrote an
    # HTML page, and pywsgi under gunicorn's `gevent_pywsgi` an empty body.
    gunicorn.util.write_error = _write_error
    if isinstance(worker, GeventPyWSGIWorker) and worker.wsgi_handler is PyWSGIHandler:
        worker.wsgi_handler = RefusingHandler

    app = worker.wsgi
    services = app.extensions["chatapi"]
    wakeups = services.wakeups
    # In the background: a database that is slow to answer must not hold up the worker's start.
    gevent.spawn(services.db.warm_up, services.settings.db_pool_warm)
    # Listen for other processes' wake-ups from the start rather than from
    # the first request (the app starts it there too, for other servers).
    services.notifier.start()
    # Flask's __call__ only calls wsgi_app (with any middleware). Calling
    # it directly spares every request one C-level call, which each waiting
    # long-poll would keep on its saved stack (docs/performance.md, change 25).
    worker.wsgi = app.wsgi_app
    if not isinstance(worker, GeventPyWSGIWorker):
        worker.wsgi = _refusing_malformed_bodies(worker.wsgi)  # gunicorn's own parser (`gevent`)

    # SIGTERM: waiting long-polls answer now with what they have, so clients
    # reconnect to a live process. Hooked here rather than in ChatapiWorker
    # so that it holds for whatever worker class runs the app (the command
    # line's --worker-class overrides this file, e.g. gunicorn's `gevent`).
    worker_handle_exit = worker.handle_exit

    def handle_exit(sig: int, frame: FrameType | None) -> None:
        worker_handle_exit(sig, frame)
        gevent.spawn(wakeups.drain)

    signal.signal(signal.SIGTERM, handle_exit)
    signal.siginterrupt(signal.SIGTERM, False)
