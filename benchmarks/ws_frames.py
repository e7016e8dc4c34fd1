"""Sans-IO client side of RFC 6455 for the lean load generator: handshake, frames, masking.

Only what a benchmark client needs, and cheap: the opening handshake (request bytes, the
``101`` answer checked against ``Sec-WebSocket-Accept``), unmasked server frames decoded into
whole messages (fragments joined, control frames passed through) and masked client frames.
No extension is offered, so no frame may carry RSV bits. No sockets, no clock, no tasks.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import Final, final

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HEAD_END: Final = b"\r\n\r\n"
_MAX_HEAD: Final = 64 * 1024


class FrameError(ValueError):
    """The server broke RFC 6455 (a masked frame, RSV bits, a bad fragment sequence...)."""


class HandshakeRefused(ValueError):
    """The server answered the opening handshake with something else than a valid ``101``."""


def new_key() -> bytes:
    """Return a fresh ``Sec-WebSocket-Key`` (16 random bytes, base64)."""
    return base64.b64encode(os.urandom(16))


def handshake_request(netloc: str, resource: str, key: bytes) -> bytes:
    """Return the HTTP/1.1 upgrade request for ``resource`` (path and query) on ``netloc``."""
    return (
        f"GET {resource} HTTP/1.1\r\nHost: {netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def accept_value(key: bytes) -> bytes:
    """Return the ``Sec-WebSocket-Accept`` a server must answer to ``key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def read_handshake(buffer: bytes, key: bytes) -> tuple[bool, bytes]:
    """Look for the whole answer head in ``buffer``.

    Returns ``(False, b"")`` while the head is incomplete, then ``(True, rest)`` with the bytes
    after the head (the first frames may come in the same read).

    Raises:
        HandshakeRefused: the status is not 101 or the accept value is wrong; the message has
            the status line.
    """
    end = buffer.find(_HEAD_END)
    if end < 0:
        if len(buffer) > _MAX_HEAD:
            raise HandshakeRefused("answer head too long")
        return False, b""
    lines = buffer[:end].decode("latin-1").split("\r\n")
    headers = dict(
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(":") for line in lines[1:])
    )
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        raise HandshakeRefused(lines[0])
    if headers.get("sec-websocket-accept", "").encode() != accept_value(key):
        raise HandshakeRefused(f"{lines[0]}: wrong Sec-WebSocket-Accept")
    return True, bytes(buffer[end + len(_HEAD_END) :])


def _masked(payload: bytes, key: bytes) -> bytes:
    """Return ``payload`` XOR-ed with the 4-byte ``key`` repeated (one big-int XOR)."""
    size = len(payload)
    if not size:
        return b""
    stream = (key * (size // 4 + 1))[:size]
    mixed = int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")
    return mixed.to_bytes(size, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """Return one final, masked client frame (a whole message or a control frame)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    key = os.urandom(4)
    return head + key + _masked(payload, key)


def close_frame(code: int = 1000) -> bytes:
    """Return a masked close frame with ``code``."""
    return client_frame(OP_CLOSE, struct.pack("!H", code))


@final
class FrameDecoder:
    """Turns the server's bytes into ``(opcode, payload)``: whole messages and control frames.

    Text and binary messages split in fragments come out joined, with their first opcode.
    """

    __slots__ = ("_buffer", "_opcode", "_parts")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._parts: list[bytes] = []
        self._opcode: int | None = None

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add received bytes; return every message and control frame now complete.

        Raises:
            FrameError: on a protocol violation by the server.
        """
        buffer = self._buffer
        buffer += data
        out: list[tuple[int, bytes]] = []
        at, size = 0, len(buffer)
        while size - at >= 2:
            first, second = buffer[at], buffer[at + 1]
            if second & 0x80 or first & 0x70:
                raise FrameError("masked frame or RSV bits from the server")
            length, start = second & 0x7F, at + 2
            if length == 126:
                if size - start < 2:
                    break
                (length,) = struct.unpack_from("!H", buffer, start)
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                (length,) = struct.unpack_from("!Q", buffer, start)
                start += 8
            if size - start < length:
                break
            at = start + length
            self._frame(first & 0x80, first & 0x0F, bytes(buffer[start:at]), out)
        del buffer[:at]
        return out

    def _frame(self, fin: int, opcode: int, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        """Place one frame: a control frame goes out at once, data frames are joined."""
        if opcode >= OP_CLOSE:
            if not fin or len(payload) > 125:
                raise FrameError("fragmented or oversized control frame")
            out.append((opcode, payload))
        elif opcode == OP_CONTINUATION:
            if self._opcode is None:
                raise FrameError("continuation without a message")
            self._parts.append(payload)
            if fin:
                out.append((self._opcode, b"".join(self._parts)))
                self._parts, self._opcode = [], None
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._opcode is not None:
                raise FrameError("new message inside a fragmented one")
            if fin:
                out.append((opcode, payload))
            else:
                self._parts, self._opcode = [payload], opcode
        else:
            raise FrameError(f"reserved opcode {opcode}")
