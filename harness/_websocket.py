"""The server's side of one WebSocket after the upgrade, sans-IO.

What a client sends is parsed by wsproto (masking, fragmentation, UTF-8, control frames and
every RFC 6455 rule); its violations become a close with 1002, invalid UTF-8 one with 1007,
and a message over ``max_message_bytes`` (counted once, in UTF-8 bytes, across fragments)
one with 1009. The frames nearly every client sends — a whole masked text frame of valid
UTF-8, a ping, a pong, each with a minimal length — are read here directly once they are
complete, which costs a fifth of wsproto's per-frame work (a flood of small frames is what
makes a server busy); any other frame, from its first byte to its last, goes to wsproto,
which therefore never holds part of a frame when a simple one comes next.

What the server sends is unmasked, so a text frame is a two-to-ten-byte header and the
event's bytes as they are: :func:`text_frame_header` builds it directly, and
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
_FIN_PING: Final = 0x89
_FIN_PONG: Final = 0x8A
_MASKED: Final = 0x80
_FIN: Final = 0x80
_OPCODE: Final = 0x0F
_CONTINUATION: Final = 0x0
_MAX_CONTROL: Final = 125


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

    __slots__ = (
        "_binary", "_buffer", "_ended", "_fragmented", "_given", "_needed", "_owed", "_parts",
        "_size", "_ws", "max_message_bytes", "pongs",
    )

    def __init__(self, max_message_bytes: int) -> None:
        self._ws = Connection(ConnectionType.SERVER)
        self.max_message_bytes = max_message_bytes
        self._parts: list[str] = []
        self._size = 0
        self._binary = False
        self._ended = False  # a Closed was returned: nothing more is read
        self._buffer = bytearray()  # the start of a frame not yet whole (read here)
        self._needed = 0  # the bytes the buffer must hold before it is worth reading again
        self._owed = 0  # bytes of the frame wsproto is reading that it has not had yet
        self._given = 0  # bytes at the buffer's start that wsproto already has (a header's)
        self._fragmented = False  # wsproto holds a message's first fragments
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
        if self._buffer:
            self._buffer += data
            if len(self._buffer) < self._needed:
                return [], b""
            data = bytes(self._buffer)
        out: list[Inbound] = []
        reply = bytearray()
        at, end = 0, len(data)
        while at < end and not self._ended:
            if self._owed:
                upto = at + min(self._owed, end - at)
                self._owed -= upto - at
                self._by_wsproto(data[at:upto], out, reply)
                at = upto
                continue
            frame = self._frame(data, at, end)
            if frame is None:  # the header is not whole yet
                self._needed = 0
                if end - at >= 2 and not self._simple(data[at], data[at + 1]):
                    # wsproto judges a frame by its first two bytes: it has them at once
                    self._by_wsproto(data[at + self._given:end], out, reply)
                    self._given = end - at
                break
            start, size, mask = frame
            if mask is None or not self._simple(data[at], data[at + 1], size):
                at += self._route(data[at], start - at + size)
                continue
            if start + size > end:  # a simple frame, not whole yet
                self._needed = start + size - at
                break
            if not self._read_simple(data[at], _unmask(data[start:start + size], mask),
                                     out, reply):
                at += self._route(data[at], start - at + size)  # invalid UTF-8: 1007
                continue
            at = start + size
        if at < end and not self._ended:
            self._buffer = bytearray(data[at:])
        elif self._buffer:
            self._buffer = bytearray()
        return out, bytes(reply)

    @staticmethod
    def _frame(data: bytes, at: int, end: int) -> tuple[int, int, bytes | None] | None:
        """A frame's payload start, size and mask (``None`` when unmasked or its length is
        not minimal: only wsproto reads such a frame), or ``None`` until the header is whole."""
        if end - at < 2:
            return None
        size = data[at + 1] & 0x7F
        start = at + 2
        minimal = True
        if size == 126:
            if end - start < 2:
                return None
            size = int.from_bytes(data[start:start + 2])
            start += 2
            minimal = size >= 126
        elif size == 127:
            if end - start < 8:
                return None
            size = int.from_bytes(data[start:start + 8])
            start += 8
            minimal = 1 << 16 <= size < 1 << 63
        if not data[at + 1] & _MASKED:
            return start, size, None
        if end - start < 4:
            return None
        mask = data[start:start + 4] if minimal else None
        return start + 4, size, mask

    def _simple(self, first: int, second: int, size: int | None = None) -> bool:
        """Whether a frame is read here: a whole masked text message, a ping or a pong, while
        open. Without its ``size`` (the header is not whole yet): whether it may be."""
        if self._ws.state is not ConnectionState.OPEN or not second & _MASKED:
            return False
        if first == _FIN_TEXT:
            return not self._fragmented and (size is None or size <= self.max_message_bytes)
        return first in (_FIN_PING, _FIN_PONG) and second & 0x7F <= _MAX_CONTROL

    def _read_simple(self, first: int, payload: bytes, out: list[Inbound],
                     reply: bytearray) -> bool:
        """Takes a simple frame in; ``False`` for a text frame that is not valid UTF-8."""
        if first == _FIN_TEXT:
            try:
                out.append(Message(payload.decode()))
            except UnicodeDecodeError:
                return False
        elif first == _FIN_PING:
            reply += bytes((_FIN_PONG, len(payload))) + payload
        else:
            self.pongs += 1
        return True

    def _route(self, first: int, length: int) -> int:
        """The frame starting with byte ``first``, ``length`` bytes long, is wsproto's.

        Returns:
            How many of its bytes wsproto already has (the start of its header).
        """
        given, self._given = self._given, 0
        self._owed = length - given
        opcode = first & _OPCODE
        if opcode != _CONTINUATION and opcode < 8 and not first & _FIN:
            self._fragmented = True
        elif opcode == _CONTINUATION and first & _FIN:
            self._fragmented = False
        return given

    def _by_wsproto(self, data: bytes, out: list[Inbound], reply: bytearray) -> None:
        self._ws.receive_data(data)
        for event in self._ws.events():
            closed = self._event(event, out, reply)
            if closed is not None:
                out.append(closed)
                self._ended = True
                break

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


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """A client frame's payload XORed with its four-byte mask, as one big-integer XOR."""
    size = len(payload)
    key = (mask * ((size >> 2) + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little")
