"""Operational endpoints: liveness, readiness, metrics."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from chatapi.errors import error_response

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    reason = current_app.extensions["chatapi"].db.unready_reason()
    if reason is not None:
        return error_response(503, "service_unavailable", reason, {"Retry-After": "1"})
    return jsonify({"status": "ready"})


@bp.get("/metrics")
def metrics() -> Response:
    return current_app.extensions["chatapi"].metrics.exposition()
