"""Idempotent ``start_agent``: one run per (user, request_id) while it is retained."""

from __future__ import annotations

from tests.harness._support import (
    Client,
    Frame,
    Server,
    check_run,
    connect,
    gather,
    scripted,
    types,
    unique,
)

SLOW = scripted(tools=2, tokens=10, delay_ms=20)


async def assert_gets_nothing_foreign(client: Client) -> None:
    """Nothing is queued for ``client``, and a fresh run of its own brings only its own events."""
    await client.assert_quiet()
    accepted = await client.start("echo")
    check_run(await client.run_events(accepted["run_id"]))


def one_run(first: Frame, second: Frame) -> None:
    assert first["run_id"] == second["run_id"]
    assert first["thread_id"] == second["thread_id"]
    assert sorted([first["duplicate"], second["duplicate"]]) == [False, True]


async def test_repeated_start_on_the_same_socket_is_one_run(server: Server) -> None:
    async with connect(server) as client:
        request_id = unique()
        first = await client.start(request_id=request_id, context=SLOW)
        second = await client.start(request_id=request_id, context=SLOW)
        assert first["duplicate"] is False and second["duplicate"] is True
        one_run(first, second)
        events = await client.run_events(first["run_id"])
        await client.assert_quiet()
    assert types(events).count("agent_started") == 1
    check_run(events)


async def test_concurrent_repeated_start_on_the_same_socket_is_one_run(server: Server) -> None:
    async with connect(server) as client:
        frame = client.start_frame(context=SLOW)
        for _ in range(5):
            await client.send(frame)
        answers = [await client.control() for _ in range(5)]
        assert [a["duplicate"] for a in answers] == [False, True, True, True, True]
        assert {a["run_id"] for a in answers} == {answers[0]["run_id"]}
        events = await client.run_events(answers[0]["run_id"])
        await client.assert_quiet()
    check_run(events)


async def test_duplicate_from_another_socket_subscribes_nothing_until_resume(
    server: Server,
) -> None:
    async with connect(server, "alice") as first, connect(server, "alice") as second:
        request_id = unique()
        original = await first.start(request_id=request_id, context=SLOW)
        duplicate = await second.start(request_id=request_id, context=SLOW)
        assert duplicate["duplicate"] is True
        one_run(original, duplicate)
        events = await first.run_events(original["run_id"])
        await assert_gets_nothing_foreign(second)
        await second.send({"type": "resume", "run_id": original["run_id"], "after_seq": 0})
        assert await second.run_events(original["run_id"]) == events
        await second.assert_quiet()
    check_run(events)


async def test_concurrent_start_from_two_sockets_of_one_user_is_one_run(server: Server) -> None:
    async with connect(server, "alice") as first, connect(server, "alice") as second:
        request_id = unique()
        answers = await gather(
            lambda: first.start(request_id=request_id, context=SLOW),
            lambda: second.start(request_id=request_id, context=SLOW),
        )
        one_run(*answers)
        starter, other = (first, second) if not answers[0]["duplicate"] else (second, first)
        events = await starter.run_events(answers[0]["run_id"])
        await assert_gets_nothing_foreign(other)
    check_run(events)
    assert types(events).count("agent_started") == 1


async def test_duplicate_of_an_ended_retained_run_is_answered_without_replay(
    server: Server,
) -> None:
    async with connect(server) as client:
        request_id = unique()
        first = await client.start("echo", request_id=request_id)
        await client.run_events(first["run_id"])
        again = await client.start("echo", request_id=request_id)
        assert again["duplicate"] is True
        one_run(first, again)
        await client.assert_quiet()


async def test_duplicate_with_different_fields_still_returns_the_first_run(server: Server) -> None:
    async with connect(server) as client:
        request_id = unique()
        first = await client.start("echo", "one", request_id=request_id)
        events = await client.run_events(first["run_id"])
        again = await client.start("echo", "two", request_id=request_id, thread_id="other")
        assert again["duplicate"] is True and again["run_id"] == first["run_id"]
        await client.assert_quiet()
    assert check_run(events)["result"] == "one"


async def test_same_request_id_from_two_users_is_two_runs(server: Server) -> None:
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        request_id = unique()
        for_alice = await alice.start("echo", "from alice", request_id=request_id)
        for_bob = await bob.start("echo", "from bob", request_id=request_id)
        assert for_alice["duplicate"] is False and for_bob["duplicate"] is False
        assert for_alice["run_id"] != for_bob["run_id"]
        alice_events = await alice.run_events(for_alice["run_id"])
        bob_events = await bob.run_events(for_bob["run_id"])
        await alice.assert_quiet()
        await bob.assert_quiet()
    assert check_run(alice_events)["result"] == "from alice"
    assert check_run(bob_events)["result"] == "from bob"


async def test_concurrent_same_request_id_from_two_users_is_two_runs(server: Server) -> None:
    async with connect(server, "alice") as alice, connect(server, "bob") as bob:
        request_id = unique()
        answers = await gather(lambda: alice.start(request_id=request_id, context=SLOW),
                               lambda: bob.start(request_id=request_id, context=SLOW))
        assert [a["duplicate"] for a in answers] == [False, False]
        assert answers[0]["run_id"] != answers[1]["run_id"]
        streams = await gather(lambda: alice.run_events(answers[0]["run_id"]),
                               lambda: bob.run_events(answers[1]["run_id"]))
    for events in streams:
        check_run(events)
