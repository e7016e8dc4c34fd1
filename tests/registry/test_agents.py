"""AgentRegistry, ToolDispatcher, AgentContext, WebSocketNotifier and connection limits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing

from registry import (
    AgentContext,
    AgentRegistry,
    Config,
    EventRefused,
    EventType,
    MemorySubscriber,
    ToolDispatcher,
    TooManyConnections,
    UnknownAgent,
    WebSocketManager,
    WebSocketNotifier,
    open_registry,
)
from tests.registry._support import USER, check_run_events, config, echo, make_agents, types_of

S, TE, TC, C = (EventType.AGENT_STARTED, EventType.TOOL_EXECUTING, EventType.TOOL_COMPLETED,
                EventType.AGENT_COMPLETED)


async def lookup(args: Mapping[str, Any]) -> Any:
    return {"echo": args.get("q")}


def test_agent_names_are_unique_and_non_empty() -> None:
    agents = AgentRegistry()
    agents.register("echo", echo)
    for name in ("echo", ""):
        with pytest.raises(ValueError):
            agents.register(name, echo)
    assert agents.names() == ("echo",)
    with pytest.raises(UnknownAgent):
        agents.get("nope")


def test_tool_names_are_unique_and_non_empty() -> None:
    tools = ToolDispatcher()
    tools.register("search", lookup)
    for name in ("search", ""):
        with pytest.raises(ValueError):
            tools.register(name, lookup)
    assert tools.names() == ("search",)


async def test_an_agent_sees_its_request_through_its_context(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def introspect(ctx: AgentContext) -> Any:
        await ctx.sleep(3)
        return {"message": ctx.message, "context": dict(ctx.options), "run_id": ctx.run_id,
                "user_id": ctx.user_id, "thread_id": ctx.thread_id}

    async with open_registry(config(), agents=make_agents(introspect=introspect)) as reg:
        t0 = trio.current_time()
        run, _ = reg.start_run(user_id=USER, request_id="r", agent="introspect",
                               message="hello", context={"k": 1}, thread_id="t-1")
        payload = await run.wait_done()
        assert 3 <= trio.current_time() - t0 <= 3.016  # at most one of the pacer's long ticks
        assert payload["result"] == {"message": "hello", "context": {"k": 1},
                                     "run_id": run.run_id, "user_id": USER, "thread_id": "t-1"}
        assert run.last_seq == 2


async def test_registered_tools_run_by_name_between_their_two_events() -> None:
    async def researcher(ctx: AgentContext) -> Any:
        first = await ctx.tool("search", {"q": 1})
        second = await ctx.tool("search", {"q": 2})
        return [first, second]

    tools = ToolDispatcher()
    tools.register("search", lookup)
    async with open_registry(config(), agents=make_agents(r=researcher), tools=tools) as reg:
        sub = MemorySubscriber(USER)
        run, _ = reg.start_run(user_id=USER, request_id="r", agent="r", message="m",
                               subscriber=sub)
        assert (await run.wait_done())["result"] == [{"echo": 1}, {"echo": 2}]
        events = sub.received[run.run_id]
        assert types_of(events) == [S, TE, TC, TE, TC, C]
        assert events[1].payload["args"] == {"q": 1}
        assert events[2].payload == {"tool": "search", "call_id": events[1].payload["call_id"],
                                     "status": "ok", "result": {"echo": 1}}
        assert events[1].payload["call_id"] != events[3].payload["call_id"]
        check_run_events(events)


async def test_calling_a_tool_that_is_not_registered_fails_the_run() -> None:
    async def lost(ctx: AgentContext) -> Any:
        return await ctx.tool("nope")

    async with open_registry(config(expose_errors=True), agents=make_agents(lost=lost)) as reg:
        run, _ = reg.start_run(user_id=USER, request_id="r", agent="lost", message="m")
        payload = await run.wait_done()
        assert payload["status"] == "failed" and "KeyError" in payload["error"]
        assert types_of(list(run.stream.events_after(0))) == [S, C]


async def test_the_notifier_closes_the_most_recent_open_call_of_a_tool() -> None:
    async with open_registry(config(), agents=make_agents()) as reg:
        ctx, notifier = await reg.create_execution_context("triage", USER, "m")
        assert await notifier.send_tool_executing("search", call_id="a")
        assert await notifier.send_tool_executing("search", call_id="b")
        assert await notifier.send_tool_completed("search", 1)
        assert await notifier.send_tool_completed("search", 2)
        with pytest.raises(EventRefused, match="not open"):
            await notifier.send_tool_completed("search", 3)
        assert await notifier.send_tool_executing("fetch", call_id="c")
        assert await notifier.send_tool_completed("fetch", status="cancelled", call_id="c")
        await reg.complete_execution(ctx, "done")
        closes = [e.payload for e in ctx.stream.events_after(0) if e.type is TC]
        assert [(p["call_id"], p["status"]) for p in closes] == [
            ("b", "ok"), ("a", "ok"), ("c", "cancelled")]
        assert [p.get("result") for p in closes[:2]] == [1, 2]


async def test_the_notifier_after_the_run_ended_returns_false() -> None:
    """Not strict: a refused event is False."""
    async with open_registry(Config(strict=False), agents=make_agents()) as reg:
        ctx, notifier = await reg.create_execution_context("triage", USER, "m")
        await reg.complete_execution(ctx, "done")
        assert not await notifier.send_tool_executing("search")
        assert not await notifier.send_partial_result("late")
        assert not await notifier.send_agent_completed("again")
        assert ctx.status == "succeeded"


async def test_connections_per_user_are_limited() -> None:
    async with open_registry(config(max_connections_per_user=2)) as reg:
        first, second, third = (MemorySubscriber(USER) for _ in range(3))
        reg.connect(first)
        reg.connect(second)
        reg.connect(second)
        with pytest.raises(TooManyConnections):
            reg.connect(third)
        reg.connect(MemorySubscriber("someone else"))
        reg.disconnect(first)
        reg.connect(third)
        assert reg.statistics().connections == 3
        assert set(reg.manager.connections(USER)) == {second, third}


async def test_a_notifier_refuses_to_be_bound_to_nothing_or_to_serve_another_run() -> None:
    async def emit(kind: Any, payload: Any) -> bool:
        return True

    with pytest.raises(TypeError, match="bound"):
        WebSocketNotifier(WebSocketManager(1), emit)
    async with open_registry(config(), agents=make_agents()) as reg:
        mine, notifier = await reg.create_execution_context("triage", USER, "m")
        other, _ = await reg.create_execution_context("triage", USER, "m")
        with pytest.raises(TypeError, match="bound"):
            WebSocketNotifier(mine)
        with pytest.raises(ValueError, match="another run"):
            await notifier.send_agent_thinking("hmm", context=other)
        assert (mine.last_seq, other.last_seq) == (0, 0)
        assert await notifier.send_agent_thinking("hmm", context=mine)
