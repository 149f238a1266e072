"""The served OpenAPI document describes exactly the routes the app serves."""

from __future__ import annotations

import json
import re
import sys

import jsonschema_rs

from chatapi import validation
from chatapi.errors import ApiError
from chatapi.metrics import route_label


def app_routes(app) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "web.asset":
            continue  # the page's own files (/static/...), not an API
        path = route_label(rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((method.lower(), path))
    return routes


def documented_routes(document: dict) -> set[tuple[str, str]]:
    return {(method, path) for path, operations in document["paths"].items() for method in operations}


def test_every_route_is_described_and_nothing_else(app, client) -> None:
    document = client.get("/api/v1/openapi.json").json
    assert document["openapi"].startswith("3.")
    assert documented_routes(document) == app_routes(app)


def test_every_operation_documents_success_and_errors(client) -> None:
    document = client.get("/api/v1/openapi.json").json
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            assert any(s.startswith("2") for s in statuses), (method, path)
            assert "413" in statuses, (method, path)  # any request's body is held to 64 KiB
            if operation.get("security"):
                assert "401" in statuses, (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "415"} <= statuses, (method, path)
            if path.startswith("/api/v1/") and path != "/api/v1/openapi.json":
                assert "503" in statuses, (method, path)  # the database may be down


def test_errors_that_carry_a_header_document_it(client) -> None:
    """API.md: 401 comes with `WWW-Authenticate: Bearer`, 429 with `Retry-After`
    (and chatapi's 503 too, docs/api.md): a client generated from the document
    must learn of them there."""
    document = client.get("/api/v1/openapi.json").json
    expected = {"401": "WWW-Authenticate", "429": "Retry-After", "503": "Retry-After"}
    found = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, header in expected.items():
                if status in operation["responses"]:
                    found += 1
                    headers = operation["responses"][status].get("headers", {})
                    assert headers.get(header, {}).get("required") is True, (method, path, status)
    assert found >= 15


def test_every_reference_resolves(client) -> None:
    document = client.get("/api/v1/openapi.json").json
    text = str(document)
    for name in set(re.findall(r"#/components/schemas/(\w+)", text)):
        assert name in document["components"]["schemas"], name


def test_the_text_pattern_accepts_exactly_what_the_server_accepts(client) -> None:
    # Every one-character text, plus white space around a character: the
    # documented pattern and validation.message_text must agree. (The
    # pattern spells out its classes, so Python's re reads it as JSON
    # Schema's ECMA-262 dialect does.) Lone surrogates, which the pattern
    # cannot name portably, are refused by the description's words.
    document = client.get("/api/v1/openapi.json").json
    body = document["paths"]["/api/v1/conversations/{id}/messages"]["post"]["requestBody"]
    pattern = re.compile(body["content"]["application/json"]["schema"]["properties"]["text"]["pattern"])
    assert "\\s" not in pattern.pattern  # ECMA-262's \s matches U+FEFF, Python's does not

    def server_accepts(text: str) -> bool:
        try:
            validation.message_text(text)
        except ApiError:
            return False
        return True

    disagree = [
        hex(code)
        for code in range(sys.maxunicode + 1)
        if not 0xD800 <= code <= 0xDFFF
        for text in (chr(code), f" {chr(code)}\n")
        if bool(pattern.fullmatch(text)) != server_accepts(text)
    ]
    assert disagree == []
    assert not any(server_accepts(chr(code)) for code in range(0xD800, 0xE000))
    assert "lone surrogates" in body["content"]["application/json"]["schema"]["properties"]["text"]["description"]
    assert server_accepts("\ufeff") and not server_accepts("\u3000\t")


def test_every_pattern_compiles_in_a_rust_validator(client) -> None:
    """schemathesis checks schemas with jsonschema-rs and drops a pattern Rust's
    regex cannot compile, so an outside test tool would generate texts the
    server refuses and count each a schema-valid request rejected."""
    document = client.get("/api/v1/openapi.json").json
    patterns = re.findall(r'"pattern": ("(?:[^"\\]|\\.)*")', json.dumps(document))
    assert len(patterns) >= 4
    for pattern in patterns:
        jsonschema_rs.validator_for({"type": "string", "pattern": json.loads(pattern)})
