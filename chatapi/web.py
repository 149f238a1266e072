"""Serves the web page in `web/`: `/` is index.html, `/static/...` the rest.

The page is plain files with no build step. Its Content-Security-Policy
allows scripts only from this origin, so even a bug that put message text
into markup could not run it.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)

bp = Blueprint("web", __name__)


def _static(filename: str) -> Response:
    response = send_from_directory(WEB_ROOT, filename, max_age=0)
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.get("/")
def index() -> Response:
    # The page is a read like any other (docs/api.md: reads carry no-store); its
    # assets are revalidated (no-cache), so a new release shows at once.
    response = _static("index.html")
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/static/<path:filename>")
def asset(filename: str) -> Response:
    return _static(filename)
