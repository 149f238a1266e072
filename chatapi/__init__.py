"""chatapi: one-on-one chat over HTTP long-polling.

`create_app` is the only place the parts are built and wired together; see
docs/design.md for how they fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, Request, Response, request
from flask.globals import request_ctx
from flask.sessions import NullSession, SessionInterface
from werkzeug.datastructures import MultiDict
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import BaseConverter
from werkzeug.utils import cached_property

from chatapi import api, errors, limits, ops, validation, web
from chatapi.chat import Chat
from chatapi.config import Settings
from chatapi.db import Database
from chatapi.errors import ApiError
from chatapi.longpoll import LongPolls
from chatapi.metrics import Metrics
from chatapi.notify import LocalNotifier, Notifier
from chatapi.validation import MAX_BODY_BYTES
from chatapi.wakeups import Wakeups

__all__ = ["create_app", "Settings"]


class IdConverter(BaseConverter):
    """Integer ids in URLs; more than 18 significant digits cannot be an id and falls to 404."""

    regex = r"0*[0-9]{1,18}"

    def to_python(self, value: str) -> int:
        # Zeros in front add nothing, and past 4300 digits int() refuses a string (a 500).
        return int(value.lstrip("0") or "0")

    def to_url(self, value: int) -> str:
        return str(value)


class ApiRequest(Request):
    @cached_property
    def args(self) -> MultiDict[str, str]:
        # Werkzeug decodes the query string as UTF-8, strictly: a raw byte
        # that is not UTF-8 (percent-encoded ones it keeps as they are) was
        # a 500 wherever a view read a parameter. Raised here, it is a bad
        # parameter, answered after the token check like any other.
        try:
            return super().args
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_parameter", "the query string is not UTF-8") from None


class App(Flask):
    request_class = ApiRequest

    def make_default_options_response(self) -> Response:
        # Flask answers OPTIONS itself, with the route's Allow header and no
        # body, but labels it text/html like every Response: a body-less
        # answer carries no Content-Type (as the 204 of DELETE /tokens/current).
        response = super().make_default_options_response()
        del response.headers["Content-Type"]
        response.headers["Allow"] = errors.sorted_allow(response.headers["Allow"])
        return response

    def dispatch_request(self) -> object:
        # Flask calls every view as view(**view_args), a call that goes
        # through C, and a waiting long-poll keeps each C-level call on its
        # greenlet's saved stack: about 430 bytes for each of thousands of
        # waiting event polls (docs/performance.md, change 35). A view
        # without URL arguments, the event stream's among them, is called
        # plainly, which stays in the interpreter's loop. Everything else
        # (errors, OPTIONS, views with arguments) is Flask's own dispatch.
        req = request_ctx.request
        if req.routing_exception is None and not req.view_args and req.method != "OPTIONS":
            return self.ensure_sync(self.view_functions[req.url_rule.endpoint])()
        return super().dispatch_request()


class NoSessions(SessionInterface):
    """chatapi keeps no cookie session: callers authenticate with bearer tokens.

    Flask still builds a fresh empty session object for every request, which
    every waiting long-poll would keep (about 500 bytes each). One shared
    NullSession will do: it refuses every write.
    """

    _no_session = NullSession()

    def open_session(self, app: Flask, request: object) -> None:
        return None

    def make_null_session(self, app: Flask) -> NullSession:
        return self._no_session

    def save_session(self, app: Flask, session: object, response: object) -> None:
        pass


@dataclass(frozen=True)
class Services:
    """What the factory builds, reachable as app.extensions["chatapi"]."""

    settings: Settings
    db: Database
    wakeups: Wakeups
    notifier: Notifier
    chat: Chat
    metrics: Metrics


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = App(__name__, static_folder=None)
    # Werkzeug would answer a path with "//" inside by a 308 redirect to the
    # merged path, with an HTML body and a Location built from the Host
    # header. Every path of ours is spelt with single slashes: others are 404.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    app.session_interface = NoSessions()
    app.url_map.converters["id"] = IdConverter

    metrics = Metrics()
    db = Database(settings)
    wakeups = Wakeups(
        settings.max_waiters_per_user,
        on_wait_change=metrics.longpolls_waiting.inc,
        on_wake=metrics.wakeups.inc,
    )
    notifier: Notifier
    if settings.is_postgresql:
        from chatapi.notify_pg import PostgresNotifier

        # psycopg2 takes a libpq URI, without SQLAlchemy's "+driver" part.
        libpq_uri = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        notifier = PostgresNotifier(libpq_uri, wakeups)
    else:
        notifier = LocalNotifier(wakeups)
    chat = Chat(
        db,
        LongPolls(wakeups, on_woken=metrics.count_woken),
        notifier.publish,
        publish_at_commit=notifier.publish_at_commit,
        on_send_batch=metrics.send_batch_size.observe,
        on_poll_batch=metrics.poll_batch_size.observe,
    )
    app.extensions["chatapi"] = Services(settings, db, wakeups, notifier, chat, metrics)

    if settings.trust_proxy_headers:
        app.wsgi_app = ProxyFix(
            app.wsgi_app,
            x_for=settings.trust_proxy_headers,
            x_proto=settings.trust_proxy_headers,
            x_host=settings.trust_proxy_headers,
        )

    @app.before_request
    def _before() -> None:
        # After a fork each worker needs its own LISTEN connection.
        notifier.start()
        validation.refuse_oversized_body(request)

    @app.after_request
    def _headers_of_every_answer(response: Response) -> Response:
        # Every answer is live data: the API, errors, health, metrics and the
        # page itself (a cached copy would lie to clients, probes and
        # scrapers). The page's assets set their own policy (web.py:
        # revalidate on every load).
        response.headers.setdefault("Cache-Control", "no-store")
        # After SIGTERM no answer keeps its connection: the client's next
        # request must reach a live process, not this one (whose long-polls
        # answer at once, so a client would spin on it until it is killed).
        # pywsgi closes the connection on this header; gunicorn's own worker
        # drops it and closes by itself.
        if wakeups.draining:
            response.headers["Connection"] = "close"
        return response

    errors.init_app(app)
    metrics.init_app(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(web.bp)
    limits.init_app(app, settings)
    return app
