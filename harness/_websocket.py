"""The server's side of one WebSocket after the upgrade, sans-IO.

What a client sends is parsed by wsproto (masking, fragmentation, UTF-8, control frames and
every RFC 6455 rule); its violations become a close with 1002, invalid UTF-8 one with 1007,
and a message over ``max_message_bytes`` (counted once, in UTF-8 bytes, across fragments)
one with 1009. What the server sends is unmasked, so a text frame is a two-to-ten-byte
header and the event's bytes as they are: :func:`text_frame_header` builds it directly, and
the same event bytes serve every socket; control frames (ping, pong, close) go through wsproto.
"""

from __future__ import annotations

import struct
from typing import Final, final

import attrs
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

__all__ = [
    "CLOSE_NORMAL",
    "CLOSE_TOO_BIG",
    "Closed",
    "Message",
    "ServerWebSocket",
    "text_frame_header",
]

CLOSE_NORMAL: Final = 1000
CLOSE_TOO_BIG: Final = 1009
_FIN_TEXT: Final = 0x81


#: States in which the client's bytes are read: open, and after our close frame (for the
#: client's reply, which completes the close handshake; its messages are then ignored).
_READING: Final = (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING)


def text_frame_header(size: int) -> bytes:
    """The header of an unmasked, final text frame carrying ``size`` payload bytes."""
    if size < 126:
        return bytes((_FIN_TEXT, size))
    if size < 1 << 16:
        return struct.pack("!BBH", _FIN_TEXT, 126, size)
    return struct.pack("!BBQ", _FIN_TEXT, 127, size)


@final
@attrs.frozen
class Message:
    """A whole client message: text, or ``None`` for a binary message (never read)."""

    text: str | None


@final
@attrs.frozen
class Closed:
    """The WebSocket is closing: the peer sent a close frame (``by_peer``) or broke a rule."""

    code: int
    reason: str
    by_peer: bool


Inbound = Message | Closed


@final
class ServerWebSocket:
    """One accepted WebSocket: bytes in, messages and bytes to send out.

    Args:
        max_message_bytes: The largest client message, in UTF-8 bytes once reassembled.
    """

    __slots__ = ("_binary", "_ended", "_parts", "_size", "_ws", "max_message_bytes", "pongs")

    def __init__(self, max_message_bytes: int) -> None:
        self._ws = Connection(ConnectionType.SERVER)
        self.max_message_bytes = max_message_bytes
        self._parts: list[str] = []
        self._size = 0
        self._binary = False
        self._ended = False  # a Closed was returned: nothing more is read
        #: Pong payloads received (the keepalive's answer).
        self.pongs = 0

    @property
    def open(self) -> bool:
        """Whether messages may still be sent: no close frame sent yet.

        After the peer's close frame the answers to what it sent before are still sent,
        then the close reply (RFC 6455 lets an endpoint finish sending first).
        """
        return self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)

    def receive(self, data: bytes) -> tuple[list[Inbound], bytes]:
        """Feeds bytes from the client.

        Nothing is read after a :class:`Closed` (a close frame, or a broken rule after
        which the rest of the bytes cannot be trusted). The close frame to send is the
        caller's to write, once it has answered the messages that came before.

        Returns:
            What the client sent (whole messages, then at most one :class:`Closed`), and
            the bytes to write back now (pongs).
        """
        if self._ended or self._ws.state not in _READING:
            return [], b""
        self._ws.receive_data(data)
        out: list[Inbound] = []
        reply = bytearray()
        for event in self._ws.events():
            closed = self._event(event, out, reply)
            if closed is not None:
                out.append(closed)
                self._ended = True
                break
        return out, bytes(reply)

    def _event(self, event: object, out: list[Inbound], reply: bytearray) -> Closed | None:
        if isinstance(event, TextMessage | BytesMessage):
            return self._fragment(event, out)
        if isinstance(event, Ping):
            reply += self._send(event.response())
        elif isinstance(event, Pong):
            self.pongs += 1
        elif isinstance(event, CloseConnection):  # pragma: no branch - wsproto has no other event
            by_peer = self._ws.state in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED)
            return Closed(event.code, event.reason or "", by_peer)
        return None

    def _fragment(self, event: TextMessage | BytesMessage, out: list[Inbound]) -> Closed | None:
        if isinstance(event, TextMessage):
            chunk = event.data
            self._size += len(chunk) if chunk.isascii() else len(chunk.encode())
            self._parts.append(chunk)
        else:
            self._binary = True
            self._size += len(event.data)
        if self._size > self.max_message_bytes:
            limit = self.max_message_bytes
            return Closed(CLOSE_TOO_BIG, f"message over max_message_bytes ({limit})", False)
        if event.message_finished:
            out.append(Message(None if self._binary else "".join(self._parts)))
            self._parts, self._size, self._binary = [], 0, False
        return None

    def close(self, code: int, reason: str = "") -> bytes:
        """The close frame to send (empty when one was already sent).

        After the peer's close frame this is the reply; its code is echoed (a code that
        may not be sent, like 1005, becomes 1000, as wsproto does).
        """
        if self._ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return b""
        return self._send(CloseConnection(code=code, reason=reason[:100] or None))

    def ping(self, payload: bytes = b"") -> bytes:
        """A ping frame (empty when the connection is closing)."""
        return self._send(Ping(payload)) if self.open else b""

    @property
    def close_sent(self) -> bool:
        return self._ws.state in (ConnectionState.LOCAL_CLOSING, ConnectionState.CLOSED)

    @property
    def closed(self) -> bool:
        """Both close frames have been exchanged."""
        return self._ws.state is ConnectionState.CLOSED

    def _send(self, event: Ping | Pong | CloseConnection) -> bytes:
        try:
            return self._ws.send(event)
        except LocalProtocolError:  # closing: no pong or ping is owed any more
            return b""
