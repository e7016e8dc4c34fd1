"""The WebSocket server of PROTOCOL.md on trio-websocket, on top of the registry.

Each socket has one reader task (parses client frames, calls the registry) and one writer
task (drains the socket's bounded outbound queue); one service pings every socket. Nothing a socket
does can block a run, another socket or the server: the registry hands events to a socket
without waiting, and a handler that crashes is logged and closes only its own socket (1011).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final, final
from urllib.parse import urlsplit

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from harness._auth import AuthError, token_from_request, verify_token
from harness._batch import send_frames
from harness._connection import CLOSE_GOING_AWAY, SocketConnection
from harness._protocol import (
    Ack,
    Cancel,
    ClientCommand,
    Ping,
    ProtocolError,
    Resume,
    StartAgent,
    error_frame,
    parse_client_frame,
    pong_frame,
    run_accepted_frame,
)
from harness._wsfix import tolerate_pings_while_closing
from registry import (
    AgentExecutionRegistry,
    AgentRegistry,
    Config,
    RegistryError,
    ToolDispatcher,
    TooManyConnections,
    open_registry,
)

__all__ = ["ChatServer", "serve"]

log = logging.getLogger("harness.server")

PATH: Final = "/ws"
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_ABNORMAL: Final = 1006
#: Most frames written to a socket in one syscall.
_MAX_BATCH: Final = 64


@final
class ChatServer:
    """The handshake and per-socket tasks; :func:`serve` runs one.

    Attributes:
        registry: The registry runs live in.
        connections: Open sockets, for shutdown.
    """

    def __init__(self, registry: AgentExecutionRegistry, config: Config) -> None:
        if not config.auth_secret:
            raise ValueError("auth_secret is required (REGISTRY_AUTH_SECRET or --auth-secret)")
        self.registry = registry
        self.config = config
        self.secret: str = config.auth_secret
        self.connections: dict[SocketConnection, WebSocketConnection] = {}
        self._all_closed = trio.Event()
        self._all_closed.set()

    # ---------------------------------------------------------- handshake
    async def handle(self, request: WebSocketRequest) -> None:
        """trio-websocket handler: check the handshake, then run the socket until it closes.

        A peer that vanishes during the handshake only ends its own connection.
        """
        try:
            await self._handshake(request)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            log.debug("peer left during the handshake", exc_info=True)

    async def _handshake(self, request: WebSocketRequest) -> None:
        if _path(request.path) != PATH:
            await request.reject(404, body=b"not found: the endpoint is /ws\n")
            return
        try:
            user_id = verify_token(self.secret, token_from_request(request.path, request.headers))
        except AuthError as exc:
            await request.reject(401, body=f"unauthorized: {exc}\n".encode())
            return
        conn = SocketConnection(user_id, self.config.max_queued_messages, _label(request),
                                self.config.backpressure_pause_s)
        try:
            self.registry.connect(conn)  # reserves the slot before any await
        except TooManyConnections as exc:
            await request.reject(429, body=f"too many connections: {exc}\n".encode())
            return
        try:
            await self._run_socket(request, conn)
        finally:
            self.registry.disconnect(conn)

    async def _run_socket(self, request: WebSocketRequest, conn: SocketConnection) -> None:
        ws = await request.accept()
        self.connections[conn] = ws
        self._all_closed = trio.Event()
        try:
            await self._serve_socket(ws, conn)
        except Exception:
            log.exception("socket handler crashed user_id=%s run_ids=%s %s", conn.user_id,
                          ",".join(conn.run_ids()) or "-", conn.label)
            with trio.move_on_after(self.config.close_timeout_s):
                await ws.aclose(CLOSE_INTERNAL, "internal error")
        finally:
            self.connections.pop(conn, None)
            if not self.connections:
                self._all_closed.set()

    async def _serve_socket(self, ws: WebSocketConnection, conn: SocketConnection) -> None:
        """Runs the socket's tasks until a close is requested, then bounds the closing.

        Once a close is requested (by the peer, an overflow, shutdown or keepalive) the
        socket is unsubscribed at once, so its runs can be resumed elsewhere and its slot
        is free; the writer gets a bounded time to flush and send the close frame.
        """
        writer_done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, ws, conn)
            nursery.start_soon(self._writer, ws, conn, writer_done)
            await conn.wait_close_requested()
            self.registry.disconnect(conn)
            with trio.move_on_after(2 * self.config.close_timeout_s):
                await writer_done.wait()
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------- writer
    async def _writer(
        self, ws: WebSocketConnection, conn: SocketConnection, done: trio.Event
    ) -> None:
        """Drains ``conn``'s queue; once a close is requested and the queue is empty, closes."""
        try:
            while True:
                batch = conn.next_frames(_MAX_BATCH)
                if not batch:
                    if conn.close_code is not None:
                        break
                    await conn.wait_for_work()
                    continue
                await send_frames(ws, [frame for frame, _, _ in batch])
                for _, run_id, seq in batch:
                    conn.sent(run_id, seq)
            with trio.move_on_after(self.config.close_timeout_s):
                await ws.aclose(conn.close_code or CLOSE_INTERNAL, conn.close_reason or None)
        except ConnectionClosed:
            conn.close(CLOSE_ABNORMAL, "connection lost")
        finally:
            done.set()

    # ------------------------------------------------------------- reader
    async def _reader(self, ws: WebSocketConnection, conn: SocketConnection) -> None:
        limit = self.config.max_message_bytes
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, str) and len(message.encode()) > limit:
                    conn.close(CLOSE_TOO_BIG, f"message over max_message_bytes ({limit})")
                    return
                self._handle_frame(message, conn)
        except ConnectionClosed as exc:
            code = exc.reason.code if exc.reason is not None else None
            if code == CLOSE_TOO_BIG:
                log.info("frame too large user_id=%s %s", conn.user_id, conn.label)
            conn.close(code or 1000)

    def _handle_frame(self, message: str | bytes, conn: SocketConnection) -> None:
        try:
            command = parse_client_frame(message)
            self._dispatch(command, conn)
        except ProtocolError as exc:
            conn.send_control(exc.frame())
        except RecursionError:  # JSON nested too deeply to answer (e.g. a ping id)
            conn.send_control(error_frame("bad_json", "the frame is nested too deeply"))

    def _dispatch(self, command: ClientCommand, conn: SocketConnection) -> None:
        handler = _HANDLERS[type(command)]
        try:
            handler(self, command, conn)
        except RegistryError as exc:
            conn.send_control(_error_for(command, exc))

    def _start(self, command: StartAgent, conn: SocketConnection) -> None:
        run, duplicate = self.registry.start_run(
            user_id=conn.user_id, request_id=command.request_id, agent=command.agent,
            message=command.message, thread_id=command.thread_id, context=command.context,
            subscriber=conn,
        )
        conn.send_control(run_accepted_frame(command.request_id, run.run_id, run.thread_id,
                                             duplicate))

    def _resume(self, command: Resume, conn: SocketConnection) -> None:
        self.registry.resume(command.run_id, conn.user_id, command.after_seq, conn)

    def _ack(self, command: Ack, conn: SocketConnection) -> None:
        self.registry.ack(command.run_id, conn.user_id, command.seq)

    def _cancel(self, command: Cancel, conn: SocketConnection) -> None:
        self.registry.cancel(command.run_id, conn.user_id)

    def _ping(self, command: Ping, conn: SocketConnection) -> None:
        conn.send_control(pong_frame(command.id))

    # ---------------------------------------------------------- keepalive
    async def keepalive(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Pings every socket every ``ping_interval_s``; closes one silent for ``ping_timeout_s``.

        One service for all sockets: a ping task exists only while a ping is in flight, so
        an idle socket costs no task of its own for keepalive.
        """
        async with trio.open_nursery() as pings:
            task_status.started()
            while True:
                await trio.sleep(self.config.ping_interval_s)
                for conn, ws in list(self.connections.items()):
                    pings.start_soon(self._keepalive_ping, ws, conn)

    async def _keepalive_ping(self, ws: WebSocketConnection, conn: SocketConnection) -> None:
        with trio.move_on_after(self.config.ping_timeout_s) as scope:
            try:
                await ws.ping()
            except ConnectionClosed:
                return
        if scope.cancelled_caught:
            log.info("keepalive timeout user_id=%s %s", conn.user_id, conn.label)
            conn.close(CLOSE_INTERNAL, "keepalive ping timeout")

    # ----------------------------------------------------------- shutdown
    async def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "shutdown") -> None:
        """Asks every socket to flush what it has queued and close; waits until all did."""
        for conn in list(self.connections):
            conn.close(code, reason)
        await self._all_closed.wait()


_HANDLERS: Final[dict[type[Any], Callable[[ChatServer, Any, SocketConnection], None]]] = {
    StartAgent: ChatServer._start,
    Resume: ChatServer._resume,
    Ack: ChatServer._ack,
    Cancel: ChatServer._cancel,
    Ping: ChatServer._ping,
}


def _path(target: str) -> str | None:
    try:
        return urlsplit(target).path
    except ValueError:  # not even a URL: a 404 like any other path
        return None


def _label(request: WebSocketRequest) -> str:
    try:
        return str(request.remote)
    except OSError:
        return "?"


class _GuardedServer(trio_websocket.WebSocketServer):
    """trio-websocket's server, except that one connection's failure ends only that connection.

    Stock ``WebSocketServer`` re-raises an error of a connection's handler or of its reader
    task (a peer resetting mid-handshake, a malformed request line) into the handler
    nursery, which takes the whole server down.
    """

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        try:
            await super()._handle_connection(stream)
        except Exception:
            log.info("connection ended with an error", exc_info=True)


async def _listen(
    server: ChatServer, host: str, port: int, sockets: trio.Nursery,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accepts connections on ``host:port`` (the first address ``host`` resolves to)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    for extra in listeners[1:]:  # with port 0 each address would get a different port
        await extra.aclose()
    ws_server = _GuardedServer(
        server.handle, listeners[:1], handler_nursery=sockets,
        max_message_size=server.config.max_message_bytes,
        disconnect_timeout=server.config.close_timeout_s,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(ws_server.run)
        task_status.started(ws_server.port)


def _error_for(command: ClientCommand, exc: RegistryError) -> str:
    ids: dict[str, Any] = {}
    if isinstance(command, StartAgent):
        ids["request_id"] = command.request_id
    elif isinstance(command, Resume | Ack | Cancel):
        ids["run_id"] = command.run_id
    field = getattr(exc, "field", None)
    return error_frame(exc.code, str(exc), field=field, **ids)


async def serve(
    config: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    agents: AgentRegistry | None = None,
    tools: ToolDispatcher | None = None,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs the server until ``stop`` is set (or the caller cancels), then shuts down gracefully.

    Shutdown, bounded by ``shutdown_grace_s``: stop accepting, end every active run with
    ``agent_completed`` ``cancelled`` delivered to the sockets still open, close every socket
    with 1001.

    Args:
        task_status: Reports the port once the server accepts connections.
    """
    stop = stop if stop is not None else trio.Event()
    tolerate_pings_while_closing()
    async with open_registry(config, agents=agents, tools=tools) as registry:
        server = ChatServer(registry, config)
        async with trio.open_nursery() as sockets:
            await sockets.start(server.keepalive)
            async with trio.open_nursery() as listening:
                bound = await listening.start(_listen, server, host, port, sockets)
                task_status.started(bound)
                await stop.wait()
                listening.cancel_scope.cancel()
            await _shut_down(server, registry, config)
            sockets.cancel_scope.cancel()


async def _shut_down(server: ChatServer, registry: AgentExecutionRegistry, config: Config) -> None:
    """Ends the runs, then closes the sockets, all within ``shutdown_grace_s``."""
    grace, closing = config.shutdown_grace_s, config.close_timeout_s
    with trio.move_on_after(max(grace - closing, grace / 2)):
        await registry.aclose_runs()
    with trio.move_on_after(min(closing, grace / 2)):
        await server.close_all()
