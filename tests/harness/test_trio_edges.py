"""Edges of the trio server (``harness._server``) a client or an operator can hit: start-up
refusals, bursts of connections, handshakes that break off, bad upgrades, and a connection
whose own handler fails (the server keeps serving everyone else).

The server runs in this trio run (as :func:`open_server` runs it), so every wait is on a
real network event; "the slot was freed" is shown by a later client getting in.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from harness import demo_agents, serve
from harness._ops import Operations
from harness._session import ChatSession
from registry import Config
from tests.harness._support import (
    HOST,
    SECRET,
    TIMEOUT,
    Server,
    check_run,
    connect,
    http_get,
    open_server,
    scripted,
    token,
)


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


async def _serve_fails(config: Config, port: int = 0) -> BaseException:
    """What ``serve`` raises at start (one exception, whether or not in a group)."""
    with pytest.raises(Exception) as failed:  # a group or not: unwrapped below
        with trio.fail_after(TIMEOUT):
            await serve(config, host=HOST, port=port, agents=demo_agents())
    (leaf,) = list(_leaves(failed.value))
    return leaf


async def _raw_answer(server: Server, data: bytes, *, half_close: bool = False) -> bytes:
    """Sends ``data`` on a connection of its own; everything the server writes before EOF."""
    with trio.fail_after(TIMEOUT):
        async with await trio.open_tcp_stream(HOST, server.port) as stream:
            await stream.send_all(data)
            if half_close:
                await stream.send_eof()
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
    return answer


async def _until_healthy(server: Server) -> None:
    """Polls /healthz until it is answered 200 (bounded by TIMEOUT)."""
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                status, _ = await http_get(server, "/healthz")
            except (OSError, IndexError, ValueError):  # closed at once: no slot yet
                status = 0
            if status == 200:
                return
            await trio.sleep(0.02)


# =================================================================== start-up
async def test_the_server_does_not_start_without_an_auth_secret() -> None:
    failed = await _serve_fails(Config())
    assert isinstance(failed, ValueError)
    assert "auth_secret" in str(failed)


async def test_a_port_already_listened_on_stops_the_server_at_start() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        failed = await _serve_fails(Config(auth_secret=SECRET), taken.getsockname()[1])
    assert isinstance(failed, OSError)
    assert failed.errno == errno.EADDRINUSE


# ================================================================ connections
async def test_a_burst_of_connections_waiting_at_once_is_all_answered() -> None:
    """More connections than one pass of the accept loop takes (64) are waiting together:
    each gets its answer."""
    request = f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    async with open_server() as server:
        clients = []
        for _ in range(150):  # connected and sent in the kernel, before the server runs
            plain = socket.create_connection((HOST, server.port))
            plain.sendall(request)
            clients.append(trio.socket.from_stdlib_socket(plain))
        answers: list[bytes] = []
        with trio.fail_after(TIMEOUT):
            for client in clients:
                with client:
                    data = b""
                    while chunk := await client.recv(65536):
                        data += chunk
                    answers.append(data)
    assert len(answers) == 150
    assert all(a.startswith(b"HTTP/1.1 200 ") and a.endswith(b'{"status":"ok"}') for a in answers)


@pytest.mark.parametrize("how", ["garbage", "eof", "reset"])
async def test_a_handshake_that_breaks_off_frees_its_slot_at_once(how: str) -> None:
    """At ``max_pending_handshakes`` 1 (and a handshake timeout far beyond the test), the
    next client gets in only once the broken handshake gave its slot back."""
    async with open_server(max_pending_handshakes=1, handshake_timeout_s=600) as server:
        if how == "garbage":
            answer = await _raw_answer(server, b"\x16\x03\x01\x02\x00 not http\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 ")
            assert answer.endswith(b"\r\n\r\nbad request\n")
        elif how == "eof":
            answer = await _raw_answer(server, b"GET /healthz HTTP/1.1\r\n", half_close=True)
            assert answer == b""  # nothing to answer: the request never came whole
        else:
            stream = await trio.open_tcp_stream(HOST, server.port)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            await stream.send_all(b"GET /hea")
            await stream.aclose()  # RST
        await _until_healthy(server)


def _upgrade(user: str, **headers: str) -> bytes:
    lines = ["GET /ws HTTP/1.1", f"Host: {HOST}", "Upgrade: websocket", "Connection: Upgrade",
             f"Authorization: Bearer {token(user)}",
             *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


@pytest.mark.parametrize("headers", [
    {},
    {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "8"},
], ids=["no key", "version 8"])
async def test_a_bad_upgrade_is_400_and_keeps_no_connection_slot(headers: dict[str, str]) -> None:
    async with open_server(max_connections_per_user=1) as server:
        for _ in range(3):
            answer = await _raw_answer(server, _upgrade("alice", **headers))
            assert answer.startswith(b"HTTP/1.1 400 ")
            assert answer.endswith(b"\r\n\r\nbad websocket upgrade\n")
        async with connect(server, "alice") as client:  # the user's one slot is free
            await client.assert_usable()


# ============================================================ a handler failing
@pytest.fixture
def broken_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GET /boom`` makes the operations surface raise (a bug in one request's handling)."""
    answer = Operations.answer

    def failing(self: Operations, path: str | None, *args: Any) -> tuple[int, bytes, str]:
        if path == "/boom":
            raise RuntimeError("a bug in one request's handling")
        return answer(self, path, *args)

    monkeypatch.setattr(Operations, "answer", failing)


@pytest.mark.usefixtures("broken_route")
async def test_a_request_whose_handling_fails_is_closed_and_the_server_serves_on() -> None:
    async with open_server(max_pending_handshakes=1, handshake_timeout_s=600) as server:
        request = f"GET /boom HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
        assert await _raw_answer(server, request) == b""  # closed without an answer
        status, body = await http_get(server, "/healthz")  # and its slot is free
        assert (status, body) == (200, b'{"status":"ok"}')


@pytest.fixture
def broken_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client message containing ``boom`` makes the session raise (a bug in one socket)."""
    handle = ChatSession.handle

    async def failing(self: ChatSession, text: str | None) -> None:
        if text is not None and "boom" in text:
            raise RuntimeError("a bug in one socket's handling")
        await handle(self, text)

    monkeypatch.setattr(ChatSession, "handle", failing)


@pytest.mark.usefixtures("broken_session")
async def test_a_socket_whose_handling_fails_is_closed_1011_and_only_it() -> None:
    async with (
        open_server(max_connections_per_user=2) as server,
        connect(server, "alice") as bystander,
    ):
        running = await bystander.start(context=scripted(tools=1, tokens=20, delay_ms=20))
        async with connect(server, "alice") as victim:
            await victim.send({"type": "ping", "id": "boom"})
            code, frames = await victim.until_closed()
        assert (code, frames) == (1011, [])
        assert check_run(await bystander.run_events(running["run_id"]))["status"] == "succeeded"
        async with connect(server, "alice") as again:  # the failed socket's slot is free
            await again.assert_usable()


# ============================================================ cancelled, not stopped
async def test_cancelling_serve_ends_it_promptly_and_drops_its_sockets() -> None:
    """``serve`` runs until ``stop`` is set *or the caller cancels*: cancelled, it returns
    at once (no graceful drain) and its sockets end."""
    config = Config(auth_secret=SECRET, shutdown_grace_s=2.0)
    serving = trio.CancelScope()
    stopped = trio.Event()

    async def run_server(task_status: trio.TaskStatus[int]) -> None:
        with serving:
            await serve(config, host=HOST, port=0, agents=demo_agents(), task_status=task_status)
        stopped.set()

    async with trio.open_nursery() as nursery:
        server = Server(await nursery.start(run_server), config)
        async with connect(server, "alice") as client:
            accepted = await client.start(context=scripted(tools=0, tokens=1000, delay_ms=10))
            await client.events_until(accepted["run_id"], lambda e: e["type"] == "agent_started")
            cancelled_at = trio.current_time()
            serving.cancel()
            with trio.fail_after(TIMEOUT):
                await stopped.wait()
                code, _ = await client.until_closed()
    assert trio.current_time() - cancelled_at < config.shutdown_grace_s
    assert code != 1000

