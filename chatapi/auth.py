"""Passwords and bearer tokens.

Passwords are hashed with argon2id (argon2-cffi). Hashing is deliberately
slow, so it runs in gevent's thread pool: the argon2 C code releases the GIL,
and the worker's other requests keep flowing meanwhile.

Tokens are 32 random bytes; only their SHA-256 is stored, so a leaked
database does not leak sessions. SHA-256 (not argon2) is right here: the
token has full entropy, and it is checked on every request.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

TOKEN_BYTES = 32

T = TypeVar("T")

_hasher = PasswordHasher()
# Verified against when the username does not exist, so a wrong username
# takes as long as a wrong password and does not reveal who has an account.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


def _in_thread(function: Callable[..., T], *args: Any) -> T:
    return gevent.get_hub().threadpool.apply(function, args)


def hash_password(password: str) -> str:
    return _in_thread(_hasher.hash, password)


def _verify(password_hash: str, password: str) -> bool:
    # Caught here, in the pool thread: gevent's thread pool logs a traceback
    # for every exception that leaves it, i.e. for every failed sign-in.
    # argon2 hashes UTF-8: a password with a lone surrogate cannot be encoded,
    # and cannot be anyone's (sign-up refuses it), so it is simply wrong.
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError, UnicodeEncodeError):
        return False


def verify_password(password_hash: str | None, password: str) -> bool:
    return _in_thread(_verify, password_hash or _DUMMY_HASH, password) and password_hash is not None


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
