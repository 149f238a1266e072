"""A small client for the chat API, for tests that talk to a live server."""

from __future__ import annotations

import itertools
import time
from typing import Any

import requests

PASSWORD = "correct horse battery"
_names = itertools.count(1)


def unique_name(prefix: str = "user") -> str:
    return f"{prefix}{next(_names)}"


# A kept-alive connection idle for this long is not reused: the server may be
# closing it at that very moment (its keep-alive is 5 s, CHATAPI_KEEPALIVE_SECS),
# and a request sent into a closing connection fails (RemoteDisconnected).
REUSE_IDLE_SECS = 2.0


class Api:
    def __init__(self, base_url: str, token: str | None = None, username: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.username = username
        self.http = requests.Session()
        self._last_answer = time.monotonic()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        kwargs.setdefault("timeout", 90)
        if time.monotonic() - self._last_answer > REUSE_IDLE_SECS:
            self.http.close()  # the session opens new connections as needed
        try:
            return self.http.request(method, self.base_url + path, headers=headers, **kwargs)
        finally:
            self._last_answer = time.monotonic()

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, json=body, **kwargs)

    # Shortcuts that assert success: for arranging a test, not for testing errors.

    def signed_up(self, username: str | None = None) -> Api:
        """A new account, signed in: an Api carrying its token."""
        username = username or unique_name()
        response = self.post("/api/v1/users", {"username": username, "password": PASSWORD})
        assert response.status_code == 201, response.text
        response = self.post("/api/v1/tokens", {"username": username, "password": PASSWORD})
        assert response.status_code == 201, response.text
        return Api(self.base_url, response.json()["token"], username)

    def start(self, peer: str) -> dict:
        response = self.post("/api/v1/conversations", {"peer": peer})
        assert response.status_code in (200, 201), response.text
        return response.json()

    def send(self, conversation_id: int, text: str, client_id: str | None = None) -> dict:
        body: dict[str, Any] = {"text": text}
        if client_id is not None:
            body["client_id"] = client_id
        response = self.post(f"/api/v1/conversations/{conversation_id}/messages", body)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def events(self, after: int = 0, timeout: float = 0, limit: int | None = None) -> dict:
        params: dict[str, Any] = {"after": after, "timeout": timeout}
        if limit is not None:
            params["limit"] = limit
        response = self.get("/api/v1/events", params=params)
        assert response.status_code == 200, response.text
        return response.json()

    def messages(self, conversation_id: int, **params: Any) -> dict:
        params.setdefault("timeout", 0)
        response = self.get(f"/api/v1/conversations/{conversation_id}/messages", params=params)
        assert response.status_code == 200, response.text
        return response.json()
