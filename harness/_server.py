"""The trio server of PROTOCOL.md: WebSocket and HTTP on one port, wsproto and h11 on raw sockets.

Each connection has one task. It reads the HTTP request head (h11); an operations route is
answered and the connection closed; ``/ws`` is checked (origin, token, the user's
connection limit) and upgraded, then the same task reads WebSocket frames (wsproto) and
hands whole messages to the connection's :class:`~harness._session.ChatSession`.

Writing is not a task per socket. A socket's :class:`~registry.OutboundQueue` signals that it
has frames; one *flusher* task writes, on each pass, the frames of every socket that has
some, in one ``send`` per socket. Only a socket whose kernel buffer is full gets a task of
its own, which waits until it is writable. One timer task serves every keepalive ping, pong
deadline, token expiry and close deadline. So an event costs the agent's own wake-up, a
share of one flusher pass and one system call: nothing per socket is woken.

Nothing a connection does can take the server down: its task catches and logs its own
failure and closes only its socket.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
import weakref
from typing import Any, Final, final

import trio

from harness._auth import AuthError, origin_allowed, token_from_request, verify_token
from harness._http import REFUSALS, HttpError, Request, RequestReader, accept_websocket
from harness._ops import TEXT, Operations
from harness._session import ChatSession
from harness._websocket import Closed, Message, ServerWebSocket, text_frame_header
from registry import (
    CLOSE_OVERFLOW,
    AgentExecutionRegistry,
    AgentRegistry,
    Config,
    OutboundQueue,
    ToolDispatcher,
    TooManyConnections,
    open_registry,
)
from registry._timers import DeadlineQueue, TimerHeap

__all__ = ["CLOSE_GOING_AWAY", "ChatServer", "serve"]

log = logging.getLogger("harness.server")

PATH: Final = "/ws"
CLOSE_GOING_AWAY: Final = 1001
CLOSE_INTERNAL: Final = 1011
CLOSE_ABNORMAL: Final = 1006
CLOSE_TOKEN_EXPIRED: Final = 4001
#: Bytes taken from a queue for one write (a slow reader's in-flight data is at most this).
_BATCH_BYTES: Final = 65536
_RECV_BYTES: Final = 65536
#: A socket that wrote nothing for this many backpressure pauses is stuck: runs stop waiting.
_STALL_PAUSES: Final = 250
#: Accepts per pass of the accept loop before other tasks get a turn.
_ACCEPTS_PER_PASS: Final = 64
_FD_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})



@final
class _Socket:
    """One upgraded WebSocket: its OS socket, wsproto side, queue, session and write buffer."""

    __slots__ = ("__weakref__", "blocked", "drained", "early", "finished", "label",
                 "last_write", "out", "ping_due",
                 "queue", "released", "scope", "session", "sock", "stamps", "ws")

    def __init__(self, sock: socket.socket, ws: ServerWebSocket, label: str) -> None:
        self.sock = sock
        self.ws = ws
        self.label = label
        self.queue: OutboundQueue
        self.session: ChatSession
        self.out = bytearray()  # bytes taken for writing, not yet written
        self.early = b""  # bytes the client sent behind its upgrade request
        self.stamps: list[float] = []  # emit times of the event frames in ``out``
        self.blocked = False  # the kernel buffer is full: a drain task is waiting
        self.finished = False  # the connection is over (closed or lost)
        self.released = False  # the registry has forgotten it (a close was requested)
        self.last_write = trio.current_time()
        self.ping_due = 0  # pongs expected by the keepalive
        self.drained: trio.lowlevel.ParkingLot | None = None
        self.scope = trio.CancelScope()


@final
class ChatServer:
    """The connections of one trio server; :func:`serve` runs one.

    Attributes:
        registry: Where runs live.
        ops: Counters, readiness and the operations routes.
    """

    def __init__(self, registry: AgentExecutionRegistry, config: Config, ops: Operations) -> None:
        if not config.auth_secret:
            raise ValueError("auth_secret is required (REGISTRY_AUTH_SECRET or --auth-secret)")
        self.registry = registry
        self.config = config
        self.secret: str = config.auth_secret
        self.ops = ops
        self.sockets: set[_Socket] = set()
        self._nursery: trio.Nursery | None = None
        self._dirty: dict[_Socket, None] = {}
        self._flusher_lot = trio.lowlevel.ParkingLot()
        #: Handshakes in progress: counted from accept, evictable once their task runs.
        self._handshaking = 0
        self._pending: dict[int, trio.CancelScope] = {}
        self._pending_ids = iter(range(1 << 62))
        self._all_closed = trio.Event()
        self._all_closed.set()
        self._pings = DeadlineQueue[_Socket](config.ping_interval_s, self._ping_due)
        self._pong_checks = DeadlineQueue[tuple[_Socket, int]](config.ping_timeout_s,
                                                                self._pong_due)
        self._closes = DeadlineQueue[_Socket](config.close_timeout_s, self._close_due)
        #: Holds weak references: a closed socket is not kept until its token's expiry.
        self._tokens = TimerHeap[weakref.ref[_Socket]](self._token_due)

    # ============================================================ services
    async def run_services(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
        """The flusher and the timers; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._flusher)
            for timers in (self._pings, self._pong_checks, self._closes, self._tokens):
                await nursery.start(timers.serve)
            task_status.started()

    async def listen(
        self, host: str, port: int, connections: trio.Nursery,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accepts connections on ``host:port`` (the first address ``host`` resolves to)."""
        lsock = _listening_socket(host, port)
        try:
            task_status.started(lsock.getsockname()[1])
            while True:
                await trio.lowlevel.wait_readable(lsock)
                await self._accept_some(lsock, connections)
        finally:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()

    async def _accept_some(self, lsock: socket.socket, connections: trio.Nursery) -> None:
        for _ in range(_ACCEPTS_PER_PASS):
            try:
                sock, address = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in _FD_EXHAUSTED:  # pragma: no cover - ECONNABORTED, EPERM, ...
                    log.info("accept failed: %s", exc)
                    continue
                if not self._evict_oldest_pending():
                    log.warning("out of file descriptors; accepting again in 10 ms")
                    await trio.sleep(0.01)
                return
            sock.setblocking(False)
            if self._handshaking >= self.config.max_pending_handshakes:
                sock.close()  # at max_pending_handshakes: closed at once
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._handshaking += 1
            connections.start_soon(self._connection, sock, _label(address))
        await trio.lowlevel.checkpoint()

    def _evict_oldest_pending(self) -> bool:
        """Out of descriptors: ends the longest-waiting handshake so a new client gets in."""
        if not self._pending:
            return False
        oldest = next(iter(self._pending))
        self._pending.pop(oldest).cancel()
        return True

    # ========================================================= connections
    async def _connection(self, sock: socket.socket, label: str) -> None:
        """One TCP connection: its request, then (for /ws) its WebSocket until it ends."""
        try:
            await self._serve_connection(sock, label)
        except Exception:
            log.exception("connection handler crashed %s", label)
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _serve_connection(self, sock: socket.socket, label: str) -> None:
        s = await self._handshake(sock, label)
        if s is not None:
            await self._run_websocket(s)

    async def _handshake(self, sock: socket.socket, label: str) -> _Socket | None:
        """The HTTP phase, bounded by ``handshake_timeout_s`` (and evictable)."""
        pending_id = next(self._pending_ids)
        s = None
        with trio.move_on_after(self.config.handshake_timeout_s) as scope:
            self._pending[pending_id] = scope
            try:
                reader, request = await _read_request(sock)
                if request is not None:
                    s = await self._route(sock, label, reader, request)
            finally:
                self._pending.pop(pending_id, None)
                self._handshaking -= 1
        if scope.cancelled_caught and s is not None:  # pragma: no cover - upgrade is not async
            self._lost(s)
            self._forget(s)
            return None
        return s

    async def _route(
        self, sock: socket.socket, label: str, reader: RequestReader, request: Request,
    ) -> _Socket | None:
        """Answers an HTTP request, or accepts its WebSocket upgrade (returns the socket)."""
        if request.path != PATH:
            status, body, kind = self.ops.answer(request.path, request.method, request.headers,
                                                 request.query)
            await _send_all(sock, reader.respond(status, body, kind))
            return None
        refusal = self._refusal(request)
        if refusal is not None:
            await _send_all(sock, reader.respond(refusal[0], refusal[1], TEXT))
            return None
        return await self._upgrade(sock, label, reader, request)

    def _refusal(self, request: Request) -> tuple[int, bytes] | None:
        """Why a /ws request is not upgraded (fixed texts: no reason, no count)."""
        if request.method != "GET":
            return 405, REFUSALS[405]
        if not request.wants_websocket:
            return 426, REFUSALS[426]
        if self.ops.state != "ready":
            return 503, REFUSALS[503]
        if not origin_allowed(request.header("origin"), self.config.allowed_origins):
            return 403, REFUSALS[403]
        return None

    async def _upgrade(
        self, sock: socket.socket, label: str, reader: RequestReader, request: Request,
    ) -> _Socket | None:
        try:
            identity = verify_token(self.secret, token_from_request(request.headers,
                                                                    request.query))
        except AuthError as exc:
            log.info("handshake refused (401) %s: %s", label, exc)
            await _send_all(sock, reader.respond(401, REFUSALS[401], TEXT))
            return None
        s = self._new_socket(sock, label, identity.user_id, identity.exp)
        try:
            await self.registry.on_connect(s.queue)  # a slot, across nodes in a service
        except TooManyConnections:
            await _send_all(sock, reader.respond(429, REFUSALS[429], TEXT))
            return None
        return await self._accept(s, reader, request)

    async def _accept(self, s: _Socket, reader: RequestReader, request: Request) -> _Socket | None:
        """Owes the 101 (and reads frames pipelined behind the request), or answers 400."""
        sock = s.sock
        try:
            head, trailing = accept_websocket(reader, request)
        except HttpError as exc:
            self.registry.on_disconnect(s.queue)
            await _send_all(sock, reader.respond(exc.status, b"bad websocket upgrade\n", TEXT))
            return None
        s.out += head
        s.early = trailing
        self._opened(s)
        return s

    def _new_socket(self, sock: socket.socket, label: str, user_id: str, exp: float) -> _Socket:
        s = _Socket(sock, ServerWebSocket(self.config.max_message_bytes), label)
        mib = int(self.config.max_queued_mib * 1024 * 1024)
        s.queue = OutboundQueue(user_id, max_messages=self.config.max_queued_messages,
                                max_bytes=mib)
        s.session = ChatSession(self.registry, self.ops, s.queue, self.secret, exp)
        return s

    def _opened(self, s: _Socket) -> None:
        """The 101 is owed: the socket is served (until ``_forget`` breaks these cycles)."""
        s.queue.on_ready = lambda: self._mark_dirty(s)
        s.queue.pause = lambda: self._backpressure(s)
        self.sockets.add(s)
        self.ops.connections += 1
        self._all_closed = trio.Event()
        self._pings.push(s)
        self._schedule_token_expiry(s)
        self._mark_dirty(s)  # the 101

    async def _run_websocket(self, s: _Socket) -> None:
        """Reads the socket until the WebSocket is over; then forgets it."""
        try:
            with s.scope:
                if s.early:  # frames the client sent right behind its upgrade request
                    await self._received(s, s.early)
                while not s.finished:
                    await trio.lowlevel.wait_readable(s.sock)
                    await self._read(s)
        except Exception:
            log.exception("socket handler crashed user_id=%s run_ids=%s %s",
                          s.queue.user_id, ",".join(s.queue.run_ids()) or "-", s.label)
            self._close(s, CLOSE_INTERNAL, "internal error")
            self._flush(s)  # the close frame, as far as the socket takes it now
        finally:
            self._forget(s)

    async def _read(self, s: _Socket) -> None:
        try:
            data = s.sock.recv(_RECV_BYTES)
        except BlockingIOError:  # pragma: no cover - a spurious readiness: read again later
            return
        except OSError:
            data = b""
        if not data:  # the peer is gone
            self._lost(s)
            return
        await self._received(s, data)

    async def _received(self, s: _Socket, data: bytes) -> None:
        inbound, reply = s.ws.receive(data)
        if reply and s.queue.close_code is None:  # pongs count against max_queued_mib
            s.out += reply
            if len(s.out) > self.config.max_queued_mib * 1024 * 1024:
                self._close(s, CLOSE_OVERFLOW, "outbound queue overflow; reconnect and resume")
            self._mark_dirty(s)
        for item in inbound:
            if isinstance(item, Message):
                if s.queue.close_code is None:
                    await s.session.handle(item.text)
            elif isinstance(item, Closed):  # pragma: no branch - the only other kind
                self._peer_closing(s, item)
        if s.ws.closed and not s.out:
            s.finished = True

    def _peer_closing(self, s: _Socket, closed: Closed) -> None:
        """The peer closed (its code is echoed) or broke a rule (1002, 1007, 1009)."""
        if not closed.by_peer:
            log.info("closing %d user_id=%s %s: %s", closed.code, s.queue.user_id, s.label,
                     closed.reason)
        self._close(s, int(closed.code), closed.reason)

    def _close(self, s: _Socket, code: int, reason: str) -> None:
        """Asks for ``s`` to be closed; the writer sends what is owed, then the close frame."""
        if s.queue.close_code is None:
            s.queue.close(code, reason)
        self._closing(s)

    def _closing(self, s: _Socket) -> None:
        """A close was requested (by us, the peer, or the queue's 4008): free the slot now.

        Its runs can be resumed elsewhere at once; the socket gets ``close_timeout_s`` to
        send what it owes and its close frame before the TCP connection is dropped.
        """
        if s.released or s.queue.close_code is None:
            return
        s.released = True
        self.registry.on_disconnect(s.queue)
        self._closes.push(s)

    def _lost(self, s: _Socket) -> None:
        """The connection broke (or the peer left without a close): nothing more is sent."""
        if s.queue.close_code is None:
            s.queue.close(CLOSE_ABNORMAL, "connection lost")
        self._closing(s)
        s.finished = True
        s.scope.cancel()

    def _forget(self, s: _Socket) -> None:
        """Once, when the socket's task is done (it was added by ``_opened``)."""
        self.sockets.discard(s)
        self.ops.connections -= 1
        self.ops.count_close(s.queue.close_code or CLOSE_ABNORMAL)
        if not s.released:
            s.released = True
            self.registry.on_disconnect(s.queue)
        self._dirty.pop(s, None)
        s.queue.on_ready = s.queue.pause = None  # the socket and its queue refer to each other
        s.finished = True
        if s.drained is not None:
            s.drained.unpark_all()
        if not self.sockets:
            self._all_closed.set()

    # ============================================================== writing
    def _mark_dirty(self, s: _Socket) -> None:
        if s.finished:
            return
        if s.queue.close_code is not None:
            self._closing(s)
        if not self._dirty:
            self._flusher_lot.unpark_all()
        self._dirty[s] = None

    async def _flusher(self) -> None:
        """Writes, pass after pass, what every socket with something to send has queued."""
        while True:
            if not self._dirty:
                await self._flusher_lot.park()
            dirty, self._dirty = self._dirty, {}
            for s in dirty:
                self._flush(s)
            await trio.lowlevel.checkpoint()

    def _flush(self, s: _Socket) -> None:
        """Writes what ``s`` has (without blocking); a full kernel buffer hands it to a drain."""
        if s.blocked or s.finished:
            return
        self._fill(s)
        if not s.out:
            return
        try:
            sent = s.sock.send(s.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lost(s)
            return
        self._wrote(s, sent)
        if s.out:
            s.blocked = True
            assert self._nursery is not None
            self._nursery.start_soon(self._drain, s)
        elif s.queue.has_frames() and s.ws.open:
            self._mark_dirty(s)

    def _fill(self, s: _Socket) -> None:
        """Moves frames from the queue into the write buffer; the close frame once owed.

        Nothing is taken once a close frame went either way (the peer may have closed).
        """
        if not s.ws.open:
            return
        if len(s.out) < _BATCH_BYTES:
            frames, stamps = s.queue.take(_BATCH_BYTES - len(s.out))
            for frame in frames:
                s.out += text_frame_header(len(frame))
                s.out += frame
            s.stamps += stamps
        if not s.queue.has_frames() and s.queue.close_code is not None and not s.ws.close_sent:
            code = s.queue.close_code
            s.out += s.ws.close(code if code != CLOSE_ABNORMAL else CLOSE_INTERNAL,
                                s.queue.close_reason)

    def _wrote(self, s: _Socket, sent: int) -> None:
        if sent:
            del s.out[:sent]
            s.last_write = trio.current_time()
        if not s.out:
            self.ops.written(s.stamps, time.time())
            s.stamps = []
            if s.drained is not None and not s.queue.above_high_water():
                s.drained.unpark_all()
            if s.ws.closed:
                s.finished = True
                s.scope.cancel()

    async def _drain(self, s: _Socket) -> None:
        """Waits until a blocked socket is writable and writes its buffer; then hands back."""
        try:
            while s.out and not s.finished:
                await trio.lowlevel.wait_writable(s.sock)
                try:
                    sent = s.sock.send(s.out)
                except BlockingIOError:  # pragma: no cover - a spurious readiness
                    continue
                self._wrote(s, sent)
        except (OSError, trio.ClosedResourceError):
            self._lost(s)
        finally:
            s.blocked = False
            if not s.finished:
                self._mark_dirty(s)

    async def _backpressure(self, s: _Socket) -> None:
        """Lets a run wait (bounded, shielded) for a socket past half its bounds to drain.

        A socket that wrote nothing lately is stuck: it is not waited for, it will reach
        its bound and be closed with 4008 instead.
        """
        pause = self.config.backpressure_pause_s
        if s.finished or trio.current_time() - s.last_write > _STALL_PAUSES * pause:
            return
        if s.drained is None:
            s.drained = trio.lowlevel.ParkingLot()
        with trio.CancelScope(shield=True), trio.move_on_after(pause):
            await s.drained.park()

    # =============================================================== timers
    def _ping_due(self, s: _Socket) -> None:
        if s.finished or s.queue.close_code is not None:
            return
        s.out += s.ws.ping(b"keepalive")
        s.ping_due = s.ws.pongs + 1
        self._mark_dirty(s)
        self._pong_checks.push((s, s.ping_due))
        self._pings.push(s)

    def _pong_due(self, item: tuple[_Socket, int]) -> None:
        s, expected = item
        if not s.finished and s.ws.pongs < expected:
            log.info("keepalive timeout user_id=%s %s", s.queue.user_id, s.label)
            self._close(s, CLOSE_INTERNAL, "keepalive ping timeout")

    def _close_due(self, s: _Socket) -> None:
        """``close_timeout_s`` after a close was requested: drop the TCP connection."""
        if not s.finished:
            s.finished = True
            s.scope.cancel()

    def _schedule_token_expiry(self, s: _Socket) -> None:
        delay = s.session.token_exp - time.time()
        self._tokens.push(trio.current_time() + max(delay, 0.0), weakref.ref(s))

    def _token_due(self, ref: weakref.ref[_Socket]) -> None:
        s = ref()
        if s is None or s.finished or s.queue.close_code is not None:
            return
        if s.session.token_exp > time.time():  # refreshed meanwhile
            self._schedule_token_expiry(s)
            return
        self._close(s, CLOSE_TOKEN_EXPIRED, "token expired; reconnect with a fresh token")

    # ============================================================= shutdown
    async def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "shutdown") -> None:
        """Asks every socket to send what it owes and close; waits until all are gone."""
        for s in list(self.sockets):
            self._close(s, code, reason)
        await self._all_closed.wait()


async def _read_request(sock: socket.socket) -> tuple[RequestReader, Request | None]:
    """Reads one request head; answers a malformed one (400/431) itself (request None)."""
    reader = RequestReader()
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            data = sock.recv(_RECV_BYTES)
        except BlockingIOError:  # pragma: no cover - a spurious readiness: read again later
            continue
        except OSError:
            return reader, None
        if not data:  # the client left mid-handshake: free the socket now
            return reader, None
        try:
            request = reader.feed(data)
        except HttpError as exc:
            await _send_all(sock, reader.respond(exc.status, REFUSALS[400], TEXT))
            return reader, None
        if request is not None:
            return reader, request


async def _send_all(sock: socket.socket, data: bytes) -> None:
    """Writes ``data`` (an HTTP answer); gives up quietly if the client is gone."""
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[sock.send(view):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
    except OSError:
        return


def _listening_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    lsock = socket.socket(family, kind, proto)
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(address)
        lsock.listen(socket.SOMAXCONN)
        lsock.setblocking(False)
    except OSError:
        lsock.close()
        raise
    return lsock


def _label(address: tuple[Any, ...]) -> str:
    """``host:port`` of an IPv4 or IPv6 peer (the only families the listener binds)."""
    return f"{address[0]}:{address[1]}"


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

    Shutdown, bounded by ``shutdown_grace_s``: readiness turns ``draining`` and new
    WebSocket upgrades are refused (503), every active run ends with ``agent_completed``
    ``cancelled`` delivered to the sockets still open, then every socket closes with 1001.

    Args:
        task_status: Reports the port once the server accepts connections.
    """
    stop = stop if stop is not None else trio.Event()
    async with open_registry(config, agents=agents, tools=tools) as registry:
        ops = Operations(registry, config, "trio")
        server = ChatServer(registry, config, ops)
        with ops.gc:
            await _run(server, registry, config, host, port, stop, task_status)


async def _run(
    server: ChatServer, registry: AgentExecutionRegistry, config: Config, host: str, port: int,
    stop: trio.Event, task_status: trio.TaskStatus[int],
) -> None:
    """Serves until ``stop``, then drains: listening stays open for /readyz (draining)."""
    ops = server.ops
    async with trio.open_nursery() as connections:
        await connections.start(server.run_services)
        await connections.start(ops.sampler)
        async with trio.open_nursery() as listening:
            bound = await listening.start(server.listen, host, port, connections)
            await connections.start(ops.heap.serve)
            ops.state = "ready"
            task_status.started(bound)
            await stop.wait()
            ops.state = "draining"
            await _shut_down(server, registry, config)
            listening.cancel_scope.cancel()
        connections.cancel_scope.cancel()


async def _shut_down(server: ChatServer, registry: AgentExecutionRegistry, config: Config) -> None:
    """Ends the runs, then closes the sockets, all within ``shutdown_grace_s``."""
    await server.ops.drain(registry, server.close_all, config.shutdown_grace_s)
