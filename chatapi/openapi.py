"""The OpenAPI 3 document of /api/v1, the operational endpoints and the page,
served at /api/v1/openapi.json.

Written by hand from the contract (docs/api.md); a test checks that every
route the app serves but the page's files (/static/...) is described here,
and schemathesis checks responses against it.
"""

from __future__ import annotations

from functools import cache

from chatapi.wire import Json


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Json) -> Json:
    return {"content": {"application/json": {"schema": schema}}}


def _error(description: str, headers: Json | None = None) -> Json:
    return {"description": description, **({"headers": headers} if headers else {}), **_json(_ref("Error"))}


# The headers the contract promises with some errors (errors.error_response, limits.py).
_CHALLENGE = {
    "WWW-Authenticate": {
        "description": "The authentication scheme to use",
        "required": True,
        "schema": {"type": "string", "enum": ["Bearer"]},
    }
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds to wait before asking again",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def _ok(description: str, schema: Json) -> Json:
    return {"description": description, **_json(schema)}


_BODY_ERRORS = {
    "400": _error("Invalid input"),
    "413": _error("Body over 65536 bytes"),
    "415": _error("Body is not JSON"),
}
_AUTH_ERRORS = {"401": _error("Missing, invalid or revoked token", _CHALLENGE)}
_NOT_FOUND = {"404": _error("No such conversation, or the caller is not part of it")}
_RATE = {"429": _error("Rate limited; see Retry-After", _RETRY_AFTER)}
_UNAVAILABLE = {"503": _error("The database is unavailable; retry after Retry-After seconds", _RETRY_AFTER)}
_STATUS = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
_BEARER = [{"bearer": []}]

_CONVERSATION_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 0, "maximum": 999_999_999_999_999_999},
}
_AFTER = {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}}
_BEFORE = {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 0}}
_LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}
_TIMEOUT = {
    "name": "timeout",
    "in": "query",
    "description": "Seconds to wait when nothing is new (default 25, above 60 counts as 60, 0 = no wait); "
    "digits with an optional decimal point, no exponent",
    "schema": {"type": "string", "pattern": "^([0-9]+(\\.[0-9]*)?|\\.[0-9]+)$"},
}

# Message text (validation.message_text): no category Cc character but tab,
# newline and carriage return, and at least one character that is not white
# space (spelt out without a look-ahead, which generators such as
# Hypothesis's from_regex do not honour).
# White space is spelt out too: `\s` in JSON Schema's (ECMA-262) regular
# expressions also matches U+FEFF, which is not Unicode white space.
# Lone surrogates, refused too, are said in the description only: they are
# not Unicode scalar values, and a pattern naming them does not compile in
# Rust's regex (jsonschema-rs, which schemathesis validates with, so it
# dropped the whole pattern) nor match as meant in ECMA-262 without the u flag.
_TEXT_CHAR = r"\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F"
_TEXT_SPACE = r"\t\n\r \u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000"
TEXT_PATTERN = rf"^[^{_TEXT_CHAR}]*[^{_TEXT_SPACE}{_TEXT_CHAR}][^{_TEXT_CHAR}]*$"

_TIME = {"type": "string", "format": "date-time"}
_SEQ = {"type": "integer", "minimum": 0}

_SCHEMAS: Json = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    },
    "Credentials": {
        "type": "object",
        "required": ["username", "password"],
        "properties": {
            "username": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{2,31}$"},
            "password": {"type": "string", "minLength": 8, "maxLength": 1024},
        },
    },
    # Sign-in takes any strings: a name or password that could never be
    # valid is just wrong credentials (401), after the same work.
    "SignIn": {
        "type": "object",
        "required": ["username", "password"],
        "properties": {"username": {"type": "string"}, "password": {"type": "string"}},
    },
    "User": {
        "type": "object",
        "required": ["id", "username"],
        "properties": {"id": {"type": "integer"}, "username": {"type": "string"}},
    },
    "Token": {
        "type": "object",
        "required": ["token", "user"],
        "properties": {"token": {"type": "string"}, "user": _ref("User")},
    },
    "Message": {
        "type": "object",
        "required": ["id", "conversation_id", "seq", "sender", "text", "client_id", "created_at"],
        "properties": {
            "id": {"type": "integer"},
            "conversation_id": {"type": "integer"},
            "seq": {"type": "integer", "minimum": 1},
            "sender": {"type": "string"},
            "text": {"type": "string"},
            "client_id": {"type": ["string", "null"]},
            "created_at": _TIME,
        },
    },
    "Conversation": {
        "type": "object",
        "required": [
            "id",
            "peer",
            "created_at",
            "last_seq",
            "unread",
            "read_seq",
            "peer_delivered_seq",
            "peer_read_seq",
            "last_message",
        ],
        "properties": {
            "id": {"type": "integer"},
            "peer": {"type": "string"},
            "created_at": _TIME,
            "last_seq": _SEQ,
            "unread": _SEQ,
            "read_seq": _SEQ,
            "peer_delivered_seq": _SEQ,
            "peer_read_seq": _SEQ,
            "last_message": {"oneOf": [_ref("Message"), {"type": "null"}]},
        },
    },
    "Event": {
        "oneOf": [
            {
                "type": "object",
                "required": ["pos", "type", "message"],
                "properties": {
                    "pos": {"type": "integer", "minimum": 1},
                    "type": {"const": "message"},
                    "message": _ref("Message"),
                },
            },
            {
                "type": "object",
                "required": ["pos", "type", "conversation_id", "user", "delivered_seq", "read_seq"],
                "properties": {
                    "pos": {"type": "integer", "minimum": 1},
                    "type": {"const": "receipt"},
                    "conversation_id": {"type": "integer"},
                    "user": {"type": "string"},
                    "delivered_seq": _SEQ,
                    "read_seq": _SEQ,
                },
            },
            {
                "type": "object",
                "required": ["pos", "type", "conversation"],
                "properties": {
                    "pos": {"type": "integer", "minimum": 1},
                    "type": {"const": "conversation"},
                    "conversation": _ref("Conversation"),
                },
            },
        ]
    },
}


@cache
def document() -> Json:
    paths = _paths()
    for path, operations in paths.items():
        for operation in operations.values():
            # Any request's body is held to the limit before anything else
            # (validation.refuse_oversized_body), a GET's too.
            operation["responses"].setdefault("413", _BODY_ERRORS["413"])
            if path.startswith("/api/v1/") and path != "/api/v1/openapi.json":
                operation["responses"].update(_UNAVAILABLE)  # every one of them needs the database
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chatapi",
            "version": "1.0.0",
            "description": "One-on-one chat over HTTP long-polling.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": paths,
    }


def _paths() -> Json:
    return {
        "/api/v1/users": {
            "post": {
                "summary": "Create an account",
                "operationId": "createUser",
                "requestBody": {"required": True, **_json(_ref("Credentials"))},
                "responses": {
                    "201": _ok("Created", _ref("User")),
                    "403": _error("Registration is closed on this server"),
                    "409": _error("Username taken"),
                    **_BODY_ERRORS,
                    **_RATE,
                },
            }
        },
        "/api/v1/tokens": {
            "post": {
                "summary": "Sign in: get a bearer token",
                "operationId": "createToken",
                "requestBody": {"required": True, **_json(_ref("SignIn"))},
                "responses": {
                    "201": _ok("Signed in", _ref("Token")),
                    "401": _error("Wrong username or password", _CHALLENGE),
                    **_BODY_ERRORS,
                    **_RATE,
                },
            }
        },
        "/api/v1/tokens/current": {
            "delete": {
                "summary": "Sign out: revoke the token of this request",
                "operationId": "deleteCurrentToken",
                "security": _BEARER,
                "responses": {"204": {"description": "Revoked"}, **_AUTH_ERRORS},
            }
        },
        "/api/v1/me": {
            "get": {
                "summary": "The signed-in user",
                "operationId": "getMe",
                "security": _BEARER,
                "responses": {"200": _ok("The caller", _ref("User")), **_AUTH_ERRORS},
            }
        },
        "/api/v1/conversations": {
            "get": {
                "summary": "The caller's conversations, most recent activity first",
                "operationId": "listConversations",
                "security": _BEARER,
                "responses": {
                    "200": _ok(
                        "Conversations",
                        {
                            "type": "object",
                            "required": ["conversations"],
                            "properties": {"conversations": {"type": "array", "items": _ref("Conversation")}},
                        },
                    ),
                    **_AUTH_ERRORS,
                },
            },
            "post": {
                "summary": "Start (or find) the conversation with a peer",
                "operationId": "startConversation",
                "security": _BEARER,
                "requestBody": {
                    "required": True,
                    **_json({"type": "object", "required": ["peer"], "properties": {"peer": {"type": "string"}}}),
                },
                "responses": {
                    "200": _ok("Already existed", _ref("Conversation")),
                    "201": _ok("Created", _ref("Conversation")),
                    "404": _error("No such user"),
                    **_BODY_ERRORS,
                    **_AUTH_ERRORS,
                },
            },
        },
        "/api/v1/conversations/{id}": {
            "get": {
                "summary": "One conversation",
                "operationId": "getConversation",
                "security": _BEARER,
                "parameters": [_CONVERSATION_ID],
                "responses": {"200": _ok("The conversation", _ref("Conversation")), **_AUTH_ERRORS, **_NOT_FOUND},
            }
        },
        "/api/v1/conversations/{id}/messages": {
            "get": {
                "summary": "Messages after a seq (long-poll), before a seq (history), or the latest",
                "operationId": "listMessages",
                "security": _BEARER,
                "parameters": [_CONVERSATION_ID, _AFTER, _BEFORE, _LIMIT, _TIMEOUT],
                "responses": {
                    "200": _ok(
                        "Messages in ascending seq order, and the conversation's head",
                        {
                            "type": "object",
                            "required": ["messages", "last_seq"],
                            "properties": {
                                "messages": {"type": "array", "items": _ref("Message")},
                                "last_seq": _SEQ,
                            },
                        },
                    ),
                    "400": _error("Invalid parameter"),
                    **_AUTH_ERRORS,
                    **_NOT_FOUND,
                },
            },
            "post": {
                "summary": "Send a message; the 201 is sent after it is durably stored",
                "operationId": "sendMessage",
                "security": _BEARER,
                "parameters": [_CONVERSATION_ID],
                "requestBody": {
                    "required": True,
                    **_json(
                        {
                            "type": "object",
                            "required": ["text"],
                            "properties": {
                                "text": {
                                    "type": "string",
                                    "minLength": 1,
                                    "maxLength": 4000,
                                    "description": "Plain text: not only white space; no control "
                                    "characters other than tab, newline, carriage return; no lone "
                                    "surrogates",
                                    "pattern": TEXT_PATTERN,
                                },
                                "client_id": {
                                    "type": ["string", "null"],
                                    "pattern": "^[A-Za-z0-9._:-]{1,64}$",
                                },
                            },
                        }
                    ),
                },
                "responses": {
                    "200": _ok("A replay of an earlier send with this client_id", _ref("Message")),
                    "201": _ok("Stored", _ref("Message")),
                    "409": _error("client_id already used for a different text"),
                    **_BODY_ERRORS,
                    **_AUTH_ERRORS,
                    **_NOT_FOUND,
                    **_RATE,
                },
            },
        },
        "/api/v1/conversations/{id}/read": {
            "post": {
                "summary": "Mark messages up to seq as read",
                "operationId": "markRead",
                "security": _BEARER,
                "parameters": [_CONVERSATION_ID],
                "requestBody": {
                    "required": True,
                    **_json(
                        {
                            "type": "object",
                            "required": ["seq"],
                            "properties": {
                                "seq": {
                                    "type": "integer",
                                    "minimum": 0,
                                    "description": "A JSON integer (no fraction part), at most last_seq",
                                }
                            },
                        }
                    ),
                },
                "responses": {
                    "200": _ok("The conversation", _ref("Conversation")),
                    **_BODY_ERRORS,
                    **_AUTH_ERRORS,
                    **_NOT_FOUND,
                },
            }
        },
        "/api/v1/events": {
            "get": {
                "summary": "The caller's event stream after a position (long-poll)",
                "operationId": "listEvents",
                "security": _BEARER,
                "parameters": [_AFTER, _LIMIT, _TIMEOUT],
                "responses": {
                    "200": _ok(
                        "Events in ascending pos order, and the stream's head",
                        {
                            "type": "object",
                            "required": ["events", "last_pos"],
                            "properties": {
                                "events": {"type": "array", "items": _ref("Event")},
                                "last_pos": {"type": "integer", "minimum": 0},
                            },
                        },
                    ),
                    "400": _error("Invalid parameter"),
                    **_AUTH_ERRORS,
                },
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "getOpenApi",
                "responses": {"200": _ok("OpenAPI 3 document", {"type": "object"})},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness: the process runs",
                "operationId": "getHealth",
                "responses": {"200": _ok("Running", _STATUS)},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: the database answers, with its schema migrated",
                "operationId": "getReady",
                "responses": {"200": _ok("Ready", _STATUS), **_UNAVAILABLE},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics of all this server's workers",
                "operationId": "getMetrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/": {
            "get": {
                "summary": "The web page",
                "operationId": "getWebPage",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            }
        },
    }
