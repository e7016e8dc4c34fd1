"""PROTOCOL v2: ``--server fastapi`` serves the same contract as the trio server. Each test
here runs on both servers, on parts of the page whose other tests run on the trio server only:
HTTP methods and paths, origins, and a slow reader past ``close_timeout_s``.
"""

from __future__ import annotations

import re
from typing import Final

import pytest
import trio
import wsproto.events as wse

from tests.harness._support import (
    HOST,
    TIMEOUT,
    Server,
    open_server,
    token,
)
from tests.harness.test_abuse import upgrade_request
from tests.harness.test_slow_reader import (
    check_prefix,
    raw_slow_client,
    read_to_the_end,
    start_flood,
)

KINDS: Final = ("trio", "fastapi")
ROUTES: Final = ("/healthz", "/readyz", "/metrics", "/dashboard", "/dashboard/data", "/ws")
FIXED: Final = {404: b"not found\n", 405: b"method not allowed\n", 403: b"forbidden\n"}


async def exchange(server: Server, request: bytes) -> tuple[int, bytes, bytes]:
    """Sends a raw request on its own connection: status, head and body of the answer."""
    with trio.fail_after(TIMEOUT):
        async with await trio.open_tcp_stream(HOST, server.port) as stream:
            await stream.send_all(request)
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
    assert match is not None, data[:200]
    return int(match[1]), head, body


def request(method: str, target: str) -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n").encode()


@pytest.mark.parametrize("kind", KINDS)
async def test_another_method_on_a_route_is_405_with_the_fixed_text(kind: str) -> None:
    async with open_server(kind) as server:
        for path in ROUTES:
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                status, _, body = await exchange(server, request(method, path))
                assert (path, method, status, body) == (path, method, 405, FIXED[405])


@pytest.mark.parametrize("kind", KINDS)
async def test_head_on_a_route_is_405_too(kind: str) -> None:
    """HEAD is "another method" (only GET is served); the answer carries no other content."""
    async with open_server(kind) as server:
        for path in ROUTES:
            status, head, _ = await exchange(server, request("HEAD", path))
            assert (path, status) == (path, 405)
            assert b"content-type: text/plain" in head.lower()


@pytest.mark.parametrize("kind", KINDS)
async def test_get_ws_that_is_not_an_upgrade_is_426(kind: str) -> None:
    async with open_server(kind) as server:
        status, _, body = await exchange(server, request("GET", f"/ws?token={token('alice')}"))
    assert (status, body) == (426, b"upgrade required: this endpoint speaks WebSocket\n")


@pytest.mark.parametrize("kind", KINDS)
async def test_any_other_path_is_404_with_the_fixed_text_for_any_method(kind: str) -> None:
    async with open_server(kind) as server:
        for path in ("/", "/nope", "/ws/x", "/healthz/"):
            for method in ("GET", "POST"):
                status, _, body = await exchange(server, request(method, path))
                assert (path, method, status, body) == (path, method, 404, FIXED[404])
        upgrade = upgrade_request(server.port, target="/elsewhere", jwt=token("alice"))
        assert (await exchange(server, upgrade))[::2] == (404, FIXED[404])


@pytest.mark.parametrize("kind", KINDS)
async def test_an_origin_not_allowed_is_403_and_an_allowed_one_connects(kind: str) -> None:
    async with open_server(kind, allowed_origins="https://chat.example") as server:
        for origin in ("https://evil.example", "null", "https://chat.example.evil"):
            answer = await exchange(server, upgrade_request(
                server.port, jwt=token("alice"), headers=[("Origin", origin)]))
            assert answer[::2] == (403, FIXED[403]), origin
        allowed = upgrade_request(server.port, jwt=token("alice"),
                                  headers=[("Origin", "https://CHAT.example:443")])
        with trio.fail_after(TIMEOUT):
            async with await trio.open_tcp_stream(HOST, server.port) as stream:
                await stream.send_all(allowed)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await stream.receive_some()
                    assert chunk, head
                    head += chunk
        assert head.startswith(b"HTTP/1.1 101 "), head


@pytest.mark.parametrize("kind", KINDS)
async def test_a_4008_reader_back_after_close_timeout_finds_the_connection_dropped(
    kind: str,
) -> None:
    """PROTOCOL v2, "Closing a slow reader": past ``close_timeout_s`` the TCP connection is
    dropped. The reader stays away for a few seconds of wall-clock time on purpose (see
    test_slow_reader): the close timeout is a real clock."""
    async with open_server(kind, close_timeout_s=1.0) as server:
        slow = await raw_slow_client(server, "slow")
        async with slow.stream:
            paused_at = trio.current_time()
            await start_flood(slow)
            await trio.sleep_until(paused_at + 3.0)
            frames, last = await read_to_the_end(slow)
    assert last is None, f"expected the TCP connection gone, got {last}"
    if frames:  # what was already in the kernel buffers when the connection was dropped
        check_prefix(frames)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_peer_that_closes_and_then_reads_nothing_is_dropped_in_bounded_time(
    kind: str,
) -> None:
    """The peer's close frame comes while the server still owes it a flood of events, and the
    peer reads nothing more: the server gives the close ``close_timeout_s`` (a real clock,
    hence the real pause), then ends TCP. What the peer finds is its run_accepted and a
    gap-free prefix of the run (possibly empty: it closed right after starting it)."""
    async with open_server(kind, close_timeout_s=1.0) as server:
        slow = await raw_slow_client(server, "slow")
        async with slow.stream:
            await start_flood(slow)
            await slow.send(wse.CloseConnection(code=1000))
            await trio.sleep(3.0)
            frames, last = await read_to_the_end(slow)
            if last is not None:  # the server's close reply made it out: then TCP ends
                assert isinstance(last, wse.CloseConnection), last
                assert await slow.next_event() is None
    assert frames[0]["type"] == "run_accepted"
    assert [e["seq"] for e in frames[1:]] == list(range(1, len(frames)))  # what was owed
