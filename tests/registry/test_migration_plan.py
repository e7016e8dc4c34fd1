"""MIGRATION-PLAN.md's own snippets, run as written, and ``open_execution_context``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing

from registry import (
    AgentContext,
    AgentExecutionContext,
    AgentExecutionRegistry,
    AgentRegistry,
    DuplicateRun,
    EventType,
    InvalidField,
    MemorySubscriber,
    OutboundQueue,
    RunNotFound,
    Supervisor,
    ToolDispatcher,
    UnknownAgent,
    WebSocketManager,
    WebSocketNotifier,
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


def registry(**settings: Any) -> Any:
    return open_registry(config(**settings), agents=make_agents())


async def lookup(args: Mapping[str, Any]) -> Any:
    return {"hits": 3, "q": args["q"]}


async def researcher(ctx: AgentContext) -> Any:
    await ctx.think("looking it up")
    found = await ctx.tool("lookup", {"q": ctx.message})
    await ctx.partial("Unplug it")
    return found


async def crashing(ctx: AgentContext) -> Any:
    await ctx.think("hmm")
    raise LookupError("no such page")


def plan_supervisor() -> tuple[Supervisor, AgentRegistry]:
    """The backend's own supervisor and agent registry, as the plan's phase 2 has them."""
    tools, agent_registry = ToolDispatcher(), AgentRegistry()
    tools.register("lookup", lookup)
    agent_registry.register("researcher", researcher)
    agent_registry.register("crashing", crashing)
    return Supervisor(agent_registry, tools), agent_registry


# =========================================================================== BEFORE
async def test_the_before_snippet_runs_as_written() -> None:
    """Phase 2.1 BEFORE: a context by hand, a notifier on the manager, events straight out."""
    websocket_manager = WebSocketManager(max_connections_per_user=5)
    socket = MemorySubscriber(USER)
    websocket_manager.connect(socket)

    # Manual context creation
    websocket_context = AgentExecutionContext(
        run_id="run-1", user_id=USER, thread_id="thread-1", agent="triage",
        message="my printer is on fire")
    websocket_notifier = WebSocketNotifier(websocket_manager)
    await websocket_notifier.send_agent_started(context=websocket_context)

    (event,) = socket.received["run-1"]
    assert (event.type, event.seq, event.thread_id) == (S, 1, "thread-1")
    assert event.payload == {"agent": "triage"}


async def test_a_notifier_on_the_manager_writes_straight_to_the_users_connections() -> None:
    """The BEFORE notifier (the path ``delivery_mode = direct`` rolls back to), for a context
    the registry made: numbered by the run, sent once to every open connection of the user."""
    websocket_manager = WebSocketManager(max_connections_per_user=5)
    socket, stranger = MemorySubscriber(USER), MemorySubscriber(OTHER_USER)
    queue = OutboundQueue(USER, max_messages=10, max_bytes=10_000)
    for connection in (socket, stranger, queue):
        websocket_manager.connect(connection)
    async with registry() as reg:
        context, _ = await reg.create_execution_context("triage", USER, "m")
        websocket_notifier = WebSocketNotifier(websocket_manager)
        assert await websocket_notifier.send_agent_started(context=context)
        assert await websocket_notifier.send_agent_thinking("hmm", context=context)
        assert not await websocket_notifier.send_agent_started(context=context)  # refused
        await reg.complete_execution(context, "done")
    assert types_of(socket.received[context.run_id]) == [S, T]
    frames, _ = queue.take(10_000)
    assert frames == [e.json.encode() for e in socket.received[context.run_id]]
    assert not stranger.received
    with pytest.raises(TypeError, match="context="):
        await websocket_notifier.send_agent_thinking("no run named")


# ============================================================================ AFTER
class AgentService:
    """``agent_service_core.py`` after phase 2.1: the AFTER snippet, as written, in a method."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    async def execute_agent(
        self, agent_type: str, user_id: str, message: str, context: Any = None,
    ) -> Any:
        orchestrator = await get_agent_execution_registry()
        context, notifier = await orchestrator.create_execution_context(  # noqa: RUF059
            agent_type=agent_type,
            user_id=user_id,
            message=message,
            context=context
        )
        result = await self.supervisor.run(message, context.thread_id, user_id, context.run_id)
        await orchestrator.complete_execution(context, result)
        return result


async def test_the_after_snippet_runs_as_written() -> None:
    supervisor, agent_registry = plan_supervisor()
    async with open_registry(config()) as reg:
        orchestrator = await get_agent_execution_registry()
        await orchestrator.initialize()
        with pytest.raises(UnknownAgent):  # the registry knows no agent before the setup
            await AgentService(supervisor).execute_agent("researcher", USER, "hi")
        await orchestrator.setup_agent_websocket_integration(supervisor, agent_registry)
        socket = MemorySubscriber(USER)
        reg.connect(socket)
        result = await AgentService(supervisor).execute_agent(
            "researcher", USER, "printer fire", {"request_id": "req-1"})
        assert result == {"hits": 3, "q": "printer fire"}
        (run_id,) = socket.received
        context = reg.get_run(run_id, USER)
        assert (context.agent_type, context.context) == ("researcher", {"request_id": "req-1"})
        events = socket.received[run_id]
        assert types_of(events) == [S, T, TE, TC, P, C]
        assert check_run_events(events) == {"status": "succeeded", "result": result}
        stats = reg.statistics()
        assert (stats.runs_started, stats.runs_completed, stats.active_runs) == (1, 1, 0)


async def test_a_supervisor_failing_in_the_after_snippet_still_ends_the_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The snippet never completes a run whose supervisor raised: the registry ends it."""
    supervisor, agent_registry = plan_supervisor()
    async with open_registry(config(agent_timeout_s=30)) as reg:
        await reg.setup_agent_websocket_integration(supervisor, agent_registry)
        socket = MemorySubscriber(USER)
        reg.connect(socket)
        with pytest.raises(LookupError):
            await AgentService(supervisor).execute_agent("crashing", USER, "hi")
        (run_id,) = socket.received
        run = reg.get_run(run_id, USER)
        assert (await run.wait_done())["status"] == "timed_out"
        assert types_of(socket.received[run_id]) == [S, T, C]


# ================================================================= phase 1.1 methods
async def test_the_phase_1_methods_take_the_plans_keywords_and_return_its_types() -> None:
    async with registry() as reg:
        context, notifier = await reg.create_execution_context(
            agent_type="triage", user_id=USER, message="m")
        assert isinstance(context, AgentExecutionContext)
        assert isinstance(notifier, WebSocketNotifier) and notifier.run is context
        delivered = await reg.ensure_event_delivery(
            context=context, event_type="agent_thinking", payload={"thought": "t"})
        assert delivered is True
        swept = await reg.cleanup_stale_contexts()
        assert type(swept) is int and swept == 0
        assert await reg.setup_agent_websocket_integration(Supervisor(), make_agents()) is None


async def test_setup_agent_websocket_integration_takes_the_plans_keywords() -> None:
    """The plan's signature is ``(supervisor, registry)``: a caller may name both."""
    supervisor, agent_registry = plan_supervisor()
    async with registry() as reg:
        await reg.setup_agent_websocket_integration(supervisor=supervisor, registry=agent_registry)
        payload = await supervisor.run_agent("researcher", USER, "m", request_id="r")
        assert payload["status"] == "succeeded"


async def test_a_repeated_create_returns_the_same_run_with_a_duplicate_notifier() -> None:
    async with registry() as reg:
        socket = MemorySubscriber(USER)
        reg.connect(socket)
        request = {"request_id": "x"}
        first, notifier = await reg.create_execution_context("triage", USER, "m", request)
        again, repeat = await reg.create_execution_context("triage", USER, "m", request)
        assert again is first and (notifier.duplicate, repeat.duplicate) == (False, True)
        assert await repeat.send_agent_thinking("through the duplicate")
        await reg.complete_execution(again, "done")
        assert types_of(socket.received[first.run_id]) == [S, T, C]
        assert reg.statistics().dedup_hits == 1


# ============================================================ open_execution_context
async def test_a_block_that_ends_completes_its_run_succeeded() -> None:
    async with registry() as reg:
        socket = MemorySubscriber(USER)
        reg.connect(socket)
        async with reg.open_execution_context("triage", USER, "m") as (run, notifier):
            assert await notifier.send_agent_thinking("hmm")
            assert run.is_active
        assert run.done.is_set() and reg.statistics().active_runs == 0
        events = socket.received[run.run_id]
        assert types_of(events) == [S, T, C]
        assert check_run_events(events) == {"status": "succeeded", "result": None}


async def test_a_block_that_raises_ends_its_run_failed_and_the_exception_goes_on() -> None:
    async with registry() as reg:
        socket = MemorySubscriber(USER)
        reg.connect(socket)
        with pytest.raises(LookupError, match="no such page"):
            async with reg.open_execution_context("triage", USER, "m") as (run, notifier):
                await notifier.send_tool_executing("search", call_id="c1")
                raise LookupError("no such page")
        events = socket.received[run.run_id]  # delivered before the exception left the block
        assert types_of(events) == [S, TE, TC, C]
        final = check_run_events(events)
        assert final == {"status": "failed", "error": "the agent failed",
                         "error_id": final["error_id"]}
        assert events[2].payload["status"] == "error"


async def test_a_registry_cancel_cancels_the_block_and_ends_the_run_cancelled() -> None:
    async def cancel_once_it_runs_a_tool(reg: AgentExecutionRegistry,
                                         socket: MemorySubscriber, run_id: str) -> None:
        await socket.wait_for(run_id, 2)
        assert reg.cancel(run_id, USER)

    async with registry() as reg, trio.open_nursery() as nursery:
        socket = MemorySubscriber(USER)
        reg.connect(socket)
        async with reg.open_execution_context("triage", USER, "m") as (run, notifier):
            nursery.start_soon(cancel_once_it_runs_a_tool, reg, socket, run.run_id)
            await notifier.send_tool_executing("search", call_id="c1")
            await trio.sleep_forever()
        events = socket.received[run.run_id]
        assert types_of(events) == [S, TE, TC, C]
        assert events[2].payload["status"] == "cancelled"
        assert check_run_events(events)["status"] == "cancelled"


async def test_a_block_longer_than_agent_timeout_s_is_cancelled_and_ends_timed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(agent_timeout_s=7) as reg:
        socket = MemorySubscriber(USER)
        reg.connect(socket)
        t0 = trio.current_time()
        async with reg.open_execution_context("triage", USER, "m") as (run, notifier):
            await notifier.send_agent_started()
            await trio.sleep(3600)
        assert trio.current_time() - t0 == pytest.approx(7)
        final = check_run_events(socket.received[run.run_id])
        assert final["status"] == "timed_out" and "agent_timeout_s" in final["error"]


async def test_the_callers_own_cancellation_ends_the_run_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry() as reg:
        socket = MemorySubscriber(USER)
        reg.connect(socket)
        with trio.move_on_after(5) as caller:
            async with reg.open_execution_context("triage", USER, "m") as (run, notifier):
                await notifier.send_agent_thinking("hmm")
                await trio.sleep_forever()
        assert caller.cancelled_caught
        events = socket.received[run.run_id]
        assert types_of(events) == [S, T, C]
        assert check_run_events(events)["status"] == "cancelled"


async def test_code_after_completing_the_run_in_its_block_still_runs() -> None:
    """``complete_execution`` returns once the run is ended; it does not skip the caller."""
    async with registry() as reg:
        ran_on: list[str] = []
        async with reg.open_execution_context("triage", USER, "m") as (run, _):
            await reg.complete_execution(run, "done")
            ran_on.append("after complete_execution")
        assert run.status == "succeeded"
        assert ran_on == ["after complete_execution"]


async def test_a_block_for_a_request_already_running_raises_duplicate_run() -> None:
    async with registry() as reg:
        first, _ = await reg.create_execution_context("triage", USER, "m", {"request_id": "x"})
        with pytest.raises(DuplicateRun) as info:
            async with reg.open_execution_context("triage", USER, "m", {"request_id": "x"}):
                raise AssertionError("a duplicate block must not run")
        assert first.is_active
        assert info.value.run is first
        stats = reg.statistics()
        assert (stats.runs_started, stats.dedup_hits) == (1, 1)


@pytest.mark.parametrize(("agent", "user_id", "error"), [
    ("nope", USER, UnknownAgent), ("triage", "", InvalidField)])
async def test_a_block_that_cannot_start_raises_and_starts_nothing(
    agent: str, user_id: str, error: type[Exception],
) -> None:
    async with registry() as reg:
        with pytest.raises(error) as info:
            async with reg.open_execution_context(agent, user_id, "m"):
                raise AssertionError("a refused block must not run")
        if isinstance(info.value, InvalidField):
            assert info.value.field == "user_id"
        assert reg.statistics().runs_started == 0


async def test_supervisor_run_runs_only_the_run_it_names() -> None:
    supervisor, agent_registry = plan_supervisor()
    async with registry() as reg:
        await reg.setup_agent_websocket_integration(supervisor, agent_registry)
        context, _ = await reg.create_execution_context("researcher", USER, "printer")
        for message, thread_id, user_id in [("printer", "thread-x", USER),
                                            ("scanner", context.thread_id, USER),
                                            ("printer", context.thread_id, OTHER_USER)]:
            with pytest.raises(RunNotFound):
                await supervisor.run(message, thread_id, user_id, context.run_id)
        assert context.last_seq == 0
