"""Guarantee 6: a slow reader is closed with 4008 and never blocks other sockets or the run."""

from __future__ import annotations

import trio

from tests.harness._support import (
    Client,
    Frame,
    check_run,
    connect,
    gather,
    open_server,
    scripted,
    wait_runs_ended,
)

FLOOD = 4000
#: 4000 tokens of ~3 KB overflow any TCP buffers on the way.
BIG_TOKENS = 3000


async def timed_chat(client: Client) -> tuple[float, list[Frame]]:
    started = trio.current_time()
    accepted = await client.start(context=scripted(tools=1, tokens=20, delay_ms=5))
    events = await client.run_events(accepted["run_id"])
    return trio.current_time() - started, events


async def test_a_socket_that_never_reads_is_closed_4008_and_can_resume(server_kind: str) -> None:
    async with open_server(server_kind, max_queued_messages=50) as server:
        async with connect(server, "slow") as slow:
            accepted = await slow.start(context=scripted(tools=0, tokens=FLOOD,
                                                          token_bytes=BIG_TOKENS))
            run_id = accepted["run_id"]
            async with (
                connect(server, "ann") as ann,
                connect(server, "ben") as ben,
                connect(server, "cid") as cid,
            ):
                chats = await gather(*(lambda c=c: timed_chat(c) for c in (ann, ben, cid)))
            await wait_runs_ended(server)
            code, held = await slow.until_closed()
        assert code == 4008
        assert 0 < len(held) < FLOOD + 3
        assert [e["seq"] for e in held] == list(range(1, len(held) + 1))
        async with connect(server, "slow") as again:
            await again.send({"type": "resume", "run_id": run_id, "after_seq": len(held)})
            rest = await again.run_events(run_id)
            await again.assert_quiet()
    assert check_run(held + rest)["status"] == "succeeded"
    assert len(held + rest) == FLOOD + 3
    for elapsed, events in chats:
        assert check_run(events)["status"] == "succeeded"
        assert elapsed < 3.0


async def test_a_replay_never_counts_against_max_queued_messages(server_kind: str) -> None:
    async with open_server(server_kind, max_queued_messages=5) as server:
        async with connect(server) as starter:
            accepted = await starter.start(context=scripted(tools=5, tokens=60, delay_ms=1))
            events = await starter.run_events(accepted["run_id"])
        async with connect(server) as late:
            await late.send({"type": "resume", "run_id": accepted["run_id"], "after_seq": 0})
            assert await late.run_events(accepted["run_id"]) == events
            await late.assert_quiet()
    assert len(events) == 73


async def test_a_socket_that_floods_pings_without_reading_is_closed_4008(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_queued_messages=20) as server,
        connect(server) as flooder,
    ):
        big_id = "p" * 3000
        for _ in range(1500):
            await flooder.send({"type": "ping", "id": big_id})
        code, pongs = await flooder.until_closed()
    assert code == 4008
    assert 0 < len(pongs) < 1500
    assert all(p == {"type": "pong", "id": big_id} for p in pongs)


async def test_a_slow_socket_does_not_hold_back_another_socket_on_the_same_run(
    server_kind: str,
) -> None:
    async with (
        # The slow socket reads only after the fast one read ~12 MB: on a loaded machine that can
        # take longer than the default close_timeout_s, after which a 1006 would be right.
        open_server(server_kind, max_queued_messages=20, close_timeout_s=120) as server,
        connect(server, "sam") as slow,
        connect(server, "sam") as fast,
    ):
        accepted = await slow.start(context=scripted(tools=0, tokens=FLOOD, delay_ms=1,
                                                      token_bytes=BIG_TOKENS))
        run_id = accepted["run_id"]
        await fast.send({"type": "resume", "run_id": run_id, "after_seq": 0})
        events = await fast.run_events(run_id)
        code, held = await slow.until_closed()
    assert check_run(events)["status"] == "succeeded"
    assert code == 4008
    assert [e["seq"] for e in held] == list(range(1, len(held) + 1))
