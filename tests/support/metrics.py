"""Reading a live server's Prometheus text."""

from __future__ import annotations

import re

import requests


def scrape(base_url: str) -> str:
    """The server's /metrics, on a connection of its own: a test's session may hold a kept-alive
    connection that the server (keep-alive 1 s in tests) is closing just as it is reused."""
    response = requests.get(base_url + "/metrics", timeout=30)
    response.raise_for_status()
    return response.text


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (over workers, routes, ...)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(r"(\w+)(\{.*\})? (\S+)", line)
        if match and match.group(1) == name and all(f'{k}="{v}"' in (match.group(2) or "") for k, v in labels.items()):
            total += float(match.group(3))
    return total
