"""HTTP on the WebSocket port, sans-IO, with h11: the request head in, responses out.

Every connection starts as HTTP. :class:`RequestReader` reads one request head; the server
then either answers it (health, metrics, the dashboard, a refused handshake) and closes, or
accepts the WebSocket upgrade: :func:`accept_websocket` builds the 101 answer and hands back
the bytes the client sent right behind its request, which are already WebSocket frames.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, final
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
from wsproto.utilities import generate_accept_token

__all__ = [
    "REFUSALS",
    "HttpError",
    "Request",
    "RequestReader",
    "accept_websocket",
    "response",
]

#: The largest request head accepted (request line plus headers).
MAX_HEAD_BYTES: Final = 16384

#: The one fixed text of each refusal both servers send: no reason, no count, nothing a
#: client could learn from (which token check failed, how many sockets the user has).
REFUSALS: Final[Mapping[int, bytes]] = {
    400: b"bad request\n",
    401: b"unauthorized\n",
    403: b"forbidden\n",
    404: b"not found\n",
    405: b"method not allowed\n",
    426: b"upgrade required: this endpoint speaks WebSocket\n",
    429: b"too many connections\n",
    431: b"request head too large\n",
    503: b"the server is not taking connections\n",
}


class HttpError(Exception):
    """The client sent something that is not an HTTP/1.1 request head we can answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@final
@attrs.frozen
class Request:
    """One request head.

    Attributes:
        method: ``GET``, ``POST``, ... (upper case).
        path: The target's path (``/ws``); None when the target is not a URL.
        query: The target's query parameters (first value of each).
        headers: Header names lower-cased, values as sent (latin-1).
    """

    method: str
    path: str | None
    query: dict[str, str]
    headers: dict[str, str]

    @property
    def wants_websocket(self) -> bool:
        upgrade = self.headers.get("upgrade", "").lower()
        connection = self.headers.get("connection", "").lower()
        return upgrade == "websocket" and "upgrade" in connection

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@final
class RequestReader:
    """Feeds bytes until a whole request head has arrived (h11 does the parsing)."""

    def __init__(self) -> None:
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)

    def feed(self, data: bytes) -> Request | None:
        """Adds bytes from the client; returns the request once its head is complete.

        Raises:
            HttpError: the bytes are not a valid request head (400, 431, ...).
        """
        self.h11.receive_data(data)
        try:
            event = self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpError(exc.error_status_hint, str(exc)) from None
        if event is h11.NEED_DATA:
            return None
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 yields a Request first
            raise HttpError(400, "expected a request")
        return _request(event)

    def respond(self, status: int, body: bytes, content_type: str,
                extra: list[tuple[str, str]] | None = None) -> bytes:
        """The bytes of a complete response that ends the connection."""
        return response(self.h11, status, body, content_type, extra)


def _request(event: h11.Request) -> Request:
    target = event.target.decode("latin-1")
    try:
        parts = urlsplit(target)
        path: str | None = parts.path
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    except ValueError:
        path, query = None, {}
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1")
        if key not in headers:  # the first of a repeated header wins
            headers[key] = value.decode("latin-1")
    return Request(event.method.decode("latin-1").upper(), path, query, headers)


def response(
    conn: h11.Connection, status: int, body: bytes, content_type: str,
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    """A whole response on ``conn`` (``Connection: close``; the server closes after it)."""
    headers = [("content-type", content_type), ("content-length", str(len(body))),
               ("connection", "close"), ("cache-control", "no-store"), *(extra or [])]
    try:
        head = conn.send(h11.Response(status_code=status, headers=headers))
        data = conn.send(h11.Data(data=body)) if body else b""
        end = conn.send(h11.EndOfMessage())
    except h11.LocalProtocolError:  # the request was not complete: answer plainly
        return _plain(status, body, headers)
    return (head or b"") + (data or b"") + (end or b"")


def _plain(status: int, body: bytes, headers: list[tuple[str, str]]) -> bytes:
    reason = _REASONS.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


_REASONS: Final = {400: "Bad Request", 404: "Not Found", 408: "Request Timeout",
                   431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def accept_websocket(reader: RequestReader, request: Request) -> tuple[bytes, bytes]:
    """Accepts the WebSocket upgrade of ``request``.

    Returns:
        The 101 response to send, and the bytes received after the request head (the
        client's first frames, if it did not wait for the 101).

    Raises:
        HttpError: 400 when the request lacks a valid ``Sec-WebSocket-Key`` or version 13.
    """
    key = request.header("sec-websocket-key")
    if not key or request.header("sec-websocket-version") != "13":
        raise HttpError(400, "a WebSocket upgrade needs Sec-WebSocket-Key and version 13")
    accept = generate_accept_token(key.strip().encode("latin-1")).decode("ascii")
    headers = [("upgrade", "websocket"), ("connection", "Upgrade"),
               ("sec-websocket-accept", accept)]
    head = reader.h11.send(h11.InformationalResponse(status_code=101, headers=headers))
    trailing, _ = reader.h11.trailing_data
    return head or b"", bytes(trailing)
