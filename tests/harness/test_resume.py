"""Reconnect and ``resume``, ``ack`` and trimming, and ``not_found`` across users."""

from __future__ import annotations

from typing import Any

from tests.harness._support import (
    Client,
    Frame,
    Server,
    check_run,
    connect,
    open_server,
    scripted,
    wait_runs_ended,
)

STREAM = scripted(tools=2, tokens=20, delay_ms=15)


def resume(run_id: str, after_seq: int) -> Frame:
    return {"type": "resume", "run_id": run_id, "after_seq": after_seq}


def ack(run_id: str, seq: int) -> Frame:
    return {"type": "ack", "run_id": run_id, "seq": seq}


def assert_error(frame: Frame, code: str, **fields: Any) -> None:
    assert frame["type"] == "error" and frame["code"] == code, frame
    for name, value in fields.items():
        assert frame.get(name) == value, frame


async def finished_run(client: Client, **fields: Any) -> tuple[str, list[Frame]]:
    accepted = await client.start(**fields)
    events = await client.run_events(accepted["run_id"])
    check_run(events)
    return accepted["run_id"], events


async def test_reconnect_and_resume_with_last_seq_fills_exactly_the_gap(server: Server) -> None:
    async with connect(server) as first:
        accepted = await first.start(context=STREAM)
        run_id = accepted["run_id"]
        held = await first.events_until(run_id, lambda e: e["seq"] >= 6)
    async with connect(server) as second:
        await second.send(resume(run_id, held[-1]["seq"]))
        rest = await second.run_events(run_id)
        await second.assert_quiet()
    assert check_run(held + rest, thread_id=accepted["thread_id"])["status"] == "succeeded"
    assert len(held + rest) == 3 + 2 * 2 + 20


async def test_reconnect_mid_tool_and_resume(server: Server) -> None:
    async with connect(server) as first:
        run_id = (await first.start(context=scripted(tools=3, tokens=2, delay_ms=30)))["run_id"]
        held = await first.events_until(run_id, lambda e: e["type"] == "tool_executing")
    async with connect(server) as second:
        await second.send(resume(run_id, held[-1]["seq"]))
        rest = await second.run_events(run_id)
    check_run(held + rest)


async def test_resume_after_the_run_ended_while_disconnected(server: Server) -> None:
    async with connect(server) as first:
        run_id = (await first.start(context=STREAM))["run_id"]
        held = await first.events_until(run_id, lambda e: e["seq"] >= 2)
    await wait_runs_ended(server)
    async with connect(server) as second:
        await second.send(resume(run_id, held[-1]["seq"]))
        rest = await second.run_events(run_id)
        await second.assert_quiet()
    assert check_run(held + rest)["status"] == "succeeded"


async def test_resume_from_zero_replays_the_whole_run(server: Server) -> None:
    async with connect(server) as first:
        run_id, events = await finished_run(first, context=STREAM)
    async with connect(server) as second:
        await second.send(resume(run_id, 0))
        assert await second.run_events(run_id) == events
        await second.assert_quiet()


async def test_a_second_socket_that_resumes_mid_run_gets_every_event(server: Server) -> None:
    async with connect(server) as first, connect(server) as second:
        run_id = (await first.start(context=STREAM))["run_id"]
        await first.events_until(run_id, lambda e: e["seq"] >= 4)
        await second.send(resume(run_id, 0))
        on_second = await second.run_events(run_id)
        on_first = await first.run_events(run_id)
    check_run(on_second)
    assert [e["seq"] for e in on_first] == list(range(5, len(on_second) + 1))


async def test_resume_on_a_subscribed_socket_after_the_end_restarts_at_after_seq_plus_1(
    server: Server,
) -> None:
    async with connect(server) as client:
        run_id, events = await finished_run(client, context=STREAM)
        await client.send(resume(run_id, 2))
        assert await client.run_events(run_id) == events[2:]
        await client.assert_quiet()


async def test_resume_on_a_subscribed_socket_mid_run_replays_then_goes_live_once(
    server: Server,
) -> None:
    async with connect(server) as client:
        run_id = (await client.start(context=scripted(tools=0, tokens=3, delay_ms=200)))["run_id"]
        held = await client.events_until(run_id, lambda e: e["seq"] >= 3)
        await client.send(resume(run_id, 1))
        again = await client.run_events(run_id)
        await client.assert_quiet()
    assert [e["seq"] for e in again] == [2, 3, 4, 5, 6]
    assert again[:2] == held[1:]
    check_run(held[:1] + again)


async def test_resume_with_after_seq_equal_to_last_replays_nothing(server: Server) -> None:
    async with connect(server) as first:
        run_id, events = await finished_run(first, agent="echo")
        await first.send(resume(run_id, len(events)))
        await first.assert_quiet()
    async with connect(server) as second:
        await second.send(resume(run_id, len(events)))
        await second.assert_quiet()


async def test_resume_beyond_the_last_event_is_invalid_after_seq(server: Server) -> None:
    async with connect(server) as client:
        run_id, events = await finished_run(client, agent="echo")
        for after_seq in (len(events) + 1, 10**9):
            answer = await client.request(resume(run_id, after_seq))
            assert_error(answer, "invalid_field", field="after_seq", run_id=run_id)
        await client.assert_quiet()


async def test_resume_beyond_the_last_event_of_a_live_run_is_invalid(server: Server) -> None:
    async with connect(server) as client:
        run_id = (await client.start(context=scripted(tokens=50, delay_ms=200)))["run_id"]
        answer = await client.request(resume(run_id, 60))
        assert_error(answer, "invalid_field", field="after_seq", run_id=run_id)
        await client.send({"type": "cancel", "run_id": run_id})
        check_run(await client.run_events(run_id))


async def test_ack_beyond_the_last_event_is_invalid_seq(server: Server) -> None:
    async with connect(server) as client:
        run_id, events = await finished_run(client, agent="echo")
        answer = await client.request(ack(run_id, len(events) + 1))
        assert_error(answer, "invalid_field", field="seq", run_id=run_id)
        await client.send(ack(run_id, len(events)))
        await client.send(ack(run_id, 0))
        await client.assert_quiet()


async def test_resume_before_an_ack_is_resume_unavailable(server: Server) -> None:
    async with connect(server) as client:
        run_id, events = await finished_run(client, context=STREAM)
        await client.send(ack(run_id, 10))
        for after_seq in (0, 5, 9):
            answer = await client.request(resume(run_id, after_seq))
            assert_error(answer, "resume_unavailable", run_id=run_id)
        await client.send(resume(run_id, 10))
        assert await client.run_events(run_id) == events[10:]


async def test_acks_are_cumulative_and_never_lower(server: Server) -> None:
    async with connect(server) as client:
        run_id, events = await finished_run(client, context=STREAM)
        await client.send(ack(run_id, 8))
        await client.send(ack(run_id, 3))
        answer = await client.request(resume(run_id, 5))
        assert_error(answer, "resume_unavailable", run_id=run_id)
        await client.send(resume(run_id, 8))
        assert await client.run_events(run_id) == events[8:]


async def test_max_retained_events_per_run_keeps_the_newest(server_kind: str) -> None:
    async with (
        open_server(server_kind, max_retained_events_per_run=5) as server,
        connect(server) as client,
    ):
        run_id, events = await finished_run(client, context=scripted(tools=0, tokens=10))
        assert len(events) == 13
        for after_seq in (0, 1, 7):
            answer = await client.request(resume(run_id, after_seq))
            assert_error(answer, "resume_unavailable", run_id=run_id)
        await client.send(resume(run_id, 8))
        assert await client.run_events(run_id) == events[8:]


async def test_run_commands_on_an_unknown_run_are_not_found(server: Server) -> None:
    async with connect(server) as client:
        run_id = "f" * 32
        for frame in (resume(run_id, 0), ack(run_id, 0), {"type": "cancel", "run_id": run_id}):
            assert_error(await client.request(frame), "not_found", run_id=run_id)
        await client.assert_quiet()


async def test_another_users_run_is_not_found_and_untouched(server: Server) -> None:
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        accepted = await alice.start(context=STREAM)
        run_id = accepted["run_id"]
        await alice.events_until(run_id, lambda e: e["seq"] >= 3)
        for frame in (resume(run_id, 0), ack(run_id, 2), {"type": "cancel", "run_id": run_id}):
            assert_error(await bob.request(frame), "not_found", run_id=run_id)
        rest = await alice.run_events(run_id)
        await bob.assert_quiet()
        assert rest[-1]["payload"]["status"] == "succeeded"
        for frame in (resume(run_id, 0), ack(run_id, 2), {"type": "cancel", "run_id": run_id}):
            assert_error(await bob.request(frame), "not_found", run_id=run_id)
        await alice.send(resume(run_id, 0))
        check_run(await alice.run_events(run_id))


async def test_another_users_not_found_matches_a_missing_run(server: Server) -> None:
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        run_id, _ = await finished_run(alice, agent="echo")
        foreign = await bob.request(resume(run_id, 0))
        missing = await bob.request(resume("0" * len(run_id), 0))
        assert set(foreign) == set(missing)
        assert (foreign["code"], foreign["type"]) == (missing["code"], missing["type"])


async def test_invalid_after_seq_wins_over_resume_unavailable(server: Server) -> None:
    async with connect(server) as client:
        run_id, events = await finished_run(client, context=STREAM)
        await client.send(ack(run_id, len(events)))
        answer = await client.request(resume(run_id, len(events) + 1))
        assert_error(answer, "invalid_field", field="after_seq", run_id=run_id)
        answer = await client.request(resume(run_id, 0))
        assert_error(answer, "resume_unavailable", run_id=run_id)


async def test_out_of_range_seqs_on_another_users_run_are_not_found(server: Server) -> None:
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        run_id, events = await finished_run(alice, agent="echo")
        for frame in (resume(run_id, len(events) + 5), ack(run_id, len(events) + 5)):
            assert_error(await bob.request(frame), "not_found", run_id=run_id)
