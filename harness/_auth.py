"""JWT tokens for the handshake: minting (for tools and tests) and strict verification.

The reason a token is refused is logged by the server, never told to the client: a 401
carries one fixed text whatever the reason, so that it cannot be used as an oracle.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Final

import attrs
import jwt

from registry._config import normalise_origin

__all__ = ["AuthError", "Identity", "mint_token", "origin_allowed", "token_from_request",
           "verify_token"]

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


@attrs.frozen
class Identity:
    """Who a valid token names (``sub``) and until when it is valid (``exp``, Unix seconds)."""

    user_id: str
    exp: float


def verify_token(secret: str, token: str) -> Identity:
    """Checks a token and returns the user it names and its expiry.

    Only HS256 is accepted (never ``none``); ``exp`` and ``sub`` are required.

    Raises:
        AuthError: with the reason the token was refused (for logs, not for the client).
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
    return Identity(user_id, float(exp))


def token_from_request(headers: Mapping[str, str], query: Mapping[str, str]) -> str:
    """The token of a request: ``Authorization: Bearer`` wins over ``?token=``.

    An ``Authorization`` header of another scheme is ignored (the query may still carry
    the token). ``headers`` has lower-case names.

    Raises:
        AuthError: neither carries a token.
    """
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    token = query.get("token")
    if token:
        return token
    raise AuthError("no token: send 'Authorization: Bearer <jwt>' or '?token=<jwt>'")


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a handshake's ``Origin`` may connect: always when none is configured or sent.

    ``allowed`` holds normalised origins (``Config.allowed_origins``): lower-case scheme and
    host, no default port. ``origin`` is normalised the same way before comparing.
    """
    if not allowed or origin is None:
        return True
    try:
        return normalise_origin(origin.strip()) in allowed
    except ValueError:  # not even an origin ("null", a path, ...)
        return False
