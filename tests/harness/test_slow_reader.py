"""PROTOCOL.md v2, "Closing a slow reader": the 4008 close frame waits ``close_timeout_s`` for its
reader, then the TCP connection is dropped; meanwhile nobody else is held back.

The slow reader is a raw wsproto client with a small receive buffer that stops reading while a
fast ``scripted`` run floods it with 3000-character tokens, so the kernel buffers fill. It then
stays unread for a few seconds of wall-clock time: a backgrounded browser tab does exactly that,
and the close timeout being measured is a real clock, so here (and only here) a real pause is
the point of the test.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Final

import trio
import wsproto
import wsproto.events as wse

from tests.harness._support import (
    HOST,
    Client,
    Frame,
    RawClient,
    Server,
    check_run,
    connect,
    open_server,
    scripted,
    token,
    unique,
)
from tests.harness.test_operations import Scrape, poll, scrape

#: 4000 tokens of 3000 characters: 12 MB, far beyond the queue bound and the kernel buffers.
FLOOD: Final = scripted(tools=0, tokens=4000, delay_ms=0, token_bytes=3000)
FLOOD_EVENTS: Final = 4003
#: A small receive buffer, so the kernel holds little of the flood on the client side.
RCVBUF: Final = 16384


async def raw_slow_client(server: Server, user: str) -> RawClient:
    """A raw client with a small receive buffer; the caller closes ``client.stream``."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    await sock.connect((HOST, server.port))
    client = RawClient(trio.SocketStream(sock), wsproto.WSConnection(wsproto.ConnectionType.CLIENT))
    await client.send(wse.Request(host=f"{HOST}:{server.port}", target="/ws", extra_headers=[
        (b"authorization", f"Bearer {token(user)}".encode())]))
    accepted = await client.next_event()
    assert isinstance(accepted, wse.AcceptConnection), accepted
    return client


async def start_flood(client: RawClient) -> None:
    """Starts the flood run and reads nothing (not even its ``run_accepted``)."""
    await client.send(wse.TextMessage(json.dumps({
        "type": "start_agent", "request_id": unique("flood"), "agent": "scripted",
        "message": "flood", "context": FLOOD})))


async def read_to_the_end(client: RawClient) -> tuple[list[Frame], wse.Event | None]:
    """Reads text frames until something else arrives: a close frame, or None (TCP ended)."""
    frames: list[Frame] = []
    text = ""  # wsproto hands a big message over in pieces
    while True:
        try:
            event = await client.next_event()
        except trio.BrokenResourceError:  # reset by the server: dropped as well
            return frames, None
        if not isinstance(event, wse.TextMessage):
            return frames, event
        text += event.data
        if event.message_finished:
            frames.append(json.loads(text))
            text = ""


def check_prefix(frames: list[Frame]) -> None:
    """What a 4008 socket got: its run_accepted, then a gap-free prefix of the flood."""
    assert frames[0]["type"] == "run_accepted", frames[0]
    events = frames[1:]
    assert events and events[0]["type"] == "agent_started"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len(events) < FLOOD_EVENTS


async def quick_chat(client: Client) -> float:
    """Another user's short run: returns how long it took, start to ``agent_completed``."""
    started = trio.current_time()
    run_id = (await client.start(context=scripted(tools=1, tokens=20, delay_ms=5)))["run_id"]
    assert check_run(await client.run_events(run_id))["status"] == "succeeded"
    return trio.current_time() - started


def finished(runs: int) -> Callable[[Scrape], bool]:
    return lambda s: s.value("registry_runs_completed_total", status="succeeded") == runs


async def test_a_reader_back_within_close_timeout_gets_the_4008_close_frame() -> None:
    async with open_server() as server:  # close_timeout_s: the default 10
        slow = await raw_slow_client(server, "slow")
        async with slow.stream:
            paused_at = trio.current_time()
            await start_flood(slow)
            async with connect(server, "quick") as quick:
                took = await quick_chat(quick)
            # the flood ran to its end, unread, beside the quick run (2 succeeded)
            metrics = await poll(lambda: scrape(server), finished(2))
            assert trio.current_time() - paused_at < 5.0, "not checked while the tab was away"
            await trio.sleep_until(paused_at + 5.0)  # the tab stays in the background 5 s
            frames, last = await read_to_the_end(slow)
            assert isinstance(last, wse.CloseConnection), last
            assert last.code == 4008
            await slow.send(last.response())  # the close handshake done, the server hangs up
            assert await slow.next_event() is None
        closed = await poll(lambda: scrape(server),
                            lambda s: s.value("registry_connections_active") == 0)
    check_prefix(frames)
    assert took < 2.0
    assert metrics.value("registry_events_emitted_total") == FLOOD_EVENTS + 25
    assert closed.value("registry_connections_closed_total", code="4008") == 1


async def test_a_reader_back_after_close_timeout_finds_the_connection_dropped() -> None:
    async with open_server(close_timeout_s=1.0) as server:
        slow = await raw_slow_client(server, "slow")
        async with slow.stream:
            paused_at = trio.current_time()
            await start_flood(slow)
            await trio.sleep_until(paused_at + 3.0)  # back after 3 s: past close_timeout_s
            dropped = await poll(lambda: scrape(server),
                                 lambda s: s.value("registry_connections_active") == 0)
            frames, last = await read_to_the_end(slow)
    assert last is None, f"expected the TCP connection gone, got {last}"
    if frames:  # what was already in the kernel buffers when the connection was dropped
        check_prefix(frames)
    assert dropped.value("registry_connections_closed_total", code="4008") == 1


async def test_a_stuck_reader_holds_back_neither_the_run_nor_other_users() -> None:
    async with open_server() as server:
        slow = await raw_slow_client(server, "slow")
        async with slow.stream:
            await start_flood(slow)
            times: list[float] = []
            async with (
                connect(server, "ann") as ann,
                connect(server, "ben") as ben,
                trio.open_nursery() as nursery,
            ):
                for client in (ann, ben):
                    nursery.start_soon(_timed, times, client)
            metrics = await poll(lambda: scrape(server), finished(3))
            frames, last = await read_to_the_end(slow)  # still unread until now
            assert isinstance(last, wse.CloseConnection) and last.code == 4008, last
    check_prefix(frames)
    assert len(times) == 2 and max(times) < 2.0, times
    assert metrics.value("registry_events_emitted_total") == FLOOD_EVENTS + 2 * 25


async def _timed(into: list[float], client: Client) -> None:
    into.append(await quick_chat(client))
