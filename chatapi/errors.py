"""The one error shape of the API: {"error": {"code": ..., "message": ...}}."""

from __future__ import annotations

import logging
import sqlite3

import psycopg2
from flask import Flask, Response, current_app, jsonify
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

from chatapi.db import SchemaNotMigrated, driver_message

log = logging.getLogger(__name__)

# Werkzeug's own errors (routing, body size) mapped to the contract's codes.
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    # A Range the web page's files cannot satisfy (they honour Range).
    416: "invalid_request",
    429: "rate_limited",
    503: "service_unavailable",
}


class ApiError(Exception):
    """Raised anywhere below a view; answered with the contract's error shape."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def sorted_allow(allow: str) -> str:
    """An Allow header with its methods in one order: Werkzeug builds it from a
    set, whose order differs from process to process (string hashing)."""
    return ", ".join(sorted(allow.split(", ")))


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` means the database cannot be reached (not a bug in a query)."""
    if isinstance(error, (OperationalError, PoolTimeoutError, SchemaNotMigrated)):
        return True
    # The driver's own error, where SQLAlchemy did not wrap it (a pool hook).
    if isinstance(error, (psycopg2.OperationalError, sqlite3.OperationalError)):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


def init_app(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return error_response(error.status, error.code, error.message, error.headers)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        # The headers Werkzeug's own answer carries: the methods a path takes
        # (405), and the length of a file no range of which could be served (416).
        own = error.get_response().headers if status in (405, 416) else {}
        headers = {name: own[name] for name in ("Allow", "Content-Range") if name in own}
        if "Allow" in headers:
            headers["Allow"] = sorted_allow(headers["Allow"])
        code = _HTTP_CODES.get(status, "http_error")
        message = error.description or code
        if status == 413:
            message = f"request body is larger than {current_app.config['MAX_CONTENT_LENGTH']} bytes"
        elif status == 404:
            message = "no such resource"
        return error_response(status, code, message, headers)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        if database_unavailable(error):
            # The database is down or restarting: the pool re-connects by
            # itself, so this is temporary and the client should retry. (Or
            # the schema is not migrated yet: a new connection finds it once it is.)
            log.warning("database unavailable: %s", driver_message(error))
            return error_response(
                503, "service_unavailable", "the database is unavailable; retry shortly", {"Retry-After": "1"}
            )
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")
