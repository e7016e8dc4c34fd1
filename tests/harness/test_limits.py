"""Capacity: ``rate_limited`` per user, ``overloaded`` per server, duplicates answered at both."""

from __future__ import annotations

from tests.harness._support import (
    Client,
    Frame,
    check_run,
    connect,
    open_server,
    scripted,
    unique,
)

LONG = scripted(tools=1, tokens=100, delay_ms=500)


def assert_error(frame: Frame, code: str, request_id: str) -> None:
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    assert frame["request_id"] == request_id, frame
    assert isinstance(frame["message"], str)


async def refused(client: Client, code: str) -> None:
    request_id = unique()
    assert_error(await client.request(client.start_frame(request_id=request_id)), code, request_id)
    await client.assert_usable()


async def cancel_and_finish(client: Client, run_id: str) -> Frame:
    await client.send({"type": "cancel", "run_id": run_id})
    return check_run(await client.run_events(run_id))


async def test_rate_limited_at_max_active_runs_per_user(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_active_runs_per_user=2) as server,
        connect(server) as client,
    ):
        runs = [await client.start(context=LONG) for _ in range(2)]
        await refused(client, "rate_limited")
        async with connect(server, "alice") as second_socket:
            await refused(second_socket, "rate_limited")
        async with connect(server, "bob") as bob:
            other_user = await bob.start("echo")
            check_run(await bob.run_events(other_user["run_id"]))
        run_ids = [accepted["run_id"] for accepted in runs]
        for run_id in run_ids:
            await client.send({"type": "cancel", "run_id": run_id})
        streams = await client.collect(*run_ids)
        assert [check_run(streams[run_id])["status"] for run_id in run_ids] == ["cancelled"] * 2


async def test_a_run_that_ended_frees_its_slot(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_active_runs_per_user=1) as server,
        connect(server) as client,
    ):
        for _ in range(3):
            accepted = await client.start("echo")
            check_run(await client.run_events(accepted["run_id"]))
        busy = await client.start(context=LONG)
        await refused(client, "rate_limited")
        await cancel_and_finish(client, busy["run_id"])
        accepted = await client.start("echo")
        check_run(await client.run_events(accepted["run_id"]))


async def test_duplicate_is_answered_at_max_active_runs_per_user(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_active_runs_per_user=1) as server,
        connect(server) as client,
    ):
        request_id = unique()
        first = await client.start(request_id=request_id, context=LONG)
        again = await client.start(request_id=request_id, context=LONG)
        assert again["duplicate"] is True and again["run_id"] == first["run_id"]
        await cancel_and_finish(client, first["run_id"])


async def test_overloaded_at_max_active_runs(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_active_runs=2) as server,
        connect(server, "alice") as alice,
        connect(server, "bob") as bob,
        connect(server, "carol") as carol,
    ):
        first = await alice.start(context=LONG)
        second = await bob.start(context=LONG)
        await refused(carol, "overloaded")
        await refused(alice, "overloaded")
        await cancel_and_finish(alice, first["run_id"])
        third = await carol.start(context=LONG)
        await refused(alice, "overloaded")
        await cancel_and_finish(bob, second["run_id"])
        await cancel_and_finish(carol, third["run_id"])


async def test_duplicate_is_answered_at_max_active_runs(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_active_runs=1) as server,
        connect(server, "alice") as alice,
        connect(server, "alice") as other_socket,
    ):
        request_id = unique()
        first = await alice.start(request_id=request_id, context=LONG)
        again = await other_socket.start(request_id=request_id, context=LONG)
        assert again["duplicate"] is True and again["run_id"] == first["run_id"]
        await other_socket.assert_quiet()
        await cancel_and_finish(alice, first["run_id"])
