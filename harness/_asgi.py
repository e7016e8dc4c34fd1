"""The asyncio server of PROTOCOL.md as ASGI: what a FastAPI application does with each socket.

A :class:`ChatService` is what the application's lifespan opens: the registry, the
operations surface and the WebSocket connections. Each ``/ws`` handshake is checked before
the upgrade, and a refusal is an HTTP answer with the trio server's status and fixed text.
An accepted socket gets one reader task, which hands whole messages to its
:class:`~harness._session.ChatSession`, and one writer task, which sends what its
:class:`~registry.OutboundQueue` holds, woken by the queue's ``on_ready``. One task serves
every token expiry and one every close deadline, as in the trio server.

The wire rules that belong to the WebSocket layer (keepalive pings, 1002/1007/1009, how long
TCP outlives a close) are the ASGI server's: :mod:`harness._uvicorn` gives uvicorn the
settings and the behaviour PROTOCOL.md asks for.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Final, final

import anyio
import anyio.abc
import anyio.lowlevel
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from harness._auth import AuthError, Identity, origin_allowed, token_from_request, verify_token
from harness._http import REFUSALS
from harness._ops import Operations
from harness._session import ChatSession
from registry import (
    AgentExecutionRegistry,
    AgentRegistry,
    Config,
    OutboundQueue,
    ToolDispatcher,
    TooManyConnections,
    open_registry,
)
from registry._timers import DeadlineQueue, TimerHeap

__all__ = ["STATE_ATTRIBUTE", "ChatService", "open_chat_service", "service_of_app"]

log = logging.getLogger("harness.fastapi")

CLOSE_GOING_AWAY: Final = 1001
CLOSE_ABNORMAL: Final = 1006
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_TOKEN_EXPIRED: Final = 4001
#: Bytes taken from a queue for one batch of frames.
_BATCH_BYTES: Final = 65536
#: A socket that wrote nothing for this many backpressure pauses is stuck: runs stop waiting.
_STALL_PAUSES: Final = 250
#: Close reasons are cut to this many characters (a close frame holds 123 bytes of reason).
_MAX_REASON: Final = 100
TEXT: Final = "text/plain; charset=utf-8"
#: Where the registry's lifespan keeps the service: ``app.state.chat_service``.
STATE_ATTRIBUTE: Final = "chat_service"


def plain(status: int, body: bytes) -> Response:
    """A fixed-text answer, as the trio server writes it (no reason, no count)."""
    return Response(body, status_code=status, media_type=TEXT,
                    headers={"cache-control": "no-store"})


def first_values(connection: HTTPConnection) -> dict[str, str]:
    """The query parameters, the first value of each (as the trio server reads them)."""
    query: dict[str, str] = {}
    for key, value in connection.query_params.multi_items():
        query.setdefault(key, value)
    return query


@final
class _Connection:
    """One accepted WebSocket: its queue, its session and the two tasks that serve it."""

    __slots__ = ("drained", "finished", "last_write", "queue", "released", "scope", "service",
                 "session", "wake", "websocket")

    def __init__(self, service: ChatService, websocket: WebSocket, identity: Identity) -> None:
        config = service.config
        self.service = service
        self.websocket = websocket
        self.queue = OutboundQueue(
            identity.user_id, max_messages=config.max_queued_messages,
            max_bytes=int(config.max_queued_mib * 1024 * 1024), on_ready=self._on_ready)
        self.queue.pause = self._backpressure
        self.session = ChatSession(service.registry, service.ops, self.queue, service.secret,
                                   identity.exp)
        self.wake = anyio.Event()  # set when the queue has something to send, or closes
        self.drained: anyio.Event | None = None  # set when the queue is back under half
        self.scope = anyio.CancelScope()  # the whole connection; its close deadline cancels it
        self.finished = False
        self.released = False  # the registry has forgotten it (a close was requested)
        self.last_write = anyio.current_time()

    @property
    def user_id(self) -> str:
        return self.queue.user_id

    # ------------------------------------------------------------------ tasks
    async def serve(self) -> None:
        """Reads and writes until the close frame is sent, the socket is lost or out of time."""
        try:
            with self.scope:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self._reader)
                    await self._writer()
                    tasks.cancel_scope.cancel()
        except Exception:
            log.exception("socket handler crashed user_id=%s run_ids=%s", self.user_id,
                          ",".join(self.queue.run_ids()) or "-")
            self.close(CLOSE_INTERNAL, "internal error")
            with (anyio.move_on_after(self.service.config.close_timeout_s),
                  contextlib.suppress(OSError, RuntimeError, WebSocketDisconnect)):
                await self.websocket.close(CLOSE_INTERNAL, "internal error")  # the close frame

    async def _reader(self) -> None:
        """Hands each whole message to the session, until the WebSocket layer ends reading.

        That end (the peer's close frame, or a close of the layer's own: a protocol error,
        the keepalive, a lost connection) closes the queue with its code: the writer sends
        what is owed and the close frame if it still can (a peer's close is answered after
        the answers to the messages that came before it).
        """
        limit = self.service.config.max_message_bytes
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                self._ended(int(message.get("code") or CLOSE_ABNORMAL),
                            str(message.get("reason") or ""))
                return
            text: str | None = message.get("text")
            if _too_big(text, message.get("bytes"), limit):  # only behind a laxer ASGI server
                self.close(CLOSE_TOO_BIG, f"message over max_message_bytes ({limit})")
            elif self.queue.close_code is None:
                await self.session.handle(text)
            # Messages already received come without a pause: let the writer send the
            # answers in turn, as a client reading them would expect (not all at once).
            await anyio.lowlevel.checkpoint()

    async def _writer(self) -> None:
        """Sends what the queue holds, then the close frame once one is owed."""
        queue = self.queue
        while True:
            self.wake = anyio.Event()
            if queue.has_frames():
                if not await self._send_batch():
                    return
            elif queue.close_code is not None:
                code = queue.close_code
                with contextlib.suppress(OSError, RuntimeError, WebSocketDisconnect):
                    await self.websocket.close(code if code != CLOSE_ABNORMAL else CLOSE_INTERNAL,
                                               queue.close_reason[:_MAX_REASON])
                return
            else:
                await self.wake.wait()

    async def _send_batch(self) -> bool:
        """Sends one batch of frames; False when the socket is gone (nothing more is sent)."""
        frames, stamps = self.queue.take(_BATCH_BYTES)
        try:
            for frame in frames:
                await self.websocket.send_text(frame.decode())
                self.last_write = anyio.current_time()
        except (OSError, RuntimeError, WebSocketDisconnect):
            self._ended(CLOSE_ABNORMAL, "connection lost")
            return False
        self.service.ops.written(stamps, time.time())
        if self.drained is not None and not self.queue.above_high_water():
            self.drained.set()
            self.drained = None
        return True

    async def _backpressure(self) -> None:
        """Lets a run wait (bounded, shielded) for a socket past half its bounds to drain.

        A socket that wrote nothing lately is stuck: it is not waited for, it will reach
        its bound and be closed with 4008 instead.
        """
        pause = self.service.config.backpressure_pause_s
        if self.finished or anyio.current_time() - self.last_write > _STALL_PAUSES * pause:
            return
        if self.drained is None:
            self.drained = anyio.Event()
        with anyio.CancelScope(shield=True), anyio.move_on_after(pause):
            await self.drained.wait()

    # ---------------------------------------------------------------- closing
    def _on_ready(self) -> None:
        if self.queue.close_code is not None:
            self._closing()
        self.wake.set()

    def close(self, code: int, reason: str = "") -> None:
        """Asks for the socket to be closed; the writer sends what is owed, then the close."""
        if self.queue.close_code is None:
            self.queue.close(code, reason)
        self._closing()

    def _closing(self) -> None:
        """A close was requested (by us, the peer, or the queue's 4008): free the slot now.

        Its runs can be resumed elsewhere at once; the socket gets ``close_timeout_s`` to
        send what it owes and its close frame.
        """
        if self.released or self.queue.close_code is None:
            return
        self.released = True
        self.service.registry.on_disconnect(self.queue)
        self.service.closes.push(self)

    def _ended(self, code: int, reason: str) -> None:
        """The WebSocket layer stopped reading (peer close, protocol error, keepalive, loss)."""
        if self.queue.close_code is None and code not in (1000, 1001, 1005, CLOSE_ABNORMAL):
            log.info("closing %d user_id=%s: %s", code, self.user_id, reason)
        self.close(code, reason)


def _too_big(text: str | None, data: bytes | None, limit: int) -> bool:
    """Whether a message is over ``limit`` bytes (text in UTF-8, encoded only if need be)."""
    if text is not None:
        return len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit)
    return data is not None and len(data) > limit


@final
class ChatService:
    """The registry, the operations surface and the sockets of one asyncio server.

    Open it with :func:`open_chat_service` (the FastAPI lifespan does).

    Attributes:
        registry: Where runs live.
        ops: Counters, readiness and the operations routes.
        config: The settings.
    """

    def __init__(self, registry: AgentExecutionRegistry, config: Config, ops: Operations) -> None:
        if not config.auth_secret:
            raise ValueError("auth_secret is required (REGISTRY_AUTH_SECRET or --auth-secret)")
        self.registry = registry
        self.config = config
        self.secret: str = config.auth_secret
        self.ops = ops
        self.connections: set[_Connection] = set()
        self.closes = DeadlineQueue[_Connection](config.close_timeout_s, self._close_due)
        self._tokens = TimerHeap[_Connection](self._token_due)
        self._all_closed = anyio.Event()
        self._all_closed.set()
        self._drained: anyio.Event | None = None

    async def run_services(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The timers and the dashboard's sampler; runs until cancelled."""
        async with anyio.create_task_group() as services:
            for service in (self.closes.serve, self._tokens.serve, self.ops.sampler,
                            self.ops.heap.serve):
                await services.start(service)
            task_status.started()

    # ============================================================ handshakes
    async def serve_websocket(self, websocket: WebSocket) -> None:
        """Serves one ``/ws`` handshake and, once accepted, its socket until it is over.

        Refusals are HTTP answers before the upgrade, checked in the trio server's order:
        503 (not ready), 403 (origin), 401 (token), 429 (the user's connection limit).
        """
        admitted = await self._admit(websocket)
        if not isinstance(admitted, _Connection):
            with contextlib.suppress(OSError):  # the client left meanwhile
                await websocket.send_denial_response(plain(*admitted))
            return
        try:
            await websocket.accept()
        except OSError:  # the client left before its 101
            self.registry.on_disconnect(admitted.queue)
            return
        self._opened(admitted)
        if self.ops.state != "ready":  # the shutdown began during the accept
            admitted.close(CLOSE_GOING_AWAY, "shutdown")
        try:
            await admitted.serve()
        finally:
            self._forget(admitted)

    async def _admit(self, websocket: WebSocket) -> _Connection | tuple[int, bytes]:
        """The new socket with its registry slot reserved, or why it is refused."""
        if self.ops.state != "ready":
            return 503, REFUSALS[503]
        if not origin_allowed(websocket.headers.get("origin"), self.config.allowed_origins):
            return 403, REFUSALS[403]
        try:
            identity = verify_token(self.secret, token_from_request(websocket.headers,
                                                                    first_values(websocket)))
        except AuthError as exc:
            log.info("handshake refused (401) %s: %s", _label(websocket), exc)
            return 401, REFUSALS[401]
        connection = _Connection(self, websocket, identity)
        try:
            await self.registry.on_connect(connection.queue)  # a slot, across nodes
        except TooManyConnections:
            return 429, REFUSALS[429]
        return connection

    def _opened(self, connection: _Connection) -> None:
        self.connections.add(connection)
        self.ops.connections += 1
        if self._all_closed.is_set():
            self._all_closed = anyio.Event()
        self._schedule_token_expiry(connection)

    def _forget(self, connection: _Connection) -> None:
        """Once, when the socket's task is done (it was added by ``_opened``)."""
        self.connections.discard(connection)
        self.ops.connections -= 1
        self.ops.count_close(connection.queue.close_code or CLOSE_ABNORMAL)
        if not connection.released:
            connection.released = True
            self.registry.on_disconnect(connection.queue)
        connection.finished = True
        if connection.drained is not None:
            connection.drained.set()
        if not self.connections:
            self._all_closed.set()

    # =============================================================== timers
    def _close_due(self, connection: _Connection) -> None:
        """``close_timeout_s`` after a close was requested: the connection is given up."""
        if not connection.finished:
            connection.finished = True
            connection.scope.cancel()

    def _schedule_token_expiry(self, connection: _Connection) -> None:
        delay = connection.session.token_exp - time.time()
        self._tokens.push(anyio.current_time() + max(delay, 0.0), connection)

    def _token_due(self, connection: _Connection) -> None:
        if connection.finished or connection.queue.close_code is not None:
            return
        if connection.session.token_exp > time.time():  # refreshed meanwhile
            self._schedule_token_expiry(connection)
            return
        connection.close(CLOSE_TOKEN_EXPIRED, "token expired; reconnect with a fresh token")

    # ============================================================= shutdown
    async def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "shutdown") -> None:
        """Asks every socket to send what it owes and close; waits until all are gone."""
        for connection in list(self.connections):
            connection.close(code, reason)
        await self._all_closed.wait()

    async def shut_down(self, grace_s: float | None = None) -> None:
        """Drains the server, within ``grace_s`` (default ``shutdown_grace_s``).

        Readiness turns ``draining`` and new WebSocket upgrades are refused (503); every
        active run ends with ``agent_completed`` ``cancelled``, delivered to the sockets
        still open; then every socket closes with 1001. Sockets still open at the deadline
        are given up. A second call waits for the first.
        """
        if self._drained is not None:
            await self._drained.wait()
            return
        self._drained = anyio.Event()
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        try:
            await self.ops.drain(self.registry, self.close_all, grace)
            for connection in list(self.connections):
                connection.scope.cancel()
        finally:
            self._drained.set()


def _label(connection: HTTPConnection) -> str:
    client = connection.client
    return f"{client.host}:{client.port}" if client is not None else "-"


@contextlib.asynccontextmanager
async def open_chat_service(
    config: Config,
    *,
    agents: AgentRegistry | None = None,
    tools: ToolDispatcher | None = None,
) -> AsyncIterator[ChatService]:
    """Opens the registry and the service on the running event loop (asyncio under FastAPI).

    The service is ``ready`` inside the block. On exit it shuts down as
    :meth:`ChatService.shut_down` says (at once if that already happened), then the registry
    closes.

    Raises:
        ValueError: ``config`` has no ``auth_secret``.
    """
    async with open_registry(config, agents=agents, tools=tools) as registry:
        service = ChatService(registry, config, Operations(registry, config, "fastapi"))
        with service.ops.gc:  # the collector's pauses, for the metrics (as the trio server)
            async with anyio.create_task_group() as services:
                await services.start(service.run_services)
                service.ops.state = "ready"
                try:
                    yield service
                finally:
                    with anyio.CancelScope(shield=True):
                        await service.shut_down()
                    services.cancel_scope.cancel()


def service_of_app(app: Any) -> ChatService | None:
    """The service an application's lifespan keeps on ``app.state`` (None before it opened)."""
    service = getattr(getattr(app, "state", None), STATE_ATTRIBUTE, None)
    return service if isinstance(service, ChatService) else None
