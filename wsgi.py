"""The WSGI entry point: `gunicorn -c gunicorn.conf.py wsgi:app`."""

from gunicorn.errors import AppImportError

from chatapi import create_app
from chatapi.config import ConfigError

try:
    app = create_app()
except ConfigError as refused:
    # A setting chatapi cannot use: gunicorn prints this one line and stops
    # ("App failed to load"), where any other exception is a traceback.
    raise AppImportError(str(refused)) from None
