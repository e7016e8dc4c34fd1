"""Just enough Engine.IO v4 / Socket.IO v5 framing (over a WebSocket) for the load generator.

Sans-IO: text frames in, decoded packets out, and back. The trio load generator talks to the
python-socketio peer through this, so it needs no asyncio Socket.IO client.

A WebSocket-only Engine.IO session carries one packet per text frame; the first character is the
Engine.IO type (``0`` open, ``2`` ping, ``3`` pong, ``4`` message) and a message's payload is a
Socket.IO packet whose first character is its type (``0`` connect, ``2`` event, ``3`` ack,
``4`` connect error), then an optional ack id, then JSON.
"""

from __future__ import annotations

import json
from typing import Any, Final

import attrs

PONG: Final = "3"
CONNECT: Final = "40"


@attrs.frozen
class Packet:
    """A decoded frame.

    Attributes:
        kind: ``open``, ``ping``, ``connect``, ``connect_error``, ``event``, ``ack`` or ``other``.
        name: The event name (``event`` only).
        data: The event's argument, the ack's first argument, or the open/connect payload.
        ack_id: The ack id of an ``ack`` (or of an ``event`` asking for one).
    """

    kind: str
    name: str | None = None
    data: Any = None
    ack_id: int | None = None


def encode_event(name: str, data: Any, ack_id: int | None = None) -> str:
    """Return the frame for emitting event ``name`` with one argument, maybe asking an ack."""
    ident = "" if ack_id is None else str(ack_id)
    return f"42{ident}{json.dumps([name, data])}"


def _split_ack_id(body: str) -> tuple[int | None, str]:
    """Split a leading decimal ack id from a Socket.IO packet body."""
    digits = len(body) - len(body.lstrip("0123456789"))
    return (int(body[:digits]) if digits else None), body[digits:]


def decode(text: str) -> Packet:
    """Decode one text frame of a WebSocket Engine.IO session."""
    if text == "2":
        return Packet("ping")
    if text.startswith("0"):
        return Packet("open", data=json.loads(text[1:]))
    if not text.startswith("4") or len(text) < 2:
        return Packet("other", data=text)
    sio_type, body = text[1], text[2:]
    if sio_type == "0":
        return Packet("connect", data=json.loads(body) if body else None)
    if sio_type == "4":
        return Packet("connect_error", data=json.loads(body) if body else None)
    ack_id, payload = _split_ack_id(body)
    args = json.loads(payload) if payload else []
    if sio_type == "2" and args:
        return Packet(
            "event", name=str(args[0]), data=args[1] if len(args) > 1 else None, ack_id=ack_id
        )
    if sio_type == "3":
        return Packet("ack", data=args[0] if args else None, ack_id=ack_id)
    return Packet("other", data=text)
