"""Operational endpoints: liveness, readiness, metrics."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy.exc import SQLAlchemyError

from chatapi.errors import error_response

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    try:
        current_app.extensions["chatapi"].db.ping()
    except SQLAlchemyError:
        return error_response(503, "service_unavailable", "the database does not answer")
    return jsonify({"status": "ready"})


@bp.get("/metrics")
def metrics() -> Response:
    return current_app.extensions["chatapi"].metrics.exposition()
