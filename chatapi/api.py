"""The HTTP views of /api/v1: parse, call the chat rules, shape the response."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, g, jsonify, request

from chatapi import validation, wire
from chatapi.chat import Caller, Chat, unauthorized
from chatapi.errors import ApiError
from chatapi.longpoll import Page

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def chat() -> Chat:
    return current_app.extensions["chatapi"].chat


def bearer_token() -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def current_caller() -> Caller:
    """The authenticated caller, looked up once per request; 401 without a valid token."""
    if "caller" not in g:
        token = bearer_token()
        caller = chat().authenticate(token) if token else None
        if caller is None:
            raise unauthorized()
        g.caller = caller
    return g.caller


@contextlib.contextmanager
def token_checked_later() -> Iterator[None]:
    """For views whose token is checked with their query (Chat.send, Chat.events):
    input errors raised in the block still answer 401 first for a bad token,
    as on every other endpoint."""
    try:
        yield
    except ApiError:
        current_caller()
        raise


def respond(body: dict, status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response


# Accounts and tokens ---------------------------------------------------------


@bp.post("/users")
def create_user() -> Response:
    settings = current_app.extensions["chatapi"].settings
    if not settings.registration_open:
        raise ApiError(403, "registration_closed", "this server does not accept new accounts")
    body = validation.json_body(request)
    username = validation.username(validation.field(body, "username", str))
    password = validation.password(validation.field(body, "password", str))
    return respond(chat().register(username, password), 201)


@bp.post("/tokens")
def create_token() -> Response:
    body = validation.json_body(request)
    username = validation.field(body, "username", str)
    password = validation.field(body, "password", str)
    return respond(chat().sign_in(validation.lookup_name(username), password), 201)


@bp.delete("/tokens/current")
def delete_current_token() -> Response:
    current_caller()
    chat().revoke(bearer_token() or "")  # there is one: current_caller() checked it
    response = Response(status=204)
    # No body, so no Content-Type (Flask labels every Response text/html).
    del response.headers["Content-Type"]
    return response


@bp.get("/me")
def me() -> Response:
    caller = current_caller()
    return respond({"id": caller.id, "username": caller.username})


# Conversations ---------------------------------------------------------------


@bp.post("/conversations")
def start_conversation() -> Response:
    caller = current_caller()
    body = validation.json_body(request)
    peer = validation.lookup_name(validation.field(body, "peer", str))
    conversation, created = chat().start_conversation(caller, peer)
    return respond(conversation, 201 if created else 200)


@bp.get("/conversations")
def list_conversations() -> Response:
    return respond({"conversations": chat().conversations(current_caller())})


@bp.get("/conversations/<id:conversation_id>")
def get_conversation(conversation_id: int) -> Response:
    return respond(chat().conversation(current_caller(), conversation_id))


@bp.post("/conversations/<id:conversation_id>/read")
def mark_read(conversation_id: int) -> Response:
    caller = current_caller()
    body = validation.json_body(request)
    seq = validation.field(body, "seq", int)
    if seq < 0:
        raise ApiError(400, "invalid_seq", "seq must be >= 0")
    return respond(chat().mark_read(caller, conversation_id, seq))


# Messages and events ---------------------------------------------------------


@bp.post("/conversations/<id:conversation_id>/messages")
def send_message(conversation_id: int) -> Response:
    with token_checked_later():
        body = validation.json_body(request)
        text = validation.message_text(validation.field(body, "text", str))
        client_id = validation.client_id(validation.field(body, "client_id", str, required=False))
    message, created = chat().send(bearer_token(), conversation_id, text, client_id)
    if created:
        current_app.extensions["chatapi"].metrics.messages_sent.inc()
    return respond(message, 201 if created else 200)


def _long_poll_timeout() -> float:
    settings = current_app.extensions["chatapi"].settings
    timeout = validation.timeout_param(request.args, settings.long_poll_default_secs, settings.long_poll_max_secs)
    return 0 if _only_looking() else timeout


def _only_looking() -> bool:
    """HEAD is safe in HTTP: a probe or a link checker looks without reading, so
    it acknowledges no delivery and waits for nothing (docs/api.md)."""
    return request.method == "HEAD"


@bp.get("/conversations/<id:conversation_id>/messages")
def list_messages(conversation_id: int) -> Response:
    caller = current_caller()
    after = validation.int_param(request.args, "after", low=0)
    before = validation.int_param(request.args, "before", low=0)
    if after is not None and before is not None:
        raise ApiError(400, "invalid_parameter", "use either 'after' or 'before', not both")
    limit = validation.limit_param(request.args)
    timeout = _long_poll_timeout()
    page: Page = chat().messages(
        caller,
        bearer_token(),
        conversation_id,
        after=after,
        before=before,
        limit=limit,
        timeout=timeout,
        acknowledge=not _only_looking(),
    )
    # A page after a cursor continues from its first items; history and the latest from their last.
    messages = wire.within_page_size(page.items, keep_last=after is None)
    return respond({"messages": messages, "last_seq": page.head})


@bp.get("/events")
def list_events() -> Response:
    with token_checked_later():
        if "before" in request.args:
            # The contract's `before` pages a conversation's history; the
            # event stream has none. Ignored, it would answer from pos 1.
            raise ApiError(400, "invalid_parameter", "'before' is not a parameter of the event stream")
        after = validation.int_param(request.args, "after", low=0) or 0
        limit = validation.limit_param(request.args)
        timeout = _long_poll_timeout()
    page = chat().events(bearer_token(), after=after, limit=limit, timeout=timeout, acknowledge=not _only_looking())
    return respond({"events": wire.within_page_size(page.items), "last_pos": page.head})


@bp.get("/openapi.json")
def openapi() -> Response:
    from chatapi.openapi import document

    return respond(document())
