"""Every run ends: cancel, agent timeout, detached timeout, retention, server shutdown."""

from __future__ import annotations

import time

import pytest
import trio
import trio_websocket

from tests.harness._support import (
    TIMEOUT,
    Client,
    Frame,
    Server,
    assert_shut_down,
    check_run,
    connect,
    open_server,
    scripted,
    start_in_flight,
    token,
    types,
    wait_runs_ended,
)


def cancel(run_id: str) -> Frame:
    return {"type": "cancel", "run_id": run_id}


async def test_cancel_during_a_tool_cancels_the_tool_and_the_run(server: Server) -> None:
    async with connect(server) as client:
        flight = await start_in_flight(client, scripted(tools=2, tokens=5, delay_ms=300),
                                       until="tool_executing")
        await client.send(cancel(flight.run_id))
        rest = await client.run_events(flight.run_id)
        await client.assert_quiet()
    events = flight.held + rest
    assert check_run(events)["status"] == "cancelled"
    assert types(rest) == ["tool_completed", "agent_completed"]
    assert rest[0]["payload"]["status"] == "cancelled"
    assert rest[0]["payload"]["call_id"] == flight.held[-1]["payload"]["call_id"]


async def test_cancel_right_after_start_still_sends_agent_started_first(server: Server) -> None:
    async with connect(server) as client:
        frame = client.start_frame(context=scripted(tools=1, tokens=5, delay_ms=100))
        await client.send(frame)
        accepted = await client.control()
        await client.send(cancel(accepted["run_id"]))
        events = await client.run_events(accepted["run_id"])
    assert check_run(events)["status"] == "cancelled"
    assert events[0]["type"] == "agent_started"


async def test_cancel_of_an_ended_run_gets_no_answer(server: Server) -> None:
    async with connect(server) as client:
        accepted = await client.start("echo")
        events = await client.run_events(accepted["run_id"])
        assert check_run(events)["status"] == "succeeded"
        for _ in range(3):
            await client.send(cancel(accepted["run_id"]))
        await client.assert_quiet()


async def test_cancel_of_a_cancelled_run_gets_no_answer(server: Server) -> None:
    async with connect(server) as client:
        flight = await start_in_flight(client, scripted(tokens=20, delay_ms=100))
        await client.send(cancel(flight.run_id))
        rest = await client.run_events(flight.run_id)
        await client.send(cancel(flight.run_id))
        await client.assert_quiet()
    assert check_run(flight.held + rest)["status"] == "cancelled"


async def test_cancel_from_another_socket_of_the_user_ends_the_run(server: Server) -> None:
    async with connect(server) as starter, connect(server) as other:
        flight = await start_in_flight(starter, scripted(tokens=50, delay_ms=50))
        await other.send(cancel(flight.run_id))
        await other.send({"type": "ack", "run_id": flight.run_id, "seq": 1})
        rest = await starter.run_events(flight.run_id)
        await other.assert_quiet()
    assert check_run(flight.held + rest)["status"] == "cancelled"


async def test_agent_timeout_ends_the_run_timed_out_and_closes_its_tool(server_kind: str) -> None:
    async with open_server(server_kind, agent_timeout_s=1.0) as server, connect(server) as client:
        accepted = await client.start(context=scripted(tools=1, tokens=10, delay_ms=400))
        events = await client.run_events(accepted["run_id"])
    payload = check_run(events)
    assert payload["status"] == "timed_out"
    assert isinstance(payload["error"], str)
    assert 0.8 <= events[-1]["ts"] - events[0]["ts"] < 3.0
    tools = [e["payload"]["status"] for e in events if e["type"] == "tool_completed"]
    assert all(status in ("cancelled", "error") for status in tools)


async def test_agent_timeout_with_no_tool_open(server_kind: str) -> None:
    async with open_server(server_kind, agent_timeout_s=0.3) as server, connect(server) as client:
        accepted = await client.start(context=scripted(tools=0, tokens=1, delay_ms=5000))
        events = await client.run_events(accepted["run_id"])
    assert types(events) == ["agent_started", "agent_completed"]
    assert check_run(events)["status"] == "timed_out"


async def test_a_run_with_no_subscribed_socket_is_cancelled_after_detached_run_timeout(
    server_kind: str,
) -> None:
    async with (
        open_server(server_kind, detached_run_timeout_s=0.3) as server,
        connect(server, "alice") as unsubscribed,
    ):
        async with connect(server, "alice") as starter:
            flight = await start_in_flight(starter, scripted(tokens=100, delay_ms=100))
        closed_at = trio.current_time()
        await wait_runs_ended(server)
        assert trio.current_time() - closed_at < 3.0
        await unsubscribed.send({"type": "resume", "run_id": flight.run_id,
                                 "after_seq": flight.held[-1]["seq"]})
        rest = await unsubscribed.run_events(flight.run_id)
    payload = check_run(flight.held + rest)
    assert payload["status"] == "cancelled"
    assert isinstance(payload["error"], str)


async def test_a_run_with_a_subscribed_socket_is_not_detached(server_kind: str) -> None:
    async with (
        open_server(server_kind, detached_run_timeout_s=0.2) as server,
        connect(server) as client,
    ):
        accepted = await client.start(context=scripted(tools=1, tokens=8, delay_ms=80))
        events = await client.run_events(accepted["run_id"])
    assert events[-1]["ts"] - events[0]["ts"] > 0.5
    assert check_run(events)["status"] == "succeeded"


async def test_resuming_before_detached_run_timeout_keeps_the_run_alive(server_kind: str) -> None:
    async with open_server(server_kind, detached_run_timeout_s=0.5) as server:
        async with connect(server) as first:
            flight = await start_in_flight(first, scripted(tools=1, tokens=10, delay_ms=100))
        async with connect(server) as second:
            await second.send({"type": "resume", "run_id": flight.run_id, "after_seq": 1})
            rest = await second.run_events(flight.run_id)
    assert rest[-1]["ts"] - flight.held[0]["ts"] > 1.0
    assert check_run(flight.held + rest)["status"] == "succeeded"


async def wait_until_not_retained(client: Client, run_id: str) -> None:
    """Polls with ``cancel`` (no answer while retained, ``not_found`` after) and ``ping``."""
    with trio.fail_after(TIMEOUT):
        while True:
            await client.send(cancel(run_id))
            answer = await client.ping("probe")
            if answer != {"type": "pong", "id": "probe"}:
                assert answer["code"] == "not_found" and answer["run_id"] == run_id, answer
                assert await client.recv() == {"type": "pong", "id": "probe"}
                return


async def test_after_retention_the_run_is_gone_and_its_request_id_starts_a_new_run(
    server_kind: str,
) -> None:
    async with open_server(server_kind, retention_s=0.3) as server, connect(server) as client:
        first = await client.start("echo", "first", request_id="same")
        events = await client.run_events(first["run_id"])
        await client.send({"type": "resume", "run_id": first["run_id"], "after_seq": 0})
        assert await client.run_events(first["run_id"]) == events
        await wait_until_not_retained(client, first["run_id"])
        assert time.time() - events[-1]["ts"] >= 0.3 - 0.05
        for frame in ({"type": "resume", "run_id": first["run_id"], "after_seq": 0},
                      {"type": "ack", "run_id": first["run_id"], "seq": 1}):
            answer = await client.request(frame)
            assert (answer["code"], answer["run_id"]) == ("not_found", first["run_id"])
        second = await client.start("echo", "second", request_id="same")
        assert second["duplicate"] is False and second["run_id"] != first["run_id"]
        assert check_run(await client.run_events(second["run_id"]))["result"] == "second"


async def test_stopping_the_server_cancels_runs_then_closes_sockets_1001(server_kind: str) -> None:
    async with (
        open_server(server_kind, shutdown_grace_s=3) as server,
        connect(server, "alice") as a,
        connect(server, "bob") as b,
        connect(server, "bob") as idle,
    ):
        in_flight = [
            await start_in_flight(a, scripted(tokens=100, delay_ms=100)),
            await start_in_flight(b, scripted(tools=3, delay_ms=300), until="tool_executing"),
        ]
        stopped_at = trio.current_time()
        server.shut_down()
        await assert_shut_down(in_flight, [idle])
        assert trio.current_time() - stopped_at < 3
        with pytest.raises((OSError, trio_websocket.HandshakeError)):
            async with connect(server, "carol", jwt=token("carol")):
                pass


async def test_a_run_resumed_elsewhere_outlives_the_socket_that_started_it(
    server_kind: str,
) -> None:
    async with (
        # 1 s: on a cluster a follower's node renews its "I follow" record every third of it,
        # which a loaded machine can delay past a shorter timeout
        open_server(server_kind, detached_run_timeout_s=1.0) as server,
        connect(server) as follower,
    ):
        async with connect(server) as starter:
            flight = await start_in_flight(starter, scripted(tools=1, tokens=20, delay_ms=100))
            await follower.send({"type": "resume", "run_id": flight.run_id, "after_seq": 0})
            await follower.events_until(flight.run_id, lambda e: e["seq"] == 1)
        events = flight.held + await follower.run_events(flight.run_id)
    assert events[-1]["ts"] - events[0]["ts"] > 1.5
    assert check_run(events)["status"] == "succeeded"
