"""The registry's core paths under asyncio (anyio backend), as a FastAPI/Starlette app uses it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from registry import EventType, MemorySubscriber, open_registry
from tests.registry._support import (
    USER,
    chatty,
    check_run_events,
    config,
    hang,
    in_tool,
    make_agents,
    types_of,
)

S, TE, TC, C = (EventType.AGENT_STARTED, EventType.TOOL_EXECUTING, EventType.TOOL_COMPLETED,
                EventType.AGENT_COMPLETED)
GUARD_S = 10  # only against a hang; no test waits for it


def run_asyncio(main: Callable[[], Awaitable[None]]) -> None:
    async def guarded() -> None:
        with anyio.fail_after(GUARD_S):
            await main()
        assert asyncio.all_tasks() == {asyncio.current_task()}

    anyio.run(guarded, backend="asyncio")


def registry(**settings: Any) -> Any:
    agents = make_agents(chatty=chatty, hang=hang, in_tool=in_tool)
    return open_registry(config(**settings), agents=agents)


def test_a_run_completes_under_asyncio() -> None:
    async def main() -> None:
        async with registry() as reg:
            sub = MemorySubscriber(USER)
            run, _ = reg.start_run(user_id=USER, request_id="r", agent="chatty", message="m",
                                   subscriber=sub)
            assert await run.wait_done() == {"status": "succeeded", "result": "abc"}
            check_run_events(sub.received[run.run_id])
            assert len(sub.received[run.run_id]) == 8
            assert reg.statistics().active_runs == 0

    run_asyncio(main)


def test_concurrent_creates_are_deduplicated_under_asyncio() -> None:
    async def main() -> None:
        async with registry() as reg:
            answers: list[Any] = []
            entered, entered_before_any_answer = 0, []

            async def create() -> None:
                nonlocal entered
                entered += 1
                answers.append(await reg.create_execution_context(
                    "triage", USER, "m", {"request_id": "same"}))
                entered_before_any_answer.append(entered)

            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(create)
            assert entered_before_any_answer[0] == 100  # the calls overlapped
            assert len({id(ctx) for ctx, _ in answers}) == 1
            assert sorted(n.duplicate for _, n in answers) == [False] + [True] * 99
            assert reg.statistics().dedup_hits == 99

    run_asyncio(main)


def test_cancel_during_a_tool_under_asyncio() -> None:
    async def main() -> None:
        async with registry() as reg:
            sub = MemorySubscriber(USER)
            run, _ = reg.start_run(user_id=USER, request_id="r", agent="in_tool", message="m",
                                   subscriber=sub)
            await sub.wait_for(run.run_id, 2)
            assert reg.cancel(run.run_id, USER)
            assert (await run.wait_done())["status"] == "cancelled"
            events = sub.received[run.run_id]
            assert types_of(events) == [S, TE, TC, C]
            assert events[2].payload["status"] == "cancelled"

    run_asyncio(main)


def test_cancel_before_the_run_task_started_under_asyncio() -> None:
    async def main() -> None:
        async with registry() as reg:
            sub = MemorySubscriber(USER)
            run, _ = reg.start_run(user_id=USER, request_id="r", agent="hang", message="m",
                                   subscriber=sub)
            reg.cancel(run.run_id, USER)
            assert (await run.wait_done())["status"] == "cancelled"
            assert types_of(sub.received[run.run_id]) == [S, C]

    run_asyncio(main)


def test_agent_timeout_under_asyncio() -> None:
    async def main() -> None:
        async with registry(agent_timeout_s=0.05) as reg:
            run, _ = reg.start_run(user_id=USER, request_id="r", agent="in_tool", message="m")
            assert (await run.wait_done())["status"] == "timed_out"
            check_run_events(list(run.stream.events_after(0)))

    run_asyncio(main)


def test_registry_exit_ends_runs_in_flight_under_asyncio() -> None:
    subs = []

    async def main() -> None:
        async with registry() as reg:
            for i in range(3):
                sub = MemorySubscriber(USER)
                subs.append(sub)
                run, _ = reg.start_run(user_id=USER, request_id=f"r{i}", agent="in_tool",
                                       message="m", subscriber=sub)
                await sub.wait_for(run.run_id, 2)
        assert reg.statistics().active_runs == 0

    run_asyncio(main)
    for sub in subs:
        (events,) = sub.received.values()
        assert types_of(events) == [S, TE, TC, C]
        assert check_run_events(events)["status"] == "cancelled"
