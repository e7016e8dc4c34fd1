"""Agents, subscribers and checks shared by the registry tests (backend-neutral, on anyio)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import trio
import trio.testing

from loadtests.checker import check_run
from registry import AgentContext, AgentFn, AgentRegistry, Config, Event, EventType, RunStatus

USER = "alice"
OTHER_USER = "bob"

ABANDONED = frozenset({RunStatus.CANCELLED, RunStatus.TIMED_OUT})
#: How the stream's ``error`` ends on a tool it closed because the run ended.
CLOSED_BY_END = "before the tool completed"


def config(**settings: Any) -> Config:
    """The registry tests' :class:`Config`: ``strict`` (a refused event raises), plus ``settings``.

    Only the tests of the non-strict behaviour (a refused event returns False) build their own.
    """
    return Config(**{"strict": True, **settings})


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
    """Asserts PROTOCOL.md's per-run guarantees on a run's whole event list; its final payload.

    The guarantees are the shared checker's (:func:`loadtests.checker.check_run`, on the
    events' wire form). On top, the tools the stream itself closed when the run ended (their
    ``error`` says so) must carry the status that end implies: ``cancelled`` when the run was
    cancelled or timed out, else ``error``.
    """
    frames = [event.to_dict() for event in events]
    final = check_run(frames)
    status = RunStatus(final["status"])
    for frame in frames:
        payload = frame["payload"]
        if frame["type"] == "tool_completed" and CLOSED_BY_END in str(payload.get("error")):
            assert payload["error"] == f"run ended ({status}) {CLOSED_BY_END}", payload
            assert payload["status"] == closing_status(status), payload
    return final


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
