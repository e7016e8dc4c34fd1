"""A workaround for one trio-websocket bug, applied by the server, the client and the loadgen.

trio-websocket answers a ping even after its side started closing; wsproto refuses to send
a pong in that state (``LocalProtocolError``) and the error escapes the connection's reader
task: a client pinged while closing crashes, and with a shared nursery every connection
goes with it. A pong is pointless once we are closing, so that one case is ignored.
"""

from __future__ import annotations

import contextlib
from typing import Any

from trio_websocket import WebSocketConnection
from wsproto.utilities import LocalProtocolError

__all__ = ["tolerate_pings_while_closing"]


def tolerate_pings_while_closing() -> None:
    """Patches ``WebSocketConnection`` once per process (idempotent)."""
    original: Any = WebSocketConnection._handle_ping_event
    if getattr(original, "tolerates_closing", False):
        return

    async def handle_ping(self: WebSocketConnection, event: Any) -> None:
        with contextlib.suppress(LocalProtocolError):  # we are closing: no pong is owed
            await original(self, event)

    handle_ping.tolerates_closing = True  # type: ignore[attr-defined]
    WebSocketConnection._handle_ping_event = handle_ping  # type: ignore[method-assign]
