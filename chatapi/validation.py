"""Parsing and checking what clients send. Every failure is an ApiError with
the contract's code, so no input can reach the database unchecked."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from flask import Request
from werkzeug.datastructures import MultiDict

from chatapi.errors import ApiError

MAX_BODY_BYTES = 65_536
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{2,31}", re.ASCII)
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}", re.ASCII)
PASSWORD_MIN_CHARS = 8
PASSWORD_MAX_CHARS = 1024
TEXT_MAX_CHARS = 4000
PAGE_DEFAULT = 100
PAGE_MAX = 1000
_INTEGER = re.compile(r"[0-9]+", re.ASCII)
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", re.ASCII)
# What a message text must not contain: Unicode category Cc (C0, DEL and C1,
# a fixed set) except tab, newline and carriage return, and category Cs (lone
# surrogates). One character class, so the check runs in C, not per
# character in Python (tests/test_validation.py checks it against
# unicodedata for every code point).
_REFUSED_IN_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _past_every_seq(negative: bool) -> int:
    """What a number past 18 digits is read as: no seq is that high."""
    return -(10**18) if negative else 10**18


def _parse_int(literal: str) -> int:
    # Python refuses to parse very long digit strings, which are valid JSON
    # all the same (and JSON has no leading zeros, so the length is the magnitude).
    if len(literal.lstrip("-")) > 18:
        return _past_every_seq(literal.startswith("-"))
    return int(literal)


def refuse_oversized_body(request: Request) -> None:
    """413 for a body over MAX_BODY_BYTES, the first check of every request (docs/api.md)."""
    if request.content_length is not None:
        too_large = request.content_length > MAX_BODY_BYTES
    elif "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        # Without a length, Werkzeug cuts the body at the limit without an
        # error (its LimitedStream); a byte beyond it means it was longer.
        # The body read here is cached for the view.
        body = request.get_data(cache=True)
        too_large = len(body) >= MAX_BODY_BYTES and bool(request.environ["wsgi.input"].read(1))
    else:
        too_large = False
    if too_large:
        raise ApiError(413, "payload_too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")


def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, or the contract's 415/400 errors.

    Parsed once per request, the outcome kept: the sign-in limit reads the
    username through here before the view does, and both must see the same
    body. (How deep JSON may nest depends on how deep the call stack is where
    it is parsed: parsed twice, one depth could fail for the limit and pass
    for the view.)
    """
    outcome = request.environ.get(_JSON_BODY)
    if outcome is None:
        try:
            outcome = _parse_json_body(request)
        except ApiError as error:
            outcome = error
        request.environ[_JSON_BODY] = outcome
    if isinstance(outcome, ApiError):
        raise outcome
    return outcome


_JSON_BODY = "chatapi.json_body"


def _parse_json_body(request: Request) -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "send a JSON body with Content-Type: application/json")
    # From the environ: through `request.headers` the look-up cost every send 1 µs, a third of parsing its body.
    coding = request.environ.get("HTTP_CONTENT_ENCODING")
    if coding and coding.strip().lower() not in ("identity", ""):
        # Compressed (or any coding): not the JSON its bytes would read as.
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the JSON body uncompressed (no Content-Encoding)",
            {"Accept-Encoding": "identity"},
        )
    raw = request.get_data(cache=True)
    try:
        body = json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, parse_int=_parse_int, parse_float=Decimal
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    return body


_KIND_NAMES = {str: "a string", int: "an integer"}


def field(body: Mapping[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    """One field of a JSON body, checked for presence and type (bools are not ints).

    An integer may be written with a zero fraction (`12.0`, `1.2e1`): JSON
    has one kind of number, and JSON Schema's `integer`, which the OpenAPI
    document says, counts it an integer. Read exactly (as Decimal), not as a
    float, which would round `1.00000000000000000001` to 1 and `1e-400` to 0.
    """
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, "invalid_request", f"'{name}' is required")
        return None
    value = body[name]
    if kind is int and isinstance(value, Decimal):
        if value.adjusted() >= 18:
            # Past 18 digits, as _parse_int reads integers (and before int()
            # would write out all the digits of 1e999999999).
            value = _past_every_seq(value < 0)
        elif value == value.to_integral_value():
            value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, "invalid_request", f"'{name}' must be {_KIND_NAMES[kind]}")
    return value


def username(value: str) -> str:
    if not USERNAME_PATTERN.fullmatch(value):
        raise ApiError(
            400,
            "invalid_username",
            "username: 3-32 characters of a-z 0-9 _ . -, starting with a letter or digit",
        )
    return value.lower()


def lookup_name(value: str) -> str | None:
    """A username to look up, or None when it cannot name any account."""
    return value.lower() if USERNAME_PATTERN.fullmatch(value) else None


def password(value: str) -> str:
    if not PASSWORD_MIN_CHARS <= len(value) <= PASSWORD_MAX_CHARS or _has_surrogate(value):
        raise ApiError(400, "invalid_password", "password: 8-1024 characters")
    return value


def message_text(value: str) -> str:
    if not 1 <= len(value) <= TEXT_MAX_CHARS:
        raise ApiError(400, "invalid_text", "text: 1-4000 characters")
    if value.isspace():
        raise ApiError(400, "invalid_text", "text must not be only white space")
    refused = _REFUSED_IN_TEXT.search(value)
    if refused:
        raise ApiError(400, "invalid_text", f"text must not contain the character U+{ord(refused.group()):04X}")
    return value


def client_id(value: str | None) -> str | None:
    if value is not None and not CLIENT_ID_PATTERN.fullmatch(value):
        raise ApiError(400, "invalid_client_id", "client_id: 1-64 characters of A-Z a-z 0-9 . _ : -")
    return value


def _has_surrogate(value: str) -> bool:
    return any("\ud800" <= char <= "\udfff" for char in value)


def _parameter_error(name: str, rule: str) -> ApiError:
    return ApiError(400, "invalid_parameter", f"'{name}' must be {rule}")


def _single(args: MultiDict[str, str], name: str) -> str | None:
    """A query parameter's value, None when absent; given twice, it is refused (which one was meant?)."""
    values = args.getlist(name)
    if len(values) > 1:
        raise _parameter_error(name, "given once")
    return values[0] if values else None


def int_param(args: MultiDict[str, str], name: str, *, low: int, high: int | None = None) -> int | None:
    raw = _single(args, name)
    if raw is None:
        return None
    rule = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    if not _INTEGER.fullmatch(raw):
        raise _parameter_error(name, rule)
    # Zeros in front add nothing; past 18 digits, see _parse_int.
    value = _parse_int(raw.lstrip("0") or "0")
    if value < low or (high is not None and value > high):
        raise _parameter_error(name, rule)
    return value


def timeout_param(args: MultiDict[str, str], default: float, maximum: float) -> float:
    raw = _single(args, "timeout")
    if raw is None:
        return min(default, maximum)
    if not _DECIMAL.fullmatch(raw):
        raise _parameter_error("timeout", "a number of seconds >= 0")
    return min(float(raw), maximum)


def limit_param(args: MultiDict[str, str]) -> int:
    limit = int_param(args, "limit", low=1, high=PAGE_MAX)
    return PAGE_DEFAULT if limit is None else limit
