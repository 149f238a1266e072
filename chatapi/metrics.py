"""Prometheus metrics.

Under gunicorn each worker is its own process, so counters live in
prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set up by
gunicorn.conf.py) and /metrics sums them across workers. Without that
variable (unit tests, one process) the app's own registry is used.
"""

from __future__ import annotations

import os
import re
import time

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_label(rule: str) -> str:
    """A Flask rule as the OpenAPI document spells its path: `<id:conversation_id>` is `{id}`."""
    rule = re.sub(r"<(?:\w+:)?conversation_id>", "{id}", rule)
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "chatapi_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "chatapi_http_request_duration_seconds",
            "Time to answer an HTTP request, long-poll waits included",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.messages_sent = Counter(
            "chatapi_messages_sent", "Messages stored (replays not counted)", registry=self.registry
        )
        self.longpolls_waiting = Gauge(
            "chatapi_longpolls_waiting",
            "Long-poll requests waiting right now",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.wakeups = Counter("chatapi_wakeups", "Waiting requests woken by new data", registry=self.registry)
        # Of the woken long-polls, which answered from the events their
        # wake-up carried and which asked the database again (wakeups.py).
        # Only event polls can be answered from pushed events: a woken
        # conversation poll always counts as a query.
        self.woken_polls = Counter(
            "chatapi_woken_polls",
            "Woken long-polls, by how they found their answer: pushed (carried by the wake-up) or query",
            ["answer"],
            registry=self.registry,
        )
        # Group commit (group_commit.py): how many sends each PostgreSQL
        # send transaction carried. 1 while the database keeps up.
        self.send_batch_size = Histogram(
            "chatapi_send_batch_size",
            "Sends committed together in one transaction (PostgreSQL group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        # The same for the polls that acknowledge (their first call).
        self.poll_batch_size = Histogram(
            "chatapi_poll_batch_size",
            "Acknowledging event polls run together in one transaction (PostgreSQL group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self._woken_pushed = self.woken_polls.labels("pushed")
        self._woken_query = self.woken_polls.labels("query")

    def count_woken(self, pushed: bool) -> None:
        """One woken long-poll, answered from pushed events or by a query."""
        (self._woken_pushed if pushed else self._woken_query).inc()

    def exposition(self) -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def init_app(self, app: Flask) -> None:
        @app.before_request
        def _start_timer() -> None:
            g.request_started = time.perf_counter()

        # The labelled children, made once per (method, route, status):
        # `labels()` validates its arguments on every call, which cost more
        # than the rest of the accounting on the hot paths.
        children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

        @app.after_request
        def _count(response: Response) -> Response:
            # The Flask rule keys the children; the label is the documented path (route_label).
            route = request.url_rule.rule if request.url_rule else "unmatched"
            # Any word is a method to the HTTP server: as a label, a client
            # could add series without end.
            method = request.method if request.method in HTTP_METHODS else "other"
            key = (method, route, response.status_code)
            child = children.get(key)
            if child is None:
                label = route_label(route)
                child = children[key] = (
                    self.requests.labels(method, label, str(response.status_code)),
                    self.request_duration.labels(method, label),
                )
            child[0].inc()
            started = g.get("request_started")
            if started is not None:
                child[1].observe(time.perf_counter() - started)
            return response
