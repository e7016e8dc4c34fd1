"""Guarantee 4: a run's events reach only its user's sockets that started or resumed it."""

from __future__ import annotations

from contextlib import AsyncExitStack

from tests.harness._support import (
    Client,
    Frame,
    Server,
    check_run,
    connect,
    gather,
    scripted,
)

USERS = [f"user{i:02d}" for i in range(12)]


async def chat(client: Client, index: int) -> dict[str, list[Frame]]:
    """A few runs of each agent on one socket, read to the end."""
    runs = [
        await client.start("research", f"question {index}"),
        await client.start(context=scripted(tools=index % 3, tokens=10 + index, delay_ms=5)),
        await client.start("echo", f"echo {index}"),
        await client.start(context=scripted(tools=2, tokens=3, delay_ms=2, fail_at_tool=1)),
    ]
    streams = await client.collect(*(r["run_id"] for r in runs))
    for accepted in runs:
        check_run(streams[accepted["run_id"]], thread_id=accepted["thread_id"])
    return streams


async def test_twelve_users_chatting_concurrently_see_only_their_own_events(
    server: Server,
) -> None:
    async with AsyncExitStack() as stack:
        talkers = [await stack.enter_async_context(connect(server, user)) for user in USERS]
        bystanders = [await stack.enter_async_context(connect(server, user)) for user in USERS]
        results = await gather(*(
            (lambda c=client, i=index: chat(c, i)) for index, client in enumerate(talkers)
        ))
        for bystander in bystanders:
            await bystander.assert_quiet()
    run_ids = [run_id for streams in results for run_id in streams]
    assert len(set(run_ids)) == len(run_ids) == 4 * len(USERS)
