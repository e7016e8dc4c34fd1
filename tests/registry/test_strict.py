"""``Config.strict``: an event the registry refuses raises ``EventRefused``; the run goes on.

Without ``strict`` the same events return False (test_delivery.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from registry import AgentContext, EventRefused, EventType, MemorySubscriber, open_registry
from tests.registry._support import USER, check_run_events, config, make_agents, types_of

S, T, P, C = (EventType.AGENT_STARTED, EventType.AGENT_THINKING, EventType.PARTIAL_RESULT,
              EventType.AGENT_COMPLETED)
UNPAIRED = {"tool": "search", "call_id": "nope", "status": "ok", "result": 1}

#: event type, payload, and what the refusal must say, for each rule an event can break.
DURING_THE_RUN: dict[str, tuple[str, Any, str]] = {
    "unknown event type": ("agent_thinkin", {"thought": "x"}, "'agent_thinkin'"),
    "bad payload": ("agent_thinking", {"thought": 1}, "'thought' of type str"),
    "payload not an object": ("agent_thinking", "hmm", "JSON object"),
    "bad completion": ("agent_completed", {"status": "exploded", "error": "x"}, "'exploded'"),
    "second agent_started": ("agent_started", {"agent": "triage"}, "already sent"),
    "unpaired tool_completed": ("tool_completed", UNPAIRED, "'nope' is not open"),
}


def registry(**settings: Any) -> Any:
    return open_registry(config(**settings), agents=make_agents())


@pytest.mark.parametrize(("event_type", "payload", "says"), DURING_THE_RUN.values(),
                         ids=DURING_THE_RUN)
async def test_a_refused_event_raises_and_leaves_the_run_unharmed(
    event_type: str, payload: Any, says: str,
) -> None:
    async with registry() as reg:
        socket = MemorySubscriber(USER)
        reg.connect(socket)
        ctx, notifier = await reg.create_execution_context("triage", USER, "m")
        assert await notifier.send_agent_started()
        with pytest.raises(EventRefused) as info:
            await reg.ensure_event_delivery(ctx, event_type, payload)
        assert ctx.run_id in str(info.value) and says in str(info.value)
        assert ctx.is_active and ctx.last_seq == 1
        assert await notifier.send_partial_result("still here")
        await reg.complete_execution(ctx, "fine")
        events = socket.received[ctx.run_id]
        assert types_of(events) == [S, P, C]
        assert check_run_events(events) == {"status": "succeeded", "result": "fine"}
        stats = reg.statistics()
        assert (stats.events_refused, stats.events_failed) == (1, 0)
        assert reg.health().ok


async def test_an_event_after_completion_raises_and_changes_nothing() -> None:
    async with registry() as reg:
        socket = MemorySubscriber(USER)
        reg.connect(socket)
        ctx, _ = await reg.create_execution_context("triage", USER, "m")
        await reg.complete_execution(ctx, "done")
        with pytest.raises(EventRefused, match="has ended") as info:
            await reg.ensure_event_delivery(ctx, "agent_thinking", {"thought": "late"})
        assert ctx.run_id in str(info.value)
        await reg.complete_execution(ctx, "again")  # a second completion is a no-op, not refused
        assert ctx.status == "succeeded"
        assert check_run_events(socket.received[ctx.run_id]) == {
            "status": "succeeded", "result": "done"}
        assert reg.statistics().events_refused == 1


@pytest.mark.parametrize("kind", [*DURING_THE_RUN, "after completion"])
async def test_a_refusal_names_the_run_once(kind: str) -> None:
    """A refusal reads ``run <id>: <the rule broken>``, not ``run <id>: run <id>: ...``."""
    event_type, payload, _ = DURING_THE_RUN.get(
        kind, ("agent_thinking", {"thought": "late"}, ""))
    async with registry() as reg:
        ctx, notifier = await reg.create_execution_context("triage", USER, "m")
        await notifier.send_agent_started()
        if kind == "after completion":
            await reg.complete_execution(ctx, "done")
        with pytest.raises(EventRefused) as info:
            await reg.ensure_event_delivery(ctx, event_type, payload)
        assert str(info.value).count(ctx.run_id) == 1, str(info.value)


async def test_an_agent_breaking_a_stream_rule_fails_its_run_with_the_refusal() -> None:
    async def sloppy(ctx: AgentContext) -> Any:
        await ctx.think("closing a tool I never opened")
        await ctx.emit("tool_completed", UNPAIRED)
        raise AssertionError("not reached: the refusal raised into the agent")

    async with open_registry(config(expose_errors=True), agents=make_agents(s=sloppy)) as reg:
        socket = MemorySubscriber(USER)
        run, _ = reg.start_run(user_id=USER, request_id="r", agent="s", message="m",
                               subscriber=socket)
        final = await run.wait_done()
        assert final["status"] == "failed"
        assert final["error"].startswith("EventRefused: ")
        assert "'nope' is not open" in final["error"]
        assert types_of(socket.received[run.run_id]) == [S, T, C]
        check_run_events(socket.received[run.run_id])
