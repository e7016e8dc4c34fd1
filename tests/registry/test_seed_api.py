"""The seed-compatible API, used the way the migration plan's AFTER example uses it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing

from registry import (
    AgentContext,
    AgentRegistry,
    EventType,
    MemorySubscriber,
    RateLimited,
    Supervisor,
    ToolDispatcher,
    get_agent_execution_registry,
    open_registry,
)
from tests.registry._support import (
    OTHER_USER,
    USER,
    check_run_events,
    config,
    make_agents,
    types_of,
)

S, T, TE, TC, P, C = (EventType.AGENT_STARTED, EventType.AGENT_THINKING, EventType.TOOL_EXECUTING,
                      EventType.TOOL_COMPLETED, EventType.PARTIAL_RESULT,
                      EventType.AGENT_COMPLETED)


async def test_the_after_example_runs_end_to_end() -> None:
    supervisor, agent_registry = Supervisor(), make_agents()
    async with open_registry(config(), agents=make_agents()) as reg:
        await reg.initialize()
        await reg.setup_agent_websocket_integration(supervisor, agent_registry)
        sub = MemorySubscriber(USER)
        reg.connect(sub)
        ctx, notifier = await reg.create_execution_context(
            "triage", USER, "my printer is on fire", {"request_id": "req-1"})
        assert await notifier.send_agent_started()
        assert await notifier.send_agent_thinking("looking it up")
        assert await notifier.send_tool_executing("search", {"q": "printer fire"})
        assert await notifier.send_tool_completed("search", {"hits": 3})
        assert await notifier.send_partial_result("Unplug it")
        await reg.complete_execution(ctx, {"answer": "unplug it"})
        events = sub.received[ctx.run_id]
        assert types_of(events) == [S, T, TE, TC, P, C]
        assert events[3].payload["call_id"] == events[2].payload["call_id"]
        assert events[3].payload["status"] == "ok"
        assert events[3].payload["result"] == {"hits": 3}
        assert events[-1].payload == {"status": "succeeded", "result": {"answer": "unplug it"}}
        check_run_events(events)
        assert ctx.done.is_set() and reg.statistics().active_runs == 0
        again, notifier = await reg.create_execution_context(
            "triage", USER, "my printer is on fire", {"request_id": "req-1"})
        assert again is ctx and notifier.duplicate


async def test_setup_wires_the_supervisor_and_agent_registry() -> None:
    """Runs started after the setup take their agents and their tools from what it was given."""
    async def lookup(args: Mapping[str, Any]) -> Any:
        return f"found {args['q']}"

    async def researcher(ctx: AgentContext) -> Any:
        return await ctx.tool("lookup", {"q": ctx.message})

    tools, agent_registry = ToolDispatcher(), AgentRegistry()
    tools.register("lookup", lookup)
    agent_registry.register("researcher", researcher)
    supervisor = Supervisor(agent_registry, tools)
    async with open_registry(config(), agents=make_agents()) as reg:
        await reg.setup_agent_websocket_integration(supervisor, agent_registry)
        payload = await supervisor.run_agent("researcher", USER, "hi", request_id="r")
        assert payload == {"status": "succeeded", "result": "found hi"}
        run, _ = reg.start_run(user_id=USER, request_id="r2", agent="researcher", message="yo")
        assert await run.wait_done() == {"status": "succeeded", "result": "found yo"}


async def test_get_agent_execution_registry_returns_the_open_registry() -> None:
    async with open_registry(config(), agents=make_agents()) as reg:
        assert await get_agent_execution_registry() is reg
    with pytest.raises(RuntimeError):
        await get_agent_execution_registry()


async def test_ensure_event_delivery_of_agent_completed_ends_the_run() -> None:
    async with open_registry(config(), agents=make_agents()) as reg:
        sub = MemorySubscriber(USER)
        reg.connect(sub)
        ctx, notifier = await reg.create_execution_context("triage", USER, "m")
        await notifier.send_tool_executing("search", {"q": 1})
        payload = {"status": "succeeded", "result": "done"}
        assert await reg.ensure_event_delivery(ctx, "agent_completed", payload) is True
        assert ctx.status == "succeeded" and ctx.done.is_set()
        events = sub.received[ctx.run_id]
        assert types_of(events) == [S, TE, TC, C]
        assert events[2].payload["status"] == "error"
        assert events[-1].payload == payload


async def test_a_seed_run_never_completed_still_times_out_with_a_terminal_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_registry(config(agent_timeout_s=7), agents=make_agents()) as reg:
        sub = MemorySubscriber(USER)
        reg.connect(sub)
        t0 = trio.current_time()
        ctx, notifier = await reg.create_execution_context("triage", USER, "m")
        await notifier.send_agent_started()
        await notifier.send_tool_executing("search")
        payload = await ctx.wait_done()
        assert trio.current_time() - t0 == pytest.approx(7)
        assert payload["status"] == "timed_out"
        events = sub.received[ctx.run_id]
        assert types_of(events) == [S, TE, TC, C]
        assert events[2].payload["status"] == "cancelled"
        assert reg.statistics().active_runs == 0


async def test_a_seed_run_abandoned_at_registry_exit_is_cancelled() -> None:
    sub = MemorySubscriber(USER)
    async with open_registry(config(), agents=make_agents()) as reg:
        reg.connect(sub)
        ctx, notifier = await reg.create_execution_context("triage", USER, "m")
        await notifier.send_agent_thinking("hmm")
    assert types_of(sub.received[ctx.run_id]) == [S, T, C]
    assert ctx.status == "cancelled"


async def test_complete_execution_with_an_exception_fails_the_run() -> None:
    async with open_registry(config(expose_errors=True), agents=make_agents()) as reg:
        sub = MemorySubscriber(USER)
        reg.connect(sub)
        ctx, _ = await reg.create_execution_context("triage", USER, "m")
        await reg.complete_execution(ctx, ValueError("no printer"))
        final = sub.received[ctx.run_id][-1].payload
        assert final == {"status": "failed", "error": "ValueError: no printer",
                         "error_id": final["error_id"]}
        await reg.complete_execution(ctx, "too late")
        assert ctx.status == "failed"
        assert len(sub.received[ctx.run_id]) == 2


async def test_notifier_completion_with_an_error_fails_the_run() -> None:
    async with open_registry(config(), agents=make_agents()) as reg:
        ctx, notifier = await reg.create_execution_context("triage", USER, "m")
        assert await notifier.send_tool_executing("search", call_id="c-9")
        assert await notifier.send_tool_completed("search", error="timeout")
        assert await notifier.send_agent_completed(error="search failed")
        events = list(ctx.stream.events_after(0))
        assert events[2].payload == {"tool": "search", "call_id": "c-9", "status": "error",
                                     "error": "timeout"}
        assert events[-1].payload == {"status": "failed", "error": "search failed"}


async def test_concurrent_creates_with_one_request_id_make_one_context() -> None:
    """100 tasks inside ``create_execution_context`` at once: one run, 99 duplicates."""
    async with open_registry(config(), agents=make_agents()) as reg:
        answers: list[tuple[Any, bool]] = []
        entered, entered_before_any_answer = 0, []

        async def create() -> None:
            nonlocal entered
            entered += 1
            ctx, notifier = await reg.create_execution_context(
                "triage", USER, "m", {"request_id": "x"})
            entered_before_any_answer.append(entered)
            answers.append((ctx, notifier.duplicate))

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(create)
        assert entered_before_any_answer[0] == 100  # the calls overlapped
        assert len({ctx for ctx, _ in answers}) == 1
        assert sorted(duplicate for _, duplicate in answers) == [False] + [True] * 99
        stats = reg.statistics()
        assert (stats.runs_started, stats.dedup_hits, stats.active_runs) == (1, 99, 1)


async def test_a_seed_run_reaches_every_connection_of_its_user_only() -> None:
    async with open_registry(config(), agents=make_agents()) as reg:
        first, second, stranger = (MemorySubscriber(USER), MemorySubscriber(USER),
                                   MemorySubscriber(OTHER_USER))
        for connection in (first, second, stranger):
            reg.connect(connection)
        ctx, notifier = await reg.create_execution_context("triage", USER, "m")
        await notifier.send_agent_started()
        await reg.complete_execution(ctx, "done")
        assert first.received[ctx.run_id] == second.received[ctx.run_id]
        assert len(first.received[ctx.run_id]) == 2
        assert not stranger.received


async def test_seed_runs_count_against_the_per_user_limit() -> None:
    async with open_registry(config(max_active_runs_per_user=1), agents=make_agents()) as reg:
        ctx, _ = await reg.create_execution_context("triage", USER, "m", {"request_id": "a"})
        with pytest.raises(RateLimited):
            await reg.create_execution_context("triage", USER, "m", {"request_id": "b"})
        again, _ = await reg.create_execution_context("triage", USER, "m", {"request_id": "a"})
        assert again is ctx
