"""PROTOCOL v2 "Hardening" on both servers: the handshake bounds, frames pipelined behind the
upgrade request or in front of the close frame, RFC 6455 violations (1002), bad UTF-8 (1007)
and the token lifetime (4001). ``test_abuse`` checks each of these in depth on the trio server;
here each runs once per server (the asyncio port is uvicorn plus ``harness._uvicorn``), with
the cases of one kind sharing one server.
"""

from __future__ import annotations

import json
import time
from typing import Final

import jwt as pyjwt
import pytest
import trio

from tests.harness._support import (
    HOST,
    SECRET,
    Frame,
    Server,
    check_run,
    connect,
    open_server,
    token,
    unique,
)
from tests.harness.test_abuse import (
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    assert_serving,
    client_frame,
    close_frame,
    raw_websocket,
    read_to_eof,
    text_frame,
    upgrade_request,
)

KINDS: Final = ("trio", "fastapi")
PING: Final = json.dumps({"type": "ping", "id": "x"}).encode()


async def close_code_after(server: Server, data: bytes) -> tuple[int | None, list[Frame]]:
    """Sends ``data`` on a fresh socket: the close code and the frames before the close;
    nothing at all may follow the server's close frame."""
    async with raw_websocket(server) as raw:
        await raw.send(data)
        code, before = await raw.until_close()
        assert await raw.after_close() == []
    return code, before


@pytest.mark.parametrize("kind", KINDS)
async def test_handshakes_are_bounded_in_time_and_in_number(kind: str) -> None:
    async with (
        open_server(kind, handshake_timeout_s=1, max_pending_handshakes=3) as server,
        connect(server, "victim") as victim,
    ):
        opened = trio.current_time()
        stalled = []
        for _ in range(5):
            stream = await trio.open_tcp_stream(HOST, server.port)
            await stream.send_all(upgrade_request(server.port, jwt=token("slow"))[:30])
            stalled.append(stream)
            await victim.assert_usable()  # the server has taken the connection in by now
        closed_after = [0.0] * len(stalled)

        async def watch(index: int) -> None:
            async with stalled[index]:
                assert await read_to_eof(stalled[index], timeout=5) == b""
            closed_after[index] = trio.current_time() - opened

        async with trio.open_nursery() as nursery:
            for index in range(len(stalled)):
                nursery.start_soon(watch, index)
        await assert_serving(victim)
    assert all(0.9 <= t < 2.5 for t in closed_after[:3]), closed_after  # timed out
    assert all(t < 0.9 for t in closed_after[3:]), closed_after  # refused at once


@pytest.mark.parametrize("kind", KINDS)
async def test_frames_behind_the_upgrade_request_and_before_the_close_are_answered(
    kind: str,
) -> None:
    request_id = unique()
    behind = (text_frame({"type": "ping", "id": "early"})
              + text_frame({"type": "start_agent", "request_id": request_id, "agent": "echo",
                            "message": "pipelined"}))
    last_words = text_frame({"type": "ping", "id": "last"}) + close_frame(1000)
    async with open_server(kind) as server:
        async with raw_websocket(server, behind=behind) as raw:
            assert await raw.next_json() == {"type": "pong", "id": "early"}
            accepted = await raw.next_json()
            assert (accepted["type"], accepted["request_id"]) == ("run_accepted", request_id)
            events = [await raw.next_json() for _ in range(3)]
            assert check_run(events, run_id=accepted["run_id"])["result"] == "pipelined"
        assert await close_code_after(server, last_words) == (1000, [
            {"type": "pong", "id": "last"}])


VIOLATIONS: Final = {
    "unmasked text": client_frame(OP_TEXT, PING, masked=False),
    "rsv1": client_frame(OP_TEXT, PING, rsv=1),
    "opcode 0x3": client_frame(3, b"x"),
    "fragmented ping": client_frame(OP_PING, b"a", fin=False)
    + client_frame(OP_CONTINUATION, b"b"),
    "continuation first": client_frame(OP_CONTINUATION, PING),
    "close of one byte": client_frame(OP_CLOSE, b"\x03"),
    "close code 1005": close_frame(1005),
}
BAD_UTF8: Final = {
    "bytes ff fe": client_frame(OP_TEXT, b'{"type":"ping","id":"\xff\xfe"}'),
    "split and broken": client_frame(OP_TEXT, '{"id":"é'.encode()[:-1], fin=False)
    + client_frame(OP_CONTINUATION, b'"}'),
    "close reason": close_frame(1000, b"\xff"),
}


@pytest.mark.parametrize("kind", KINDS)
async def test_rfc6455_violations_close_1002_and_bad_utf8_closes_1007(kind: str) -> None:
    async with open_server(kind) as server, connect(server, "victim") as victim:
        for name, data in VIOLATIONS.items():
            assert (name, await close_code_after(server, data)) == (name, (1002, []))
        for name, data in BAD_UTF8.items():
            assert (name, await close_code_after(server, data)) == (name, (1007, []))
        await assert_serving(victim)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_socket_is_closed_4001_at_its_tokens_exp_unless_refreshed(kind: str) -> None:
    async with open_server(kind) as server:
        exp = int(time.time()) + 2  # 1 to 2 s from now
        short = pyjwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
        async with connect(server, "alice", jwt=short) as kept, \
                connect(server, "alice", jwt=short) as left:
            refreshed = await kept.request({"type": "refresh", "token": token("alice", ttl=60)})
            assert refreshed["type"] == "refreshed"
            code, frames = await left.until_closed()
            closed_at = time.time()
            await kept.assert_usable()  # its deadline moved
    assert (code, frames) == (4001, [])
    assert exp - 0.05 <= closed_at < exp + 1.0, (exp, closed_at)
