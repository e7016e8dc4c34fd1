"""uvicorn, set up to serve PROTOCOL.md: its settings, two protocol subclasses and the signals.

uvicorn's own WebSocket and HTTP layers (wsproto and h11, the libraries the trio server uses)
do most of what PROTOCOL.md asks: keepalive pings closing with 1011 (``ws_ping_interval``,
``ws_ping_timeout``), 1009 over ``max_message_bytes`` counted in UTF-8 bytes, denial
responses before the upgrade. What they do not do, two small subclasses add, each behind
uvicorn's documented ``http=`` and ``ws=`` protocol-class settings:

* :class:`HandshakeProtocol` (h11) bounds the HTTP phase: a connection not upgraded within
  ``handshake_timeout_s`` is closed, one beyond ``max_pending_handshakes`` is closed at
  once, near the descriptor limit the longest-waiting handshake is ended so that a new
  client gets in, the bytes a client sends right behind its upgrade request reach the
  WebSocket, and an upgrade request that is not a GET is an HTTP request (405 on ``/ws``).
* :class:`WebSocketProtocol` (wsproto) answers a frame it cannot parse with a close frame
  (1007 for bad UTF-8, 1002 for other RFC 6455 violations) instead of dropping TCP, tells
  the application the close code of a keepalive timeout (1011) or a lost connection (1006)
  at once, answers the peer's close frame only after the answers to the messages that came
  before it, keeps what a client sends before its 101 for after it, and drops TCP
  ``close_timeout_s`` after the application is done with a socket (at once when the
  application gave a socket up without closing it, which only happens to a socket that
  stopped reading).

:class:`DrainingServer` takes SIGINT and SIGTERM itself: uvicorn's own handling closes every
WebSocket with 1012 before the application's lifespan is told to shut down, so runs could not
deliver their terminal events. Here the chat service drains first (runs end ``cancelled``,
delivered; sockets close with 1001), then uvicorn exits.

These subclasses use attributes of uvicorn's ``H11Protocol`` and ``WSProtocol``; the
dependency is pinned to the uvicorn minor version they are tested with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import resource
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, ClassVar, Final

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
from wsproto import events
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from harness._asgi import service_of_app
from harness._http import MAX_HEAD_BYTES
from harness._websocket import text_frame_header
from registry import CLOSE_OVERFLOW, Config

__all__ = ["ACCEPTS_PER_PASS", "DrainingServer", "HandshakeProtocol", "WebSocketProtocol",
           "listening_socket", "uvicorn_config"]

log = logging.getLogger("harness.fastapi")

SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
#: What uvicorn's own shutdown takes after the drain (its polling, its pause, the lifespan).
_UVICORN_SHUTDOWN_S: Final = 0.4
#: Descriptors kept for what is not a connection (listener, event loop, stdio, logs).
_SPARE_DESCRIPTORS: Final = 32
#: Connections accepted per pass of the accept loop (asyncio takes uvicorn's ``backlog``).
ACCEPTS_PER_PASS: Final = 64
CLOSE_ABNORMAL: Final = 1006
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011


class _Handshakes:
    """The connections of one server still in their HTTP phase (oldest first), its bounds."""

    def __init__(self, limit: int, timeout_s: float) -> None:
        self.limit = limit
        self.timeout_s = timeout_s
        self.pending: dict[HandshakeProtocol, None] = {}
        #: Open connections beyond which the oldest handshake gives its descriptor up: the
        #: limit, less the spare ones, one pass of accepts and the evicted still closing.
        self.descriptors = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - _SPARE_DESCRIPTORS
                            - 2 * ACCEPTS_PER_PASS)

    def evict_oldest(self) -> None:
        """Near the descriptor limit: ends the longest-waiting handshake so a client gets in.

        (The trio server does this when an accept fails; asyncio, then, stops accepting for
        a second, so here it is done before that can happen.)
        """
        if self.pending:
            oldest = next(iter(self.pending))
            oldest.transport.abort()
            oldest.done()


class HandshakeProtocol(H11Protocol):
    """uvicorn's h11 protocol with the handshake bounds of PROTOCOL.md (see the module)."""

    handshakes: ClassVar[_Handshakes]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.handshakes.descriptors:
            self.handshakes.evict_oldest()
        if len(self.handshakes.pending) >= self.handshakes.limit:
            transport.close()  # at max_pending_handshakes: closed at once
            return
        self.handshakes.pending[self] = None
        self._deadline = self.loop.call_later(self.handshakes.timeout_s, self._too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self.done()
        super().connection_lost(exc)

    def _should_upgrade(self) -> bool:
        # A WebSocket handshake is a GET; another method is an HTTP request (405 on /ws).
        return self.scope["method"] == "GET" and super()._should_upgrade()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self.done()
        trailing = bytes(self.conn.trailing_data[0])  # the client's first frames, if any
        super().handle_websocket_upgrade(event)
        if trailing:
            self.transport.get_protocol().data_received(trailing)  # type: ignore[attr-defined]

    def done(self) -> None:
        """The HTTP phase is over (upgraded, closed or evicted)."""
        if self in self.handshakes.pending:
            del self.handshakes.pending[self]
            self._deadline.cancel()

    def _too_slow(self) -> None:
        """``handshake_timeout_s`` after the connection opened, still HTTP: it is closed."""
        self.done()
        self.transport.close()


class WebSocketProtocol(WSProtocol):
    """uvicorn's wsproto protocol with the close rules of PROTOCOL.md (see the module)."""

    close_timeout_s: ClassVar[float]
    max_queued_bytes: ClassVar[int] = 8 * 1024 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_timeout = self.close_timeout_s
        #: Bytes received after the request, before the application answered it.
        self._early: list[bytes] | None = None
        #: The peer's close frame, until the application answers it.
        self._peer_close: CloseConnection | None = None
        self._app_done = False

    # ------------------------------------------------------------ before the 101
    def handle_connect(self, event: events.Request) -> None:
        super().handle_connect(event)
        self._early = []

    def data_received(self, data: bytes) -> None:
        if self._early is None:
            super().data_received(data)
            return
        self._early.append(data)  # frames sent right behind the upgrade request
        self.transport.pause_reading()  # no more until the application has answered

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.send" and self._answering(message):
            await self.writable.wait()
            if self.disconnected:
                raise ClientDisconnected
            data = message["text"].encode()
            self.transport.write(text_frame_header(len(data)) + data)
            return
        if message["type"] == "websocket.close" and self.close_timer is not None:
            self.close_timer.cancel()  # uvicorn starts its own
        await super().send(message)
        if self._peer_close is not None and self.close_sent:  # the answer went out
            self._answer_peer_close()
        if self._early is not None and self.handshake_complete:
            early, self._early = b"".join(self._early), None
            if not self.transport.is_closing():
                self.transport.resume_reading()
                if early and message["type"] == "websocket.accept":
                    self.data_received(early)

    # ------------------------------------------------------------------ closing
    def handle_close(self, event: CloseConnection) -> None:
        if self.close_sent:  # the answer to our close: uvicorn ends the connection
            super().handle_close(event)
            return
        self.queue.put_nowait({"type": "websocket.disconnect", "code": event.code,
                               "reason": event.reason or ""})
        if self.conn.state is ConnectionState.REMOTE_CLOSING:
            # The peer's close: the application answers it (websocket.close) once it has
            # sent its answers to the messages that came before it.
            self._peer_close = event
            self.stop_keepalive()
            # A closing handshake under way, as uvicorn marks its own: TCP ends at the latest
            # close_timeout_s from now, and not when the application returns (run_asgi).
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)
            return
        # wsproto reports a frame it cannot parse as a close it did not receive (state
        # OPEN): 1007 for bad UTF-8, 1002 for other violations.
        self._fail(event.code, "")

    def handle_message(self, event: events.TextMessage | events.BytesMessage) -> None:
        size = len(event.data.encode()) if isinstance(event.data, str) else len(event.data)
        if self.close_sent or self.buffer.length + size <= self.buffer.max_length:
            super().handle_message(event)
            return
        limit = self.buffer.max_length
        self.queue.put_nowait({"type": "websocket.disconnect", "code": CLOSE_TOO_BIG,
                               "reason": f"message over max_message_bytes ({limit})"})
        self._fail(CLOSE_TOO_BIG, f"message over max_message_bytes ({limit})")

    def handle_ping(self, event: events.Ping) -> None:
        """Pongs count against ``max_queued_mib``: a peer that pings without reading is
        closed 4008, as the trio server does (the application hears it as a disconnect)."""
        if self.transport.get_write_buffer_size() <= self.max_queued_bytes:
            super().handle_ping(event)
            return
        reason = "outbound queue overflow; reconnect and resume"
        self.queue.put_nowait({"type": "websocket.disconnect", "code": CLOSE_OVERFLOW,
                               "reason": reason})
        self._fail(CLOSE_OVERFLOW, reason)

    def _fail(self, code: int, reason: str) -> None:
        """Closes with ``code`` for what the peer sent, reading on until its answer.

        As after any close frame of ours (and as the trio server does): TCP ends on the
        peer's close frame or EOF, or after ``close_timeout_s``, so that a peer still
        sending reads our close frame instead of meeting a reset.
        """
        self.close_sent = True
        self.transport.write(self.conn.send(CloseConnection(code=code, reason=reason)))
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def _answering(self, message: Any) -> bool:
        """Whether ``message`` answers a message that came before the peer's close frame.

        wsproto sends no data once it has read that close; the frame is built as the trio
        server builds its own (the answer is text, and goes before our close frame).
        """
        return (self._peer_close is not None and not self.close_sent
                and message.get("text") is not None)

    def _answer_peer_close(self) -> None:
        """The peer's close was answered (by the application, or here): TCP can end."""
        if self._peer_close is not None and not self.close_sent:
            self.close_sent = True
            self.transport.write(self.conn.send(self._peer_close.response()))
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self.transport.close()

    def keepalive_timeout(self) -> None:
        was_open = not self.close_sent and not self.transport.is_closing()
        super().keepalive_timeout()
        if was_open:  # uvicorn closed with 1011; the application hears of it now, not at EOF
            self.queue.put_nowait({"type": "websocket.disconnect", "code": CLOSE_INTERNAL,
                                   "reason": "keepalive ping timeout"})

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handshake_complete and not self.close_sent and self._peer_close is None:
            self.queue.put_nowait({"type": "websocket.disconnect", "code": CLOSE_ABNORMAL})
        super().connection_lost(exc)

    async def run_asgi(self) -> None:
        await super().run_asgi()
        self._app_done = True
        if self.disconnected:
            return
        if self._peer_close is not None:
            self._answer_peer_close()  # if the application did not
        if self.close_sent:  # a closing handshake is under way
            self.loop.call_later(self.close_timeout, self._drop)
        else:  # given up at its close deadline: it stopped reading
            self.transport.abort()

    def _drop(self) -> None:
        if not self.disconnected:
            self.transport.abort()

    def shutdown(self) -> None:
        if not self._app_done:
            super().shutdown()
            return
        self.stop_keepalive()
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self.transport.close()


class _Listener(socket.socket):
    """A listening socket whose kernel queue stays ``SOMAXCONN`` whatever asyncio asks.

    asyncio uses one number for the listen queue and for the accepts of one pass; this keeps
    the queue long and lets uvicorn's ``backlog`` bound the pass (:data:`ACCEPTS_PER_PASS`).
    """

    def listen(self, backlog: int = socket.SOMAXCONN) -> None:
        super().listen(socket.SOMAXCONN)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (the first address it resolves to) and listening."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = _Listener(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


def _protocols(config: Config) -> tuple[type[HandshakeProtocol], type[WebSocketProtocol]]:
    """Protocol classes bound to one server's settings (and its count of handshakes)."""

    class Http(HandshakeProtocol):
        handshakes = _Handshakes(config.max_pending_handshakes, config.handshake_timeout_s)

    class Ws(WebSocketProtocol):
        close_timeout_s = config.close_timeout_s
        max_queued_bytes = int(config.max_queued_mib * 1024 * 1024)

    return Http, Ws


def uvicorn_config(
    app: Any, config: Config, *, host: str = "127.0.0.1", port: int = 8765,
    log_level: str = "warning",
) -> uvicorn.Config:
    """A uvicorn configuration that serves ``app`` by the rules of PROTOCOL.md.

    The settings map onto uvicorn's (``ping_interval_s`` → ``ws_ping_interval``, ...);
    no compression is negotiated and no access log is written (stdout stays the server's).
    uvicorn accepts :data:`ACCEPTS_PER_PASS` connections per pass; served on a socket of
    :func:`listening_socket`, the kernel's listen queue stays ``SOMAXCONN`` long.
    """
    http, ws = _protocols(config)
    logging.getLogger("uvicorn.error").addFilter(_redact_tokens)
    return uvicorn.Config(
        app, host=host, port=port, http=http, ws=ws, lifespan="on",
        ws_max_size=config.max_message_bytes, ws_ping_interval=config.ping_interval_s,
        ws_ping_timeout=config.ping_timeout_s, ws_per_message_deflate=False,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        log_config=None, log_level=log_level.lower(), access_log=False, server_header=False,
        backlog=ACCEPTS_PER_PASS,
    )


_TOKEN_IN_QUERY: Final = re.compile(r"(?<=[?&]token=)[^&\s\"]+")


def _redact_tokens(record: logging.LogRecord) -> bool:
    """uvicorn logs each handshake's path with its query string: no token goes to the log."""
    if isinstance(record.args, tuple):
        record.args = tuple(_TOKEN_IN_QUERY.sub("<redacted>", arg) if isinstance(arg, str)
                            else arg for arg in record.args)
    return True


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains the chat service on SIGINT or SIGTERM before it exits.

    The first signal: the service shuts down (see :meth:`ChatService.shut_down`) within
    ``shutdown_grace_s`` less what uvicorn needs after it, then uvicorn stops. A second
    signal changes nothing. Signals are only taken in the main thread (as uvicorn does).

    Args:
        config: The uvicorn configuration (see :func:`uvicorn_config`); its ``app`` keeps
            the service on ``app.state.chat_service`` (the registry's lifespan does).
        grace_s: ``shutdown_grace_s``.
        on_started: Called once the server accepts connections.
    """

    def __init__(self, config: uvicorn.Config, *, grace_s: float,
                 on_started: Callable[[], object] | None = None) -> None:
        super().__init__(config)
        self.grace_s = grace_s
        self.on_started = on_started
        self._stopping: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()

        def handler(signum: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(self._signalled, signum)

        previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    def _signalled(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stopping is not None:
            log.info("%s again: already shutting down", name)
            return
        log.info("%s: shutting down", name)
        self._stopping = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        service = service_of_app(self.config.app)
        if service is not None:
            await service.shut_down(self.grace_s - min(_UVICORN_SHUTDOWN_S, self.grace_s / 4))
        # What is left is uvicorn's wait for sockets still flushing (asyncio.wait_for: float)
        self.config.timeout_graceful_shutdown = max(deadline - loop.time(), 0.0)  # type: ignore[assignment]
        self.should_exit = True
