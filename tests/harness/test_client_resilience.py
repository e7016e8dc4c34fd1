"""The reference client through failures: HTTP 429, refused connections, a server that hangs up
mid-handshake or restarts, an exhausted reconnect budget, fatal handshake answers, and tokens
that expire during a run.

Everything runs against real servers on 127.0.0.1 (``harness.serve``). Where the real server
cannot produce a situation on demand, a small TCP :class:`FrontDoor` sits in front of it: it
answers the next handshakes with an HTTP error, or hangs up, and otherwise pipes the bytes
through. The pure parts (backoff, budget, token margins) are tested without any I/O.
"""

from __future__ import annotations

import functools
import http
import math
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, Final

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from harness import demo_agents, serve
from harness.client import (
    Backoff,
    Chat,
    ChatUnavailable,
    _Reconnect,
    open_chat,
    refresh_margin,
    token_expiry,
)
from registry import Config
from tests.harness._support import (
    HOST,
    SECRET,
    TIMEOUT,
    Server,
    check_run,
    open_server,
    scripted,
    token,
)

#: A front-door answer: read the upgrade request, then close the connection without a word.
HANG_UP: Final = 0
#: Lifetime of the short tokens of the token tests (JWT ``exp`` is whole seconds: 1-2 s left).
TTL_S: Final = 2.0


# ================================================================ front door
@attrs.define(eq=False)
class FrontDoor:
    """A TCP listener between the client and the server (``upstream`` port; None: no server).

    It answers the next handshakes with the statuses queued in ``answers`` (:data:`HANG_UP`
    closes without answering), then pipes bytes to the server, or hangs up when there is none.
    With ``half_open``, a client that goes away leaves its server connection open and silent, as
    a dead network path would, until the server's keepalive gives up on it.

    Attributes:
        connections: TCP connections accepted so far.
        upstream_statuses: The HTTP status of each handshake the server answered through the door.
    """

    upstream: int | None
    answers: deque[int] = attrs.field(factory=deque)
    half_open: bool = False
    port: int = 0
    connections: int = 0
    upstream_statuses: list[int] = attrs.field(factory=list)

    def url(self, path: str = "/ws") -> str:
        return f"ws://{HOST}:{self.port}{path}"

    async def handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client:
            head = await _read_head(client)
            if self.answers:
                await _answer(client, self.answers.popleft())
            elif self.upstream is not None:
                await self._pipe(client, head, self.upstream)

    async def _pipe(self, client: trio.SocketStream, head: bytes, upstream: int) -> None:
        async with await trio.open_tcp_stream(HOST, upstream) as server:
            await server.send_all(head)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._server_to_client, server, client, nursery.cancel_scope)
                await _copy(client, server)
                nursery.cancel_scope.cancel()
            if self.half_open:
                await _copy(server, None)  # read and drop until the server hangs up

    async def _server_to_client(self, server: trio.SocketStream, client: trio.SocketStream,
                                scope: trio.CancelScope) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            first = await server.receive_some()
            self.upstream_statuses.append(_status(first))
            await client.send_all(first)
        await _copy(server, client)
        scope.cancel()


@asynccontextmanager
async def open_front_door(upstream: int | None, *answers: int, half_open: bool = False
                          ) -> AsyncIterator[FrontDoor]:
    door = FrontDoor(upstream, deque(answers), half_open)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, door.handle, 0,
                                                          host=HOST))
        door.port = listeners[0].socket.getsockname()[1]
        yield door
        nursery.cancel_scope.cancel()


async def _read_head(stream: trio.SocketStream) -> bytes:
    """The HTTP request head (all of it: a reset must not overtake the answer)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some()
        if not chunk:
            break
        head += chunk
    return head


async def _answer(stream: trio.SocketStream, status: int) -> None:
    if status == HANG_UP:
        return
    body = b"go away\n"
    await stream.send_all(
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


async def _copy(source: trio.SocketStream, sink: trio.SocketStream | None) -> None:
    """Moves bytes until ``source`` ends or either side breaks; ``sink`` None drops them."""
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some():
            if sink is not None:
                await sink.send_all(data)


def _status(response_head: bytes) -> int:
    parts = response_head.split(b" ", 2)
    return int(parts[1]) if response_head.startswith(b"HTTP/") and len(parts) > 1 else 0


# ============================================================ servers, helpers
def _free_port() -> int:
    """A port nothing listens on (until a test starts a server there)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def _serve_at(port: int, stop: trio.Event, done: trio.Event | None = None, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """The real server on a fixed ``port`` until ``stop``; sets ``done`` once it has exited."""
    try:
        await serve(Config(auth_secret=SECRET, shutdown_grace_s=2.0), host=HOST, port=port,
                    agents=demo_agents(), stop=stop, task_status=task_status)
    finally:
        if done is not None:
            done.set()


async def _serve_later(port: int, after: trio.Event, delay_s: float, stop: trio.Event,
                       listening: trio.Event) -> None:
    """A server that comes up ``delay_s`` after ``after`` (a slow start or restart)."""
    await after.wait()
    await trio.sleep(delay_s)  # the restart's own duration, not a wait for a condition
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_at, port, stop)
        listening.set()


async def collect(chat: Chat, agent: str, message: str, **kwargs: Any) -> list[dict[str, Any]]:
    with trio.fail_after(TIMEOUT):
        return [event async for event in chat.run(agent, message, **kwargs)]


async def collect_dropping(chat: Chat, at_seq: int, context: dict[str, Any],
                           before_drop: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """A scripted run's events; at ``at_seq`` calls ``before_drop`` and cuts the socket."""
    events = []
    with trio.fail_after(TIMEOUT):
        async for event in chat.run("scripted", "through the storm", context=context):
            events.append(event)
            if event["seq"] == at_seq:
                before_drop()
                await chat.drop_connection()
    return events


def assert_every_event_once(events: list[dict[str, Any]], tools: int, tokens: int) -> None:
    assert check_run(events)["status"] == "succeeded"
    assert len(events) == 3 + 2 * tools + tokens


# ================================================================ pure parts
def test_backoff_ceilings_double_from_the_base_up_to_the_cap() -> None:
    ceilings = [Backoff().ceiling(n) for n in range(8)]
    assert ceilings == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert Backoff().ceiling(100_000) == 2.0  # no overflow however long the outage
    assert Backoff(base_s=1, factor=3, cap_s=10).ceiling(2) == 9.0


@given(retry=st.integers(0, 10_000), uniform=st.floats(0.0, 1.0, exclude_max=True),
       base_s=st.floats(0.001, 1.0), factor=st.floats(1.0, 10.0), cap_s=st.floats(0.001, 60.0))
def test_backoff_waits_are_full_jitter_below_a_rising_ceiling(
    retry: int, uniform: float, base_s: float, factor: float, cap_s: float,
) -> None:
    backoff = Backoff(base_s=base_s, factor=factor, cap_s=cap_s)
    ceiling = backoff.ceiling(retry)
    assert 0.0 <= backoff.delay(retry, uniform) <= ceiling <= cap_s
    assert backoff.delay(retry, 0.0) == 0.0
    assert backoff.ceiling(retry + 1) >= ceiling
    if retry <= 30:
        assert ceiling == pytest.approx(min(cap_s, base_s * factor**retry))


@pytest.mark.parametrize("settings", [{"base_s": 0}, {"cap_s": -1}, {"factor": 0.5}])
def test_backoff_refuses_settings_that_would_not_back_off(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**settings)


def test_the_budget_runs_from_the_last_socket_up_and_is_never_overslept() -> None:
    policy = _Reconnect(Backoff(), budget_s=10.0, now=100.0)
    now, tries = 100.0, 0
    while (delay := policy.next_delay(now, 0.999)) is not None:
        now, tries = now + delay, tries + 1
    assert now == pytest.approx(110.0) and tries >= 8
    policy.connected(now)
    policy.disconnected(now + 0.5)  # a socket that came up: the budget starts again
    assert policy.deadline == pytest.approx(now + 10.5)
    assert policy.retry == tries  # ... but up so briefly that the backoff keeps growing
    policy.connected(200.0)
    policy.disconnected(205.0)  # a socket that stayed up: the backoff starts again too
    assert (policy.retry, policy.deadline) == (0, 215.0)


@pytest.mark.parametrize(("lifetime_s", "margin_s"), [
    (3600.0, 60.0), (300.0, 30.0), (20.0, 2.0), (5.0, 1.0), (1.5, 0.75), (0.0, 0.0), (-5.0, 0.0),
])
def test_the_default_refresh_margin_is_a_tenth_of_the_lifetime_within_bounds(
    lifetime_s: float, margin_s: float,
) -> None:
    assert refresh_margin(lifetime_s) == pytest.approx(margin_s)


def test_an_explicit_refresh_margin_is_kept_within_half_the_lifetime() -> None:
    assert refresh_margin(3600.0, 5.0) == 5.0
    assert refresh_margin(4.0, 5.0) == 2.0


def test_token_expiry_reads_exp_without_the_secret() -> None:
    expected = time.time() + 100
    assert token_expiry(token("alice", ttl=100)) == pytest.approx(expected, abs=1.01)
    assert token_expiry("not-a-jwt") is None


# ========================================================== reconnect, backoff
async def test_429_answers_are_retried_with_backoff_and_the_run_loses_nothing(
    server: Server,
) -> None:
    async with open_front_door(server.port) as door, open_chat(door.url(), token("alice")) as chat:
        events = await collect_dropping(chat, 5, scripted(tools=2, tokens=30, delay_ms=5),
                                        lambda: door.answers.extend([429] * 4))
    assert_every_event_once(events, tools=2, tokens=30)
    assert door.connections == 1 + 4 + 1
    assert chat.reconnects == 1


async def test_a_half_open_socket_the_server_still_counts_is_waited_out() -> None:
    async with (
        open_server(max_connections_per_user=1, ping_interval_s=0.5, ping_timeout_s=1.0) as server,
        open_front_door(server.port, half_open=True) as door,
        open_chat(door.url(), token("alice")) as chat,
    ):
        events = await collect_dropping(chat, 5, scripted(tools=1, tokens=40, delay_ms=20))
    assert_every_event_once(events, tools=1, tokens=40)
    assert door.upstream_statuses.count(429) >= 1  # the server still held the dead socket
    assert door.upstream_statuses.count(101) == 2
    assert chat.reconnects == 1


async def test_open_chat_retries_until_the_server_lets_it_in(server: Server) -> None:
    async with (
        open_front_door(server.port, 429, 503, HANG_UP, 429) as door,
        open_chat(door.url(), token("alice")) as chat,
    ):
        events = await collect(chat, "scripted", "hi", context=scripted(tools=1, tokens=3))
    assert_every_event_once(events, tools=1, tokens=3)
    assert door.connections == 5


async def test_a_server_that_hangs_up_mid_handshake_is_retried_at_once(server: Server) -> None:
    async with open_front_door(server.port, HANG_UP, HANG_UP) as door:
        with trio.fail_after(3.0):  # far below connect_timeout_s: the hang-up is noticed
            async with open_chat(door.url(), token("alice"), connect_timeout_s=10.0) as chat:
                events = await collect(chat, "echo", "hello")
    assert_every_event_once(events, tools=0, tokens=0)
    assert door.connections == 3


async def test_open_chat_waits_for_a_server_that_is_still_starting() -> None:
    port, stop, listening, now = _free_port(), trio.Event(), trio.Event(), trio.Event()
    now.set()
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_later, port, now, 2.0, stop, listening)
        async with open_chat(f"ws://{HOST}:{port}/ws", token("alice")) as chat:
            connected_after = trio.current_time() - began
            events = await collect(chat, "echo", "finally")
        stop.set()
    assert_every_event_once(events, tools=0, tokens=0)
    assert 2.0 <= connected_after < 2.0 + 2 * Backoff().cap_s
    assert chat.reconnects == 0


async def test_a_chat_gets_through_a_server_restart() -> None:
    port = _free_port()
    first_stop, first_done, second_stop, listening = (trio.Event() for _ in range(4))
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_at, port, first_stop, first_done)
        async with open_chat(f"ws://{HOST}:{port}/ws", token("alice")) as chat:
            before = await collect(chat, "echo", "before")
            nursery.start_soon(_serve_later, port, first_done, 2.0, second_stop, listening)
            first_stop.set()  # down for good, then up again 2 s later on the same port
            await listening.wait()
            after = await collect(chat, "echo", "after")
        second_stop.set()
    assert [e["payload"].get("result") for e in (before[-1], after[-1])] == ["before", "after"]
    assert chat.reconnects == 1


# ===================================================================== giving up
@pytest.mark.parametrize("server_side", ["nothing listening", "hangs up"])
async def test_open_chat_gives_up_when_the_budget_is_spent(server_side: str) -> None:
    async with open_front_door(None) as door:
        url = door.url() if server_side == "hangs up" else f"ws://{HOST}:{_free_port()}/ws"
        began = trio.current_time()
        with pytest.raises(ChatUnavailable, match="no connection for 1 s"):
            async with open_chat(url, token("alice"), reconnect_budget_s=1.0):
                pytest.fail("connected to no server")
        elapsed = trio.current_time() - began
    assert 1.0 <= elapsed < 1.5
    if server_side == "hangs up":
        assert door.connections >= 5  # it kept trying within the budget


async def test_a_run_raises_chat_unavailable_once_the_server_stays_away_for_the_budget(
    server: Server,
) -> None:
    dropped_at = math.inf

    def shut_the_door() -> None:
        nonlocal dropped_at
        door.upstream = None
        dropped_at = trio.current_time()

    async with (
        open_front_door(server.port) as door,
        open_chat(door.url(), token("alice"), reconnect_budget_s=1.0) as chat,
    ):
        with pytest.raises(ChatUnavailable, match="no connection for 1 s"):
            await collect_dropping(chat, 3, scripted(tokens=200, delay_ms=10), shut_the_door)
        elapsed = trio.current_time() - dropped_at
        with pytest.raises(ChatUnavailable):
            await collect(chat, "echo", "the chat is over")
    assert 1.0 <= elapsed < 1.5


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_fatal_handshake_answers_give_up_at_once(status: int) -> None:
    async with open_front_door(None, *[status] * 10) as door:
        with pytest.raises(ChatUnavailable, match=f"HTTP {status}"):
            async with open_chat(door.url(), token("alice")):
                pytest.fail("connected")
    assert door.connections == 1


@pytest.mark.parametrize(("jwt", "path", "status"), [
    (token("alice", secret="another-secret-" + "x" * 32), "/ws", 401),
    (token("alice"), "/elsewhere", 404),
])
async def test_the_real_servers_refusals_are_fatal(
    server: Server, jwt: str, path: str, status: int,
) -> None:
    async with open_front_door(server.port) as door:
        with pytest.raises(ChatUnavailable, match=f"HTTP {status}"):
            async with open_chat(door.url(path), jwt):
                pytest.fail("connected")
    assert door.connections == 1


# ======================================================================== tokens
def _minter(user: str = "alice", ttl: float = TTL_S) -> Callable[[], str]:
    return lambda: token(user, ttl=ttl)


async def _async_minter() -> str:
    await trio.lowlevel.checkpoint()
    return token("alice", ttl=TTL_S)


@pytest.mark.parametrize("provider", [_minter(), _async_minter], ids=["sync", "async"])
async def test_a_run_longer_than_the_token_lifetime_completes_with_refreshes(
    server: Server, provider: Callable[[], Any],
) -> None:
    """Needs the server's token lifetime (4001 at exp) and ``refresh`` support."""
    async with open_chat(server.url(), token("alice", ttl=TTL_S), token_provider=provider) as chat:
        events = await collect(chat, "scripted", "long", context=scripted(tokens=40,
                                                                          delay_ms=100))
    assert_every_event_once(events, tools=1, tokens=40)
    assert events[-1]["ts"] - events[0]["ts"] > TTL_S
    assert chat.refreshes >= 2
    assert chat.reconnects == 0  # refreshed in place: the server never closed the socket


async def test_without_a_token_provider_the_chat_ends_when_the_token_expires(
    server: Server,
) -> None:
    """Needs the server's token lifetime (4001 at exp)."""
    jwt = token("alice", ttl=TTL_S)
    expires = token_expiry(jwt)
    assert expires is not None
    async with open_chat(server.url(), jwt) as chat:
        with pytest.raises(ChatUnavailable, match="token expired"):
            await collect(chat, "scripted", "long", context=scripted(tokens=60, delay_ms=100))
    assert time.time() < expires + 1.5  # at the token's exp, not at the end of the run


async def test_a_refresh_that_misses_the_deadline_reconnects_with_a_fresh_token(
    server: Server,
) -> None:
    """Needs the server's token lifetime (4001 at exp)."""
    first = token("alice", ttl=TTL_S)
    expires = token_expiry(first)
    assert expires is not None
    calls = 0

    async def slow_then_fast() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:  # a token service slower than the token's remaining life
            await trio.sleep(expires - time.time() + 1.0)
        return token("alice", ttl=60)

    async with open_chat(server.url(), first, token_provider=slow_then_fast) as chat:
        events = await collect(chat, "scripted", "long", context=scripted(tokens=40,
                                                                          delay_ms=100))
    assert_every_event_once(events, tools=1, tokens=40)
    assert chat.reconnects == 1
    assert calls == 2


async def test_an_expired_token_is_renewed_before_connecting(server: Server) -> None:
    async with open_chat(server.url(), token("alice", ttl=-10),
                         token_provider=_minter(ttl=60)) as chat:
        events = await collect(chat, "echo", "fresh")
    assert_every_event_once(events, tools=0, tokens=0)


async def test_an_expired_token_without_a_provider_gives_up_before_connecting() -> None:
    async with open_front_door(None) as door:
        with pytest.raises(ChatUnavailable, match="token expired"):
            async with open_chat(door.url(), token("alice", ttl=-10)):
                pytest.fail("connected")
    assert door.connections == 0


async def test_a_provider_token_of_another_user_is_never_used(server: Server) -> None:
    async with open_front_door(server.port) as door:
        with pytest.raises(ChatUnavailable, match="no unexpired token of the user"):
            async with open_chat(door.url(), token("alice", ttl=-10), reconnect_budget_s=0.5,
                                 token_provider=_minter("mallory", ttl=60)):
                pytest.fail("connected as another user")
    assert door.connections == 0
