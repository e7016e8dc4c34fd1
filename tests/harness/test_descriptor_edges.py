"""Both servers out of file descriptors (``RLIMIT_NOFILE`` 256), then stopped with SIGTERM.

Held handshakes: the longest-waiting one gives its descriptor up so that a new client gets
in (PROTOCOL v2, "Hardening"). Every descriptor held by an open WebSocket: a new client waits
in the listen queue and gets in as soon as one closes. Either way the server then exits 0
on SIGTERM (PROTOCOL.md guarantee 7), which is also how its coverage gets written.
"""

from __future__ import annotations

import resource
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Final

import pytest
import trio

from tests.harness._support import (
    HOST,
    LISTENING,
    REPO,
    SECRET,
    TIMEOUT,
    Client,
    Server,
    check_run,
    connect,
    first_line,
    reap,
    scripted,
    serve_command,
    server_env,
    token,
)
from tests.harness.test_abuse import upgrade_request

FILE_LIMIT: Final = 256
GRACE_S: Final = 2.0


@asynccontextmanager
async def limited(kind: str, *flags: str) -> AsyncIterator[Server]:
    """A server process with ``RLIMIT_NOFILE`` at :data:`FILE_LIMIT`; on exit SIGTERM, and it
    must exit 0 within ``shutdown_grace_s``."""

    def apply_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, FILE_LIMIT))

    proc = await trio.lowlevel.open_process(
        serve_command("--shutdown-grace-s", str(GRACE_S), *flags, kind=kind),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
        env=server_env(REGISTRY_AUTH_SECRET=SECRET), preexec_fn=apply_limit)
    try:
        line = await first_line(proc)
        match = LISTENING.fullmatch(line)
        assert match is not None, line
        yield Server(int(match["port"]), process=proc)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(GRACE_S + TIMEOUT / 3):
            assert await proc.wait() == 0
    finally:
        await reap(proc)


async def _run_one(client: Client) -> None:
    accepted = await client.start(context=scripted(tools=1, tokens=2))
    assert check_run(await client.run_events(accepted["run_id"]))["status"] == "succeeded"


@pytest.mark.parametrize("server_kind", ["trio", "fastapi"])
async def test_held_handshakes_make_room_for_a_new_client(server_kind: str) -> None:
    async with limited(server_kind, "--handshake-timeout-s", "600") as server:
        partial = upgrade_request(server.port, jwt=token("loris"))[:50]
        async with AsyncExitStack() as held:
            for _ in range(FILE_LIMIT + 50):  # more than the server has descriptors
                stream = await held.enter_async_context(
                    await trio.open_tcp_stream(HOST, server.port))
                await stream.send_all(partial)
            async with connect(server, "victim") as victim:
                await _run_one(victim)


@pytest.mark.parametrize("server_kind", ["trio", "fastapi"])
async def test_with_every_descriptor_on_an_open_socket_a_new_client_gets_in_once_one_closes(
    server_kind: str,
) -> None:
    async with (
        limited(server_kind, "--max-connections-per-user", "1000") as server,
        AsyncExitStack() as held,
    ):
        sockets: list[trio.SocketStream] = []
        while len(sockets) < FILE_LIMIT:  # until the server takes no more
            stream = await trio.open_tcp_stream(HOST, server.port)
            if not await _upgraded(stream, server):
                await stream.aclose()  # it waits in the listen queue: it leaves it
                break
            sockets.append(await held.enter_async_context(stream))
        assert FILE_LIMIT / 2 < len(sockets) < FILE_LIMIT
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_late_client, server)
                await sockets[0].aclose()  # one descriptor comes free


async def _upgraded(stream: trio.SocketStream, server: Server) -> bool:
    """Sends an upgrade request; whether the 101 comes within a second."""
    await stream.send_all(upgrade_request(server.port, jwt=token("crowd")))
    answer = b""
    with trio.move_on_after(1.0):
        while b"\r\n\r\n" not in answer:
            chunk = await stream.receive_some()
            assert chunk, answer
            answer += chunk
    if not answer:
        return False
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    return True


async def _late_client(server: Server) -> None:
    async with connect(server, "late") as late:
        await _run_one(late)
