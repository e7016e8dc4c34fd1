"""Sending several text frames of one socket in a single write.

trio-websocket sends each message with its own ``send_all`` (one syscall per event). When a
socket's queue holds several frames, :func:`send_frames` frames them all with the
connection's wsproto state and writes them at once, under the connection's send lock, with
trio-websocket's own failure handling. It relies on trio-websocket internals (pinned in
pyproject); if they are missing it falls back to one ``send_message`` per frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import TextMessage

__all__ = ["send_frames"]

_INTERNALS = ("_wsproto", "_stream", "_stream_lock", "_close_reason", "_abort_web_socket")


async def send_frames(ws: WebSocketConnection, frames: Sequence[str]) -> None:
    """Sends ``frames`` as text messages, in order, with as few writes as possible.

    Raises:
        ConnectionClosed: the connection is closed or breaks while writing.
    """
    if len(frames) == 1 or not all(hasattr(ws, name) for name in _INTERNALS):
        for frame in frames:
            await ws.send_message(frame)
        return
    conn: Any = ws
    if conn._close_reason:
        raise ConnectionClosed(conn._close_reason)
    data = b"".join(conn._wsproto.send(TextMessage(data=frame)) for frame in frames)
    async with conn._stream_lock:
        try:
            await conn._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await conn._abort_web_socket()
            raise ConnectionClosed(conn._close_reason) from None
