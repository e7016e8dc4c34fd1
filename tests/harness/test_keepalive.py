"""Keepalive: pings every ``ping_interval_s``; a peer silent for ``ping_timeout_s`` is closed."""

from __future__ import annotations

import json

import trio
import trio_websocket
import wsproto.events as wse

from tests.harness._support import connect, open_server, raw_connect, scripted

INTERVAL = 0.2
PING_TIMEOUT = 0.3


async def test_server_pings_and_closes_a_peer_that_never_answers(server_kind: str) -> None:
    async with (
        open_server(server_kind, ping_interval_s=INTERVAL, ping_timeout_s=PING_TIMEOUT) as server,
        raw_connect(server) as raw,
    ):
        opened = trio.current_time()
        pinged_at = None
        while True:
            event = await raw.next_event()
            if isinstance(event, wse.Ping) and pinged_at is None:
                pinged_at = trio.current_time() - opened
            if event is None or isinstance(event, wse.CloseConnection):
                break
        closed_at = trio.current_time() - opened
    assert pinged_at is not None and pinged_at < INTERVAL + 0.5
    assert INTERVAL + PING_TIMEOUT - 0.05 <= closed_at < INTERVAL + PING_TIMEOUT + 0.7


async def test_a_peer_that_answers_pings_stays_open(server_kind: str) -> None:
    async with (
        open_server(server_kind, ping_interval_s=INTERVAL, ping_timeout_s=PING_TIMEOUT) as server,
        raw_connect(server) as raw,
    ):
        opened = trio.current_time()
        for _ in range(5):
            event = await raw.next_event()
            assert isinstance(event, wse.Ping), event
            await raw.send(event.response())
        assert trio.current_time() - opened > INTERVAL + PING_TIMEOUT
        await raw.send(wse.TextMessage(data='{"type": "ping", "id": 7}'))
        while isinstance(event := await raw.next_event(), wse.Ping):
            await raw.send(event.response())
        assert isinstance(event, wse.TextMessage)
        assert json.loads(event.data) == {"type": "pong", "id": 7}


async def test_runs_complete_across_many_keepalive_rounds(server_kind: str) -> None:
    async with (
        open_server(server_kind, ping_interval_s=0.05, ping_timeout_s=0.5) as server,
        connect(server) as client,
    ):
        accepted = await client.start(context=scripted(tools=2, tokens=10, delay_ms=40))
        events = await client.run_events(accepted["run_id"])
        assert events[-1]["payload"]["status"] == "succeeded"
        await client.assert_quiet()


async def test_a_dead_peer_with_data_pending_loses_its_slot_within_the_ping_deadline(
    server_kind: str,
) -> None:
    """A peer that neither reads nor answers pings is closed although its writer is stuck."""
    settings = {"max_connections_per_user": 1, "max_queued_messages": 10**6,
                "ping_interval_s": INTERVAL, "ping_timeout_s": PING_TIMEOUT}
    async with (
        open_server(server_kind, **settings) as server,
        raw_connect(server, "dead") as raw,
    ):
        flood = {"type": "start_agent", "request_id": "flood", "agent": "scripted",
                 "message": "m", "context": scripted(0, 4000, token_bytes=3000)}
        await raw.send(wse.TextMessage(data=json.dumps(flood)))
        opened = trio.current_time()
        with trio.fail_after(INTERVAL + PING_TIMEOUT + 1.5):
            while True:
                try:
                    async with connect(server, "dead") as replacement:
                        await replacement.assert_quiet()
                        break
                except trio_websocket.ConnectionRejected as exc:
                    assert exc.status_code == 429
        assert trio.current_time() - opened >= INTERVAL + PING_TIMEOUT - 0.05
