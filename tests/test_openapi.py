"""The served OpenAPI document describes exactly the routes the app serves."""

from __future__ import annotations

import re
import sys

from chatapi import validation
from chatapi.errors import ApiError


def app_routes(app) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "web.asset":
            continue  # the page's own files (/static/...), not an API
        path = re.sub(r"<(?:\w+:)?conversation_id>", "{id}", rule.rule)
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
            if operation.get("security"):
                assert "401" in statuses, (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "415"} <= statuses, (method, path)
            if path.startswith("/api/v1/") and path != "/api/v1/openapi.json":
                assert "503" in statuses, (method, path)  # the database may be down


def test_every_reference_resolves(client) -> None:
    document = client.get("/api/v1/openapi.json").json
    text = str(document)
    for name in set(re.findall(r"#/components/schemas/(\w+)", text)):
        assert name in document["components"]["schemas"], name


def test_the_text_pattern_accepts_exactly_what_the_server_accepts(client) -> None:
    # Every one-character text, plus white space around a character: the
    # documented pattern and validation.message_text must agree. (The
    # pattern spells out its classes, so Python's re reads it as JSON
    # Schema's ECMA-262 dialect does.)
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
        for text in (chr(code), f" {chr(code)}\n")
        if bool(pattern.fullmatch(text)) != server_accepts(text)
    ]
    assert disagree == []
    assert server_accepts("\ufeff") and not server_accepts("\u3000\t")
