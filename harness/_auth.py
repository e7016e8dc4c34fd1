"""JWT tokens for the handshake: minting (for tools and tests) and strict verification."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Final
from urllib.parse import parse_qs, urlsplit

import jwt

__all__ = ["AuthError", "mint_token", "token_from_request", "verify_token"]

ALGORITHM: Final = "HS256"


class AuthError(Exception):
    """The handshake carries no valid token (missing, malformed, badly signed, expired)."""


def mint_token(secret: str, user_id: str, ttl_s: float = 3600.0, now: float | None = None) -> str:
    """A token for ``user_id`` signed HS256 with ``secret``, valid for ``ttl_s`` seconds."""
    if not user_id:
        raise ValueError("user_id must be a non-empty string")
    issued = time.time() if now is None else now
    claims = {"sub": user_id, "iat": int(issued), "exp": int(issued + ttl_s)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str) -> str:
    """Checks a token and returns its user id (claim ``sub``).

    Only HS256 is accepted (never ``none``); ``exp`` and ``sub`` are required.

    Raises:
        AuthError: with the reason the token was refused.
    """
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM],
            options={"require": ["exp", "sub"], "verify_aud": False, "verify_iat": False},
        )
    except jwt.PyJWTError as exc:
        raise AuthError(str(exc)) from None
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise AuthError("claim 'exp' must be a number")
    user_id = claims.get("sub")
    if not isinstance(user_id, str) or not user_id:
        raise AuthError("claim 'sub' must be a non-empty string")
    return user_id


def token_from_request(target: str, headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The token of a handshake: ``Authorization: Bearer`` wins over ``?token=``.

    An ``Authorization`` header of another scheme is ignored (the query may still carry
    the token).

    Raises:
        AuthError: neither carries a token.
    """
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    tokens = parse_qs(urlsplit(target).query).get("token")
    if tokens and tokens[0]:
        return tokens[0]
    raise AuthError("no token: send 'Authorization: Bearer <jwt>' or '?token=<jwt>'")
