"""Reading a live server's Prometheus text."""

from __future__ import annotations

import re
import time

import requests


def scrape(base_url: str) -> str:
    """The server's /metrics, on a connection of its own: a test's session may hold a kept-alive
    connection that the server is closing just as it is reused."""
    response = requests.get(base_url + "/metrics", timeout=30)
    response.raise_for_status()
    return response.text


def waiting_polls(base_url: str) -> float:
    """The long-polls waiting now, over the server's workers."""
    return metric(scrape(base_url), "chatapi_longpolls_waiting")


def wait_for_waiting_polls(base_url: str, at_least: int, timeout: float = 15) -> None:
    """Until `at_least` long-polls are waiting: a request sent is not yet one that waits."""
    deadline = time.monotonic() + timeout
    while (waiting := waiting_polls(base_url)) < at_least:
        assert time.monotonic() < deadline, f"{waiting:.0f} long-polls waiting after {timeout} s, not {at_least}"
        time.sleep(0.02)


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
