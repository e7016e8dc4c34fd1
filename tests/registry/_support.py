"""Agents, subscribers and checks shared by the registry tests (backend-neutral, on anyio)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import trio
import trio.testing

from registry import AgentContext, AgentFn, AgentRegistry, Event, EventType, RunStatus

USER = "alice"
OTHER_USER = "bob"

ABANDONED = frozenset({RunStatus.CANCELLED, RunStatus.TIMED_OUT})


def make_agents(**agents: AgentFn) -> AgentRegistry:
    """An :class:`AgentRegistry` with each keyword registered as an agent of that name.

    ``triage`` (the migration plan's example agent, an echo) is always there too.
    """
    registry = AgentRegistry()
    for name, fn in {"triage": echo, **agents}.items():
        registry.register(name, fn)
    return registry


async def tool_forever(args: Mapping[str, Any]) -> Any:
    await anyio.sleep_forever()


async def tool_fails(args: Mapping[str, Any]) -> Any:
    raise LookupError("no such page")


async def echo(ctx: AgentContext) -> Any:
    await ctx.think("thinking")
    return ctx.message


async def chatty(ctx: AgentContext) -> Any:
    """started, thinking, one tool pair, three partials, completed: 7 events."""
    await ctx.think("thinking")
    await ctx.tool("search", {"q": ctx.message}, fn=_instant)
    for word in ("a", "b", "c"):
        await ctx.partial(word)
    return "abc"


async def hang(ctx: AgentContext) -> Any:
    await ctx.think("waiting")
    await anyio.sleep_forever()


async def in_tool(ctx: AgentContext) -> Any:
    """Emits agent_started and tool_executing, then waits in the tool forever."""
    return await ctx.tool("search", {"q": ctx.message}, fn=tool_forever)


async def boom_with_open_tool(ctx: AgentContext) -> Any:
    """Opens a tool call by hand and raises before closing it."""
    await ctx.emit(EventType.TOOL_EXECUTING, {"tool": "fetch", "call_id": "c-1", "args": {}})
    raise ValueError("boom")


async def _instant(args: Mapping[str, Any]) -> Any:
    return {"hits": 3}


def types_of(events: Sequence[Event]) -> list[EventType]:
    return [e.type for e in events]


def check_run_events(events: Sequence[Event]) -> Mapping[str, Any]:
    """Asserts PROTOCOL.md guarantees 1-3 on a run's whole event list; returns the final payload.

    Tools still open when the run ended must be closed ``cancelled`` when the run was cancelled
    or timed out, else ``error``.
    """
    assert events, "a run emits at least agent_started and agent_completed"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len({(e.run_id, e.thread_id) for e in events}) == 1
    assert events[0].type is EventType.AGENT_STARTED
    assert [e.type for e in events].count(EventType.AGENT_COMPLETED) == 1
    assert events[-1].type is EventType.AGENT_COMPLETED
    final = events[-1].payload
    _check_tool_pairs(events[:-1], RunStatus(final["status"]))
    return final


def _check_tool_pairs(events: Sequence[Event], status: RunStatus) -> None:
    open_calls: dict[str, str] = {}
    seen: set[str] = set()
    for event in events:
        if event.type is EventType.TOOL_EXECUTING:
            call_id = event.payload["call_id"]
            assert call_id not in seen, f"call id {call_id} reused"
            seen.add(call_id)
            open_calls[call_id] = event.payload["tool"]
        elif event.type is EventType.TOOL_COMPLETED:
            assert open_calls.pop(event.payload["call_id"]) == event.payload["tool"]
    assert not open_calls, f"tool calls never completed: {open_calls}"


def closing_status(status: RunStatus) -> str:
    """The status the stream must give a tool still open when a run ends with ``status``."""
    return "cancelled" if status in ABANDONED else "error"


def run_task_names() -> list[str]:
    """The run tasks (named ``run <run_id>``) in the nurseries of the current trio task."""
    nurseries = trio.lowlevel.current_task().child_nurseries
    names = [task.name for nursery in nurseries for task in nursery.child_tasks]
    return [name for name in names if name.startswith("run ")]


async def assert_no_run_tasks() -> None:
    """Asserts (under trio) that every run task of the open registry has returned."""
    await trio.testing.wait_all_tasks_blocked()
    assert run_task_names() == []
