"""The reference client of PROTOCOL.md, for Python users, on trio.

::

    async with open_chat("ws://127.0.0.1:8765/ws", token) as chat:
        async for event in chat.run("research", "hello"):
            print(event["type"], event["payload"])

The client survives dropped sockets: it reconnects, re-sends ``start_agent`` with the same
``request_id`` for runs not yet accepted, resumes accepted runs from the last seq it holds,
drops repeated events and acks as it goes, so a run yields every event exactly once, in order.

Reconnecting backs off with full jitter (:class:`Backoff`) through refused connections, HTTP 429
and other failures, and gives up with :exc:`ChatUnavailable` once the server has been out of
reach for ``reconnect_budget_s``; a handshake answered 401, 403 or 404 gives up at once. With a
``token_provider`` the client sends ``refresh`` before its token expires (PROTOCOL.md, "Token
lifetime"), so one socket outlives any one token.

Only trio-websocket's public API is used: the client opens the TCP stream itself and wraps it
with :func:`trio_websocket.wrap_client_stream`, which lets it notice a server that hangs up
mid-handshake and cut the connection like a network failure (:meth:`Chat.drop_connection`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import random
import secrets
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any, Final, TypeAlias, cast, final
from urllib.parse import urlsplit, urlunsplit

import attrs
import jwt
import trio
import trio_websocket
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)
from wsproto.utilities import LocalProtocolError

from harness._auth import mint_token
from registry import Config
from registry._util import unwrapping_groups

__all__ = [
    "Backoff",
    "Chat",
    "ChatError",
    "ChatUnavailable",
    "TokenProvider",
    "chat_main",
    "open_chat",
    "refresh_margin",
    "token_expiry",
]

log = logging.getLogger("harness.client")

TERMINAL: Final = "agent_completed"
#: Close code of a socket whose token expired (PROTOCOL.md, "Token lifetime").
CLOSE_TOKEN_EXPIRED: Final = 4001
#: Handshake answers that no retry can change: bad token, forbidden origin, wrong path.
FATAL_STATUSES: Final = frozenset({401, 403, 404})
#: A socket up at least this long resets the backoff (any socket resets the budget).
STABLE_AFTER_S: Final = 1.0
#: How long leaving :func:`open_chat` waits for the server to answer the close frame.
CLOSE_TIMEOUT_S: Final = 1.0

TokenProvider: TypeAlias = Callable[[], "str | Awaitable[str]"]
"""Returns a new token for the same user; sync (must not block) or async."""


class ChatError(Exception):
    """The server answered a run's request with an ``error`` frame.

    Attributes:
        code: PROTOCOL.md's error code; ``field`` for ``invalid_field``.
    """

    def __init__(self, frame: Mapping[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.code: str = str(frame.get("code"))
        self.field: str | None = frame.get("field")
        self.frame = dict(frame)


class ChatUnavailable(Exception):
    """The chat cannot go on: the server refused the token (401, or 4001 without a
    ``token_provider``), the endpoint (403, 404), or stayed out of reach for the whole
    reconnect budget. ``__cause__`` is the last connection error."""


class _GiveUp(Exception):
    """Raised inside the client when no reconnect can help; the message says why."""


class _TokenUnavailable(Exception):
    """The token provider failed or returned something unusable (retried like a refused
    connection, within the reconnect budget)."""


# ------------------------------------------------------------ backoff
def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


@attrs.frozen
class Backoff:
    """Exponential backoff with full jitter (a pure calculation; no clock, no randomness).

    Retry ``n`` (counting from 0) waits ``uniform * min(cap_s, base_s * factor ** n)`` where the
    caller draws ``uniform`` from [0, 1): clients that lost the same server spread out instead
    of coming back in lockstep.

    Attributes:
        base_s: Ceiling of the first wait (> 0).
        factor: Growth of the ceiling per retry (>= 1).
        cap_s: Largest ceiling (> 0).
    """

    base_s: float = attrs.field(default=0.05, converter=float, validator=_positive)
    factor: float = attrs.field(default=2.0, converter=float, validator=attrs.validators.ge(1.0))
    cap_s: float = attrs.field(default=2.0, converter=float, validator=_positive)

    def ceiling(self, retry: int) -> float:
        """The longest wait before retry ``retry``."""
        try:
            return min(self.cap_s, self.base_s * self.factor**retry)
        except OverflowError:
            return self.cap_s

    def delay(self, retry: int, uniform: float) -> float:
        """The wait before retry ``retry`` for a ``uniform`` drawn from [0, 1)."""
        return uniform * self.ceiling(retry)


DEFAULT_BACKOFF: Final = Backoff()


@final
class _Reconnect:
    """When to try the next connection and when to give up (no I/O: time is an argument).

    The budget runs from the moment the last socket went down (or the chat started). The
    backoff starts afresh only after a socket that stayed up for :data:`STABLE_AFTER_S`, so
    a server that accepts and at once closes is not hammered.
    """

    __slots__ = ("backoff", "budget_s", "down_since", "retry", "up_since")

    def __init__(self, backoff: Backoff, budget_s: float, now: float) -> None:
        self.backoff = backoff
        self.budget_s = budget_s
        self.down_since = now
        self.up_since: float | None = None
        self.retry = 0

    @property
    def deadline(self) -> float:
        """When the chat gives up unless a socket is up by then."""
        return self.down_since + self.budget_s

    def connected(self, now: float) -> None:
        self.up_since = now

    def disconnected(self, now: float) -> None:
        if self.up_since is not None:
            if now - self.up_since >= STABLE_AFTER_S:
                self.retry = 0
            self.down_since = now
        self.up_since = None

    def next_delay(self, now: float, uniform: float) -> float | None:
        """The wait before the next try, never past the deadline; None once it has passed."""
        if now >= self.deadline:
            return None
        delay = min(self.backoff.delay(self.retry, uniform), self.deadline - now)
        self.retry += 1
        return delay


# ------------------------------------------------------------- tokens
def _claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, read without verifying it (the server does that); {} if unreadable."""
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return claims


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it.

    Returns:
        Unix time, or None when the token has no readable numeric ``exp``.
    """
    exp = _claims(token).get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def refresh_margin(lifetime_s: float, margin_s: float | None = None) -> float:
    """How long before its ``exp`` a token that had ``lifetime_s`` left when received is replaced.

    ``margin_s`` when given, else 10 % of the lifetime, at least 1 s and at most 60 s; never
    more than half the lifetime, so that short-lived tokens are not replaced back to back.
    """
    wanted = min(max(0.1 * lifetime_s, 1.0), 60.0) if margin_s is None else margin_s
    return min(wanted, max(0.0, lifetime_s / 2))


@final
class _Credentials:
    """The newest token, when to replace it, and where the next one comes from."""

    __slots__ = ("exp", "lifetime_s", "margin_s", "provider", "sub", "token")

    def __init__(
        self, token: str, provider: TokenProvider | None, margin_s: float | None
    ) -> None:
        self.provider = provider
        self.margin_s = margin_s
        self.sub = _claims(token).get("sub")
        self._take(token)

    def _take(self, token: str) -> None:
        self.token = token
        self.exp = token_expiry(token)
        self.lifetime_s = 0.0 if self.exp is None else self.exp - time.time()

    def refresh_at(self) -> float | None:
        """Unix time at which to replace the token; None when it has no ``exp``."""
        if self.exp is None:
            return None
        return self.exp - refresh_margin(self.lifetime_s, self.margin_s)

    async def renew(self, provider: TokenProvider) -> str:
        """Asks ``provider`` (the chat's ``token_provider``) for a new token and makes it the
        newest.

        Raises:
            _TokenUnavailable: the provider raised, or returned no unexpired token of the same
                user (``sub``).
        """
        try:
            token = provider()
            if inspect.isawaitable(token):
                token = await token
        except Exception as exc:
            raise _TokenUnavailable(f"token_provider failed: {exc!r}") from exc
        if (not isinstance(token, str) or _claims(token).get("sub") != self.sub
                or (token_expiry(token) or math.inf) <= time.time()):
            raise _TokenUnavailable("token_provider returned no unexpired token of the user")
        self._take(token)
        return token


# ---------------------------------------------------------- transport
@attrs.frozen
class _Endpoint:
    """Where ``ws://HOST:PORT/PATH`` (or ``wss://``) points."""

    url: str
    host: str
    port: int
    host_header: str
    resource: str
    tls: bool

    @classmethod
    def parse(cls, url: str) -> _Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        tls = parts.scheme == "wss"
        resource = urlunsplit(("", "", parts.path or "/", parts.query, ""))
        return cls(url, parts.hostname, parts.port or (443 if tls else 80),
                   parts.netloc.rpartition("@")[2], resource, tls)

    async def open_stream(self) -> trio.abc.Stream:
        """A TCP (or TLS over TCP) stream to the server; raises OSError when refused."""
        if self.tls:
            return await trio.open_ssl_over_tcp_stream(
                self.host, self.port, ssl_context=ssl.create_default_context(),
                https_compatible=True)
        return await trio.open_tcp_stream(self.host, self.port)


@final
class _Link(trio.abc.Stream):
    """The byte stream under one WebSocket: it says when it ended, and the client can cut it.

    trio-websocket waits for the server's answer to its opening handshake forever, even once
    the connection is gone; :attr:`ended` lets the client stop waiting.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ended = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    # trio.abc.Stream requires it; trio-websocket never calls it (so: no cover).
    async def wait_send_all_might_not_block(self) -> None:  # pragma: no cover
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        return data

    async def aclose(self) -> None:
        """Closes the connection at once, without a WebSocket close frame."""
        self.ended.set()
        await self.stream.aclose()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


_RETRYABLE: Final = (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError,
                     LocalProtocolError, _TokenUnavailable)
"""Connection failures another try may get past. trio-websocket's reader can raise
wsproto's LocalProtocolError when the server pings a socket that is closing: a lost socket too."""


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _fatal_reason(error: Exception, *, can_refresh: bool) -> str | None:
    """Why ``error`` ends the chat; None when another connection may succeed.

    Raises:
        Exception: ``error`` itself when it is not a connection failure (a bug).
    """
    for leaf in _leaves(error):
        if isinstance(leaf, _GiveUp):
            return str(leaf)
        if isinstance(leaf, ConnectionRejected) and leaf.status_code in FATAL_STATUSES:
            return f"handshake rejected with HTTP {leaf.status_code}"
        closed = leaf.reason if isinstance(leaf, ConnectionClosed) else None
        if closed is not None and closed.code == CLOSE_TOKEN_EXPIRED and not can_refresh:
            return "token expired (close 4001) and no token_provider to refresh it"
        if not isinstance(leaf, _RETRYABLE):
            raise error
    return None


def _describe(error: BaseException) -> str:
    return ", ".join(repr(leaf) for leaf in _leaves(error))


# --------------------------------------------------------------- runs
@final
class _Run:
    """What the client holds of one run it is following."""

    __slots__ = ("last_acked", "last_seq", "request_id", "run_id", "send", "start_frame")

    def __init__(
        self, request_id: str, start_frame: str, send: trio.MemorySendChannel[Any]
    ) -> None:
        self.request_id = request_id
        self.start_frame = start_frame
        self.send = send
        self.run_id: str | None = None
        self.last_seq = 0
        self.last_acked = 0


@final
class Chat:
    """One chat session over a self-healing socket; create it with :func:`open_chat`.

    Attributes:
        url: The server's endpoint.
        reconnects: Sockets opened after the first one.
        refreshes: Token refreshes the server confirmed (``refreshed`` frames).
    """

    def __init__(
        self, url: str, token: str, *, ack_every: int, reconnect_budget_s: float,
        backoff: Backoff, connect_timeout_s: float, token_provider: TokenProvider | None,
        refresh_margin_s: float | None,
    ) -> None:
        _check_settings(ack_every, reconnect_budget_s, connect_timeout_s, refresh_margin_s)
        self._endpoint = _Endpoint.parse(url)
        self.url = url
        self.ack_every = ack_every
        self.reconnect_budget_s = reconnect_budget_s
        self.backoff = backoff
        self.connect_timeout_s = connect_timeout_s
        self.reconnects = 0
        self.refreshes = 0
        self._creds = _Credentials(token, token_provider, refresh_margin_s)
        self._link: _Link | None = None
        self._ws: WebSocketConnection | None = None
        self._by_request: dict[str, _Run] = {}
        self._by_run: dict[str, _Run] = {}
        self._dead: ChatUnavailable | None = None
        self._connected_once = False
        self._closing = False
        self._interrupt = trio.CancelScope()
        self._stopped = trio.Event()

    async def run(
        self,
        agent: str,
        message: str,
        *,
        request_id: str | None = None,
        thread_id: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Starts a run and yields its events (dicts of the wire envelope) through agent_completed.

        While the socket is down the iteration waits; the run goes on from where it was once
        the client has reconnected.

        Raises:
            ChatError: the server refused the run (or its resume).
            ChatUnavailable: the chat gave up (see :func:`open_chat`).
        """
        if self._dead is not None:
            raise self._dead
        request_id = request_id or secrets.token_hex(16)
        send, receive = trio.open_memory_channel[Any](math.inf)
        run = _Run(request_id, _start_frame(request_id, agent, message, thread_id, context), send)
        self._by_request[request_id] = run
        try:
            await self._send(run.start_frame)
            while True:  # the channel is never closed: a run ends with its terminal event
                item = await receive.receive()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item["type"] == TERMINAL:
                    return
        finally:
            self._forget(run)

    async def cancel(self, run_id: str) -> None:
        """Asks the server to cancel a run (its events still arrive, ending ``cancelled``)."""
        await self._send(json.dumps({"type": "cancel", "run_id": run_id}))

    async def drop_connection(self) -> None:
        """Cuts the current socket's connection without a close frame, as a network failure
        would (for tests and demos); the chat reconnects and resumes its runs."""
        link = self._link
        if link is not None:
            await link.aclose()

    # --------------------------------------------------------- connection
    async def _connection_loop(self, task_status: trio.TaskStatus[None]) -> None:
        """Keeps a socket open until the chat closes or gives up.

        Signals ``task_status`` once the first socket is up; raises :exc:`ChatUnavailable`
        when the chat gave up before that.
        """
        retry = _Reconnect(self.backoff, self.reconnect_budget_s, trio.current_time())
        try:
            while True:
                error: Exception | None = None
                with self._interruptible():
                    error = await self._try_connection(retry, task_status)
                if self._closing or error is None:
                    break
                delay = self._next_delay(retry, error)
                if delay is None:
                    break
                with self._interruptible():
                    await trio.sleep(delay)
        finally:
            self._stopped.set()
        if self._dead is not None and not self._connected_once:
            raise self._dead

    def _interruptible(self) -> trio.CancelScope:
        """A cancel scope that closing the chat cancels (around waits and reading)."""
        self._interrupt = trio.CancelScope()
        if self._closing:
            self._interrupt.cancel()
        return self._interrupt

    async def _try_connection(
        self, retry: _Reconnect, task_status: trio.TaskStatus[None]
    ) -> Exception | None:
        """One socket from connect to close; returns what ended it, None for a polite close."""
        try:
            await self._connect(retry, task_status)
        except Exception as exc:
            return exc
        return None

    def _next_delay(self, retry: _Reconnect, error: Exception) -> float | None:
        """How long to wait before reconnecting; None after giving up (the reason is set)."""
        reason = _fatal_reason(error, can_refresh=self._creds.provider is not None)
        delay = None if reason else retry.next_delay(trio.current_time(), random.random())
        if reason is None and delay is None:
            reason = f"no connection for {self.reconnect_budget_s:g} s"
        if reason is not None:
            self._give_up(f"{reason} (last error: {_describe(error)})", error)
        else:
            log.info("%s: reconnecting in %.3f s after %s", self._endpoint.url, delay,
                     _describe(error))
        return delay

    def _give_up(self, reason: str, error: Exception) -> None:
        self._dead = ChatUnavailable(f"{self._endpoint.url}: {reason}")
        self._dead.__cause__ = error
        self._fail_all(self._dead)

    async def _connect(self, retry: _Reconnect, task_status: trio.TaskStatus[None]) -> None:
        """Opens a socket and serves it until it ends; returns only when the chat closes.

        Raises:
            Exception: what ended the socket; failures of its tasks come in an exception group.
        """
        deadline = min(retry.deadline, trio.current_time() + self.connect_timeout_s)
        with trio.fail_at(deadline):
            token = await self._token_for_connect()
            stream = await self._endpoint.open_stream()
        async with _Link(stream) as link, trio.open_nursery() as nursery:
            with trio.fail_at(deadline):
                ws = await self._handshake(nursery, link, token)
            nursery.start_soon(self._keep_token_fresh, ws)
            await self._serve(link, ws, retry, task_status)
            nursery.cancel_scope.cancel()

    async def _handshake(self, nursery: trio.Nursery, link: _Link, token: str
                         ) -> WebSocketConnection:
        """The opening handshake over ``link``; the socket's reader task runs in ``nursery``.

        Raises:
            HandshakeError: the connection ended before the server answered.
        """
        with trio.CancelScope() as hung_up:
            nursery.start_soon(_cancel_when_set, link.ended, hung_up)
            # wrap_client_stream takes any trio Stream (its documentation says so); its
            # annotation names only the stream types open_websocket itself creates.
            return await trio_websocket.wrap_client_stream(
                nursery, cast("trio.SocketStream", link), self._endpoint.host_header,
                self._endpoint.resource,
                extra_headers=[(b"authorization", f"Bearer {token}".encode())])
        raise HandshakeError("the connection ended during the opening handshake")

    async def _serve(self, link: _Link, ws: WebSocketConnection, retry: _Reconnect,
                     task_status: trio.TaskStatus[None]) -> None:
        """Resyncs the runs and reads frames until the socket ends (raises) or the chat
        closes (closes the socket with 1000)."""
        self._link, self._ws = link, ws
        retry.connected(trio.current_time())
        if self._connected_once:
            self.reconnects += 1
        else:
            self._connected_once = True
            task_status.started()
        try:
            with self._interruptible():
                await self._resync(ws)
                await self._read(ws)
            await ws.aclose()
        finally:
            self._link = self._ws = None
            retry.disconnected(trio.current_time())

    async def _close(self) -> None:
        """Stops reconnecting, closes the socket politely and waits for that to be done."""
        self._closing = True
        self._interrupt.cancel()
        await self._stopped.wait()

    # ------------------------------------------------------------ tokens
    async def _token_for_connect(self) -> str:
        """The newest token, renewed first when it is due.

        Raises:
            _GiveUp: the token expired and there is no provider.
            _TokenUnavailable: the provider failed.
        """
        creds = self._creds
        due, now = creds.refresh_at(), time.time()
        if due is None or now < due:
            return creds.token
        if creds.provider is not None:
            return await creds.renew(creds.provider)
        if creds.exp is not None and now >= creds.exp:
            raise _GiveUp("token expired and no token_provider to renew it")
        return creds.token

    async def _keep_token_fresh(self, ws: WebSocketConnection) -> None:
        """Sends ``refresh`` with a new token before the current one expires (needs a provider).

        A provider that fails is logged; the server then closes the socket with 4001 and the
        reconnect asks the provider again.
        """
        creds = self._creds
        while creds.provider is not None and (due := creds.refresh_at()) is not None:
            await trio.sleep(max(0.0, due - time.time()))
            try:
                token = await creds.renew(creds.provider)
            except _TokenUnavailable as exc:
                log.warning("%s: %s; the server will close the socket at exp",
                            self._endpoint.url, exc)
                return
            with suppress(ConnectionClosed):
                await ws.send_message(json.dumps({"type": "refresh", "token": token}))

    # ------------------------------------------------------------ frames
    async def _resync(self, ws: WebSocketConnection) -> None:
        """After a (re)connect: resume accepted runs, re-send starts that were never accepted."""
        for run in list(self._by_request.values()):
            if run.run_id is None:
                await ws.send_message(run.start_frame)
            else:
                await ws.send_message(_resume(run.run_id, run.last_seq))

    async def _read(self, ws: WebSocketConnection) -> None:
        while True:
            frame = json.loads(await ws.get_message())
            kind = frame.get("type")
            if kind == "run_accepted":
                await self._accepted(frame)
            elif kind == "error":
                self._error(frame)
            elif kind == "refreshed":
                self.refreshes += 1
            elif "seq" in frame and "run_id" in frame:
                await self._event(frame)

    async def _accepted(self, frame: Mapping[str, Any]) -> None:
        run = self._by_request.get(frame["request_id"])
        if run is None:
            return
        run.run_id = frame["run_id"]
        self._by_run[run.run_id] = run
        if frame.get("duplicate"):
            # A repeated start subscribes nothing: ask for what we miss explicitly.
            await self._send(_resume(run.run_id, run.last_seq))

    async def _event(self, frame: dict[str, Any]) -> None:
        run = self._by_run.get(frame["run_id"])
        if run is None or frame["seq"] <= run.last_seq:
            return  # a repeat after a resume, or a run we no longer follow
        if frame["seq"] != run.last_seq + 1:
            log.warning("gap in run %s at seq %d: resuming", frame["run_id"], run.last_seq)
            await self._send(_resume(frame["run_id"], run.last_seq))
            return
        run.last_seq = frame["seq"]
        run.send.send_nowait(frame)
        if frame["type"] == TERMINAL or run.last_seq - run.last_acked >= self.ack_every:
            run.last_acked = run.last_seq
            await self._send(json.dumps({"type": "ack", "run_id": frame["run_id"],
                                         "seq": run.last_seq}))

    def _error(self, frame: Mapping[str, Any]) -> None:
        run = self._by_request.get(frame.get("request_id", "")) or self._by_run.get(
            frame.get("run_id", ""))
        if run is not None:
            run.send.send_nowait(ChatError(frame))
        elif frame.get("field") == "token":
            log.warning("the server refused the refreshed token: %s", frame.get("message"))
        else:
            log.warning("server error: %s", frame)

    async def _send(self, text: str) -> None:
        """Sends now if connected; otherwise the next resync sends what matters."""
        ws = self._ws
        if ws is None:
            return
        with suppress(ConnectionClosed):
            await ws.send_message(text)

    def _forget(self, run: _Run) -> None:
        self._by_request.pop(run.request_id, None)
        if run.run_id is not None:
            self._by_run.pop(run.run_id, None)

    def _fail_all(self, exc: Exception) -> None:
        for run in self._by_request.values():
            run.send.send_nowait(exc)


def _check_settings(ack_every: int, reconnect_budget_s: float, connect_timeout_s: float,
                    refresh_margin_s: float | None) -> None:
    if ack_every < 1:
        raise ValueError(f"ack_every must be >= 1, got {ack_every!r}")
    for name, value in (("reconnect_budget_s", reconnect_budget_s),
                        ("connect_timeout_s", connect_timeout_s)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    if refresh_margin_s is not None and not refresh_margin_s >= 0:
        raise ValueError(f"refresh_margin_s must be >= 0, got {refresh_margin_s!r}")


def _resume(run_id: str, after_seq: int) -> str:
    return json.dumps({"type": "resume", "run_id": run_id, "after_seq": after_seq})


@asynccontextmanager
async def open_chat(
    url: str,
    token: str,
    *,
    ack_every: int = 16,
    reconnect_budget_s: float = 60.0,
    backoff: Backoff = DEFAULT_BACKOFF,
    connect_timeout_s: float = 10.0,
    token_provider: TokenProvider | None = None,
    refresh_margin_s: float | None = None,
) -> AsyncIterator[Chat]:
    """Connects to the server at ``url`` (``ws://HOST:PORT/ws``) as the token's user.

    Blocks until the first socket is up. Lost sockets are reconnected, waiting ``backoff``
    between tries (HTTP 429, refused or failed connections, a close by the server); the chat
    gives up once no socket has been up for ``reconnect_budget_s`` (a socket that stays up for
    1 s starts the budget afresh). Leaving the block closes the socket with code 1000.

    Args:
        url: The server's ``ws://`` (or ``wss://``) endpoint; the token goes in a header.
        token: A JWT of the server (``sub`` = the user).
        ack_every: Ack a run every this many events (and at its end).
        reconnect_budget_s: How long the server may stay out of reach.
        backoff: Waits between tries.
        connect_timeout_s: Bound on one TCP connect plus opening handshake.
        token_provider: Returns a new token for the same user (sync and non-blocking, or
            async). With it the client sends ``refresh`` ``refresh_margin_s`` before its token's
            ``exp`` and reconnects with the newest token; without it a socket closed at ``exp``
            (4001) ends the chat.
        refresh_margin_s: Default: 10 % of the token's remaining lifetime, 1 s to 60 s (never
            more than half the lifetime).

    Raises:
        ChatUnavailable: at once for HTTP 401, 403 or 404 or an expired token without a
            provider; after ``reconnect_budget_s`` of failed tries. From the iteration of
            :meth:`Chat.run` too once the chat has given up.
        ValueError: a setting out of range or ``url`` not a ws URL.
    """
    chat = Chat(url, token, ack_every=ack_every, reconnect_budget_s=reconnect_budget_s,
                backoff=backoff, connect_timeout_s=connect_timeout_s,
                token_provider=token_provider, refresh_margin_s=refresh_margin_s)
    async with unwrapping_groups(), trio.open_nursery() as nursery:
        await nursery.start(chat._connection_loop)
        try:
            yield chat
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await chat._close()
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ CLI
def format_event(event: Mapping[str, Any]) -> str:
    """One readable line for an event."""
    payload = event.get("payload", {})
    kind = event["type"]
    if kind == "agent_started":
        detail = payload.get("agent", "")
    elif kind == "agent_thinking":
        detail = payload.get("thought", "")
    elif kind == "tool_executing":
        detail = f"{payload.get('tool')} {json.dumps(payload.get('args'))}"
    elif kind == "tool_completed":
        outcome = payload.get("result", payload.get("error"))
        detail = f"{payload.get('tool')} {payload.get('status')}: {json.dumps(outcome)[:120]}"
    elif kind == "partial_result":
        detail = repr(payload.get("text", ""))
    else:
        outcome = payload.get("result", payload.get("error"))
        detail = f"{payload.get('status')}: {json.dumps(outcome)[:200]}"
    return f"[{event['seq']:>4}] {kind:<16} {detail}"


def chat_main(args: argparse.Namespace, config: Config) -> int:
    """``python -m harness chat``: one run, its events printed live."""
    if not config.auth_secret:
        print("error: set REGISTRY_AUTH_SECRET (or --auth-secret)", file=sys.stderr)
        return 2
    secret = config.auth_secret
    context = json.loads(args.context) if args.context else None
    return trio.run(_chat, args.url, lambda: mint_token(secret, args.user), args.agent,
                    args.message, context)


async def _chat(url: str, new_token: Callable[[], str], agent: str, message: str,
                context: Any) -> int:
    try:
        async with open_chat(url, new_token(), token_provider=new_token) as chat:
            async for event in chat.run(agent, message, context=context):
                print(format_event(event), flush=True)
                if event["type"] == TERMINAL:
                    return 0 if event["payload"]["status"] == "succeeded" else 1
    except (ChatError, ChatUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1


def _start_frame(request_id: str, agent: str, message: str, thread_id: str | None,
                 context: Mapping[str, Any] | None) -> str:
    """The ``start_agent`` frame's text (optional fields only when given)."""
    frame: dict[str, Any] = {"type": "start_agent", "request_id": request_id,
                             "agent": agent, "message": message}
    frame.update({k: v for k, v in (("thread_id", thread_id), ("context", context)) if v})
    return json.dumps(frame)
