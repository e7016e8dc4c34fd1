"""AgentExecutionRegistry under trio: runs, dedup, every way a run ends, limits, introspection."""

from __future__ import annotations

import re
from typing import Any

import pytest
import trio
import trio.testing

from registry import (
    AgentContext,
    AgentExecutionRegistry,
    Config,
    Event,
    EventType,
    InvalidField,
    MemorySubscriber,
    Overloaded,
    RateLimited,
    RegistryClosed,
    RunNotFound,
    RunState,
    Subscriber,
    Supervisor,
    UnknownAgent,
    get_agent_execution_registry,
    open_registry,
)
from tests.registry._support import (
    OTHER_USER,
    USER,
    assert_no_run_tasks,
    boom_with_open_tool,
    chatty,
    check_run_events,
    config,
    echo,
    hang,
    in_tool,
    make_agents,
    run_task_names,
    tool_fails,
    types_of,
)

AGENTS = {"echo": echo, "chatty": chatty, "hang": hang, "in_tool": in_tool,
          "boom": boom_with_open_tool}
S, T, TE, TC, P, C = (EventType.AGENT_STARTED, EventType.AGENT_THINKING, EventType.TOOL_EXECUTING,
                      EventType.TOOL_COMPLETED, EventType.PARTIAL_RESULT,
                      EventType.AGENT_COMPLETED)


def registry(**settings: Any) -> Any:
    """``open_registry`` with the test agents and a strict config with ``settings``."""
    return open_registry(config(**settings), agents=make_agents(**AGENTS))


def start(reg: AgentExecutionRegistry, agent: str, request_id: str = "req-1", *,
          user: str = USER, sub: Subscriber | None = None, **kw: Any) -> Any:
    run, _ = reg.start_run(user_id=user, request_id=request_id, agent=agent,
                           message="hello", subscriber=sub, **kw)
    return run


# ================================================================= completing runs
async def test_a_run_completes_with_its_result_and_is_unregistered() -> None:
    async with registry() as reg:
        sub = MemorySubscriber(USER)
        run, duplicate = reg.start_run(user_id=USER, request_id="r", agent="chatty",
                                       message="hello", subscriber=sub)
        assert not duplicate
        assert await run.wait_done() == {"status": "succeeded", "result": "abc"}
        events = sub.received[run.run_id]
        assert types_of(events) == [S, T, TE, TC, P, P, P, C]
        assert check_run_events(events)["result"] == "abc"
        assert {e.thread_id for e in events} == {run.thread_id}
        assert run.state is RunState.COMPLETED and not run.is_active
        assert reg.statistics().active_runs == 0
        assert reg.active_runs() == ()
        await assert_no_run_tasks()


async def test_a_given_thread_id_is_on_every_event() -> None:
    async with registry() as reg:
        sub = MemorySubscriber(USER)
        run = start(reg, "echo", sub=sub, thread_id="thread-42")
        await run.wait_done()
        assert {e.thread_id for e in sub.received[run.run_id]} == {"thread-42"}


async def test_run_ids_are_unguessable_hex_of_128_bits() -> None:
    async with registry() as reg:
        ids = [start(reg, "echo", "r", user=f"u{i}").run_id for i in range(1000)]
        assert all(re.fullmatch("[0-9a-f]{32}", run_id) for run_id in ids), ids[:3]
        assert len(set(ids)) == 1000
        # 128 random bits: every hex digit takes every value somewhere among 1000 ids
        assert all(len({run_id[i] for run_id in ids}) == 16 for i in range(32))


# ========================================================================== dedup
async def test_a_repeated_start_finds_the_run_and_subscribes_nobody_new() -> None:
    """``start_run`` does not block, so repeats cannot race it; see test_migration_plan for
    concurrent ``create_execution_context`` calls, which can."""
    async with registry() as reg:
        subs = [MemorySubscriber(USER) for _ in range(5)]
        answers = [reg.start_run(user_id=USER, request_id="same", agent="hang", message="m",
                                 subscriber=sub) for sub in subs]
        run = answers[0][0]
        assert answers == [(run, False)] + [(run, True)] * 4
        await subs[0].wait_for(run.run_id, 2)
        assert types_of(subs[0].received[run.run_id]) == [S, T]
        assert all(not sub.received for sub in subs[1:])
        assert reg.manager.subscribers(run.run_id) == (subs[0],)
        stats = reg.statistics()
        assert (stats.dedup_hits, stats.runs_started, stats.active_runs) == (4, 1, 1)


async def test_the_same_request_id_from_two_users_is_two_runs() -> None:
    async with registry() as reg:
        mine = start(reg, "hang", "same")
        theirs = start(reg, "hang", "same", user=OTHER_USER)
        assert mine.run_id != theirs.run_id
        assert reg.statistics().dedup_hits == 0
        assert reg.statistics().active_runs_per_user == {USER: 1, OTHER_USER: 1}


async def test_a_request_id_starts_a_new_run_retention_s_after_the_old_one_ended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(retention_s=50) as reg:
        first = start(reg, "hang", "same")
        await trio.sleep(30)
        reg.cancel(first.run_id, USER)
        await first.wait_done()
        await trio.sleep(49)
        again, duplicate = reg.start_run(user_id=USER, request_id="same", agent="echo",
                                         message="hello")
        assert (again, duplicate) == (first, True)
        reg.resume(first.run_id, USER, 0, MemorySubscriber(USER))
        await trio.sleep(2)
        with pytest.raises(RunNotFound):
            reg.get_run(first.run_id, USER)
        fresh, duplicate = reg.start_run(user_id=USER, request_id="same", agent="echo",
                                         message="hello")
        assert not duplicate and fresh.run_id != first.run_id
        assert reg.statistics().retained_runs == 1


# ======================================================================= endings
async def test_cancel_during_a_tool_closes_it_and_ends_cancelled() -> None:
    async with registry() as reg:
        sub = MemorySubscriber(USER)
        run = start(reg, "in_tool", sub=sub)
        await sub.wait_for(run.run_id, 2)
        assert run_task_names() == [f"run {run.run_id}"]
        assert reg.cancel(run.run_id, USER) is True
        payload = await run.wait_done()
        events = sub.received[run.run_id]
        assert types_of(events) == [S, TE, TC, C]
        assert events[2].payload["call_id"] == events[1].payload["call_id"]
        assert events[2].payload["status"] == "cancelled"
        assert payload["status"] == "cancelled" and "error" in payload
        assert check_run_events(events) == payload
        assert reg.statistics().active_runs == 0
        await assert_no_run_tasks()


async def test_cancel_of_an_ended_run_is_a_no_op() -> None:
    async with registry() as reg:
        sub = MemorySubscriber(USER)
        run = start(reg, "echo", sub=sub)
        await run.wait_done()
        assert reg.cancel(run.run_id, USER) is False
        assert run.status == "succeeded"
        assert len(sub.received[run.run_id]) == 3


async def test_cancel_of_another_users_run_is_not_found() -> None:
    async with registry() as reg:
        run = start(reg, "hang")
        with pytest.raises(RunNotFound):
            reg.cancel(run.run_id, OTHER_USER)
        with pytest.raises(RunNotFound):
            reg.cancel("no-such-run", USER)
        assert run.is_active


async def test_an_agent_exception_fails_the_run_and_errors_its_open_tool() -> None:
    async with registry() as reg:
        sub = MemorySubscriber(USER)
        run = start(reg, "boom", sub=sub)
        payload = await run.wait_done()
        events = sub.received[run.run_id]
        assert types_of(events) == [S, TE, TC, C]
        assert events[2].payload["status"] == "error"
        assert payload == {"status": "failed", "error": "the agent failed",
                           "error_id": payload["error_id"]}
        assert len(payload["error_id"]) == 16 and "ValueError" not in str(events)
        check_run_events(events)
        assert reg.statistics().active_runs == 0
        await assert_no_run_tasks()


async def test_a_failing_tool_is_completed_error_by_the_dispatcher() -> None:
    async def agent(ctx: AgentContext) -> Any:
        return await ctx.tool("fetch", {"url": "x"}, fn=tool_fails)

    async with open_registry(config(expose_errors=True), agents=make_agents(agent=agent)) as reg:
        sub = MemorySubscriber(USER)
        run = start(reg, "agent", sub=sub)
        payload = await run.wait_done()
        events = sub.received[run.run_id]
        assert types_of(events) == [S, TE, TC, C]
        assert events[2].payload["error"] == "LookupError: no such page"
        assert payload["status"] == "failed"


async def test_failures_reach_the_client_as_a_generic_text_and_the_log_in_full(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def agent(ctx: AgentContext) -> Any:
        return await ctx.tool("fetch", {"url": "x"}, fn=tool_fails)

    async with open_registry(config(), agents=make_agents(agent=agent)) as reg:
        sub = MemorySubscriber(USER)
        run = start(reg, "agent", sub=sub)
        payload = await run.wait_done()
        tool_done = sub.received[run.run_id][2].payload
    assert tool_done["error"] == "the tool failed" and payload["error"] == "the agent failed"
    assert tool_done["error_id"] != payload["error_id"]
    logged = {r.getMessage(): r for r in caplog.records if "error_id=" in r.getMessage()}
    tool_log = next(r for m, r in logged.items() if tool_done["error_id"] in m)
    assert tool_log.exc_info is not None and "no such page" in str(tool_log.exc_info[1])


async def test_an_agent_exceeding_agent_timeout_s_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(agent_timeout_s=5) as reg:
        sub = MemorySubscriber(USER)
        t0 = trio.current_time()
        run = start(reg, "in_tool", sub=sub)
        payload = await run.wait_done()
        assert trio.current_time() - t0 == pytest.approx(5)
        events = sub.received[run.run_id]
        assert types_of(events) == [S, TE, TC, C]
        assert events[2].payload["status"] == "cancelled"
        assert payload["status"] == "timed_out" and "agent_timeout_s" in payload["error"]
        check_run_events(events)
        assert reg.statistics().active_runs == 0
        await assert_no_run_tasks()


async def test_a_run_nobody_is_subscribed_to_is_cancelled_after_the_detach_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(detached_run_timeout_s=3) as reg:
        t0 = trio.current_time()
        run = start(reg, "in_tool")
        payload = await run.wait_done()
        assert trio.current_time() - t0 == pytest.approx(3)
        assert payload["status"] == "cancelled" and "detached" in payload["error"]
        events = list(run.stream.events_after(0))
        assert types_of(events) == [S, TE, TC, C]
        assert events[2].payload["status"] == "cancelled"
        assert reg.statistics().active_runs == 0
        await assert_no_run_tasks()


async def test_a_run_whose_last_connection_left_is_cancelled_after_the_detach_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(detached_run_timeout_s=3) as reg:
        sub = MemorySubscriber(USER)
        reg.connect(sub)
        run = start(reg, "hang", sub=sub)
        await sub.wait_for(run.run_id, 2)
        await trio.sleep(10)
        assert run.is_active
        reg.disconnect(sub)
        t0 = trio.current_time()
        payload = await run.wait_done()
        assert trio.current_time() - t0 == pytest.approx(3)
        assert payload["status"] == "cancelled"
        assert len(sub.received[run.run_id]) == 2
        assert reg.statistics().connections == 0


async def test_resubscribing_before_the_detach_deadline_keeps_the_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(detached_run_timeout_s=3) as reg:
        run = start(reg, "hang")
        await trio.sleep(2.5)
        sub = MemorySubscriber(USER)
        reg.resume(run.run_id, USER, 0, sub)
        await trio.sleep(100)
        assert run.is_active
        assert types_of(sub.received[run.run_id]) == [S, T]
        reg.cancel(run.run_id, USER)
        assert (await run.wait_done())["status"] == "cancelled"


async def test_the_detach_timeout_counts_from_the_last_subscriber_leaving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(detached_run_timeout_s=3) as reg:
        t0 = trio.current_time()
        run = start(reg, "hang")
        await trio.sleep(1)
        sub = MemorySubscriber(USER)
        reg.connect(sub)
        reg.resume(run.run_id, USER, 0, sub)
        await trio.sleep(1)
        reg.disconnect(sub)
        await run.wait_done()
        assert trio.current_time() - t0 == pytest.approx(2 + 3)


async def test_cleanup_stale_contexts_ends_only_old_runs_and_counts_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = {"stale_context_age_s": 10, "sweep_interval_s": 10_000}
    async with registry(**config) as reg:
        old_sub, young_sub = MemorySubscriber(USER), MemorySubscriber(USER)
        old = start(reg, "in_tool", "old", sub=old_sub)
        await trio.sleep(11)
        young = start(reg, "hang", "young", sub=young_sub)
        assert await reg.cleanup_stale_contexts() == 1
        assert old.done.is_set() and young.is_active
        events = old_sub.received[old.run_id]
        assert types_of(events) == [S, TE, TC, C]
        assert events[2].payload["status"] == "cancelled"
        assert events[-1].payload["status"] == "cancelled"
        assert reg.statistics().active_runs == 1
        assert await reg.cleanup_stale_contexts() == 0


async def test_the_sweep_service_ends_stale_runs_by_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(stale_context_age_s=10, sweep_interval_s=4) as reg:
        sub = MemorySubscriber(USER)
        t0 = trio.current_time()
        run = start(reg, "hang", sub=sub)
        assert (await run.wait_done())["status"] == "cancelled"
        assert trio.current_time() - t0 == pytest.approx(12)


async def test_registry_exit_cancels_runs_in_flight_and_leaves_nothing() -> None:
    subs = [MemorySubscriber(USER) for _ in range(3)]
    nurseries_before = list(trio.lowlevel.current_task().child_nurseries)
    async with registry() as reg:
        runs = [start(reg, "in_tool", f"r{i}", sub=sub) for i, sub in enumerate(subs)]
        idle = start(reg, "hang", "idle")
        for run, sub in zip(runs, subs, strict=True):
            await sub.wait_for(run.run_id, 2)
        assert len(run_task_names()) == 4
    assert trio.lowlevel.current_task().child_nurseries == nurseries_before
    for run, sub in zip(runs, subs, strict=True):
        assert run.done.is_set() and run.state is RunState.COMPLETED
        events = sub.received[run.run_id]
        assert types_of(events) == [S, TE, TC, C]
        assert events[2].payload["status"] == "cancelled"
        assert check_run_events(events)["status"] == "cancelled"
    assert idle.status == "cancelled"
    stats = reg.statistics()
    assert (stats.active_runs, stats.runs_completed) == (0, 4)
    assert stats.runs_by_status == {"cancelled": 4}


async def test_an_error_in_the_block_still_ends_every_run() -> None:
    sub = MemorySubscriber(USER)
    with pytest.raises(KeyError):
        async with registry() as reg:
            run = start(reg, "in_tool", sub=sub)
            await sub.wait_for(run.run_id, 2)
            raise KeyError("oops")
    assert types_of(sub.received[run.run_id]) == [S, TE, TC, C]
    assert run.status == "cancelled"
    assert reg.statistics().active_runs == 0


async def test_an_error_in_the_block_propagates_unwrapped() -> None:
    """Like trio-websocket's ``open_websocket``: the registry's own nursery is invisible."""
    with pytest.raises(KeyError):
        async with registry():
            raise KeyError("oops")


async def test_cancelling_the_block_from_outside_still_ends_every_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sub = MemorySubscriber(USER)
    with trio.move_on_after(5):
        async with registry() as reg:
            run = start(reg, "in_tool", sub=sub)
            await trio.sleep_forever()
    assert types_of(sub.received[run.run_id]) == [S, TE, TC, C]
    assert run.status == "cancelled"


# ============================================================ bounded by the grace
class StuckOnTheEnd:
    """A transport that takes live events at once but hangs an hour on ``agent_completed``.

    It claims never to block (``immediate_delivery``), so no per-attempt timeout bounds it:
    only ``shutdown_grace_s`` bounds the shielded cleanup that delivers the terminal event.
    """

    immediate_delivery = True

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.seqs: list[int] = []
        self.detached: list[str] = []

    def attach(self, run_id: str, after_seq: int, replay: list[Event]) -> None:
        self.seqs += [e.seq for e in replay]

    async def send_event(self, event: Event) -> None:
        if event.type is EventType.AGENT_COMPLETED:
            await trio.sleep(3600)
        self.seqs.append(event.seq)

    def detach(self, run_id: str) -> None:
        self.detached.append(run_id)

    def delivered_through(self, run_id: str) -> int:
        return self.seqs[-1] if self.seqs else 0


def assert_ended_without_it(run: Any, stuck: StuckOnTheEnd, status: str) -> None:
    """The run ended and was unregistered; the stuck transport was given up on, not awaited."""
    assert run.done.is_set() and run.status == status
    assert (stuck.seqs, stuck.detached) == ([1, 2], [run.run_id])
    assert check_run_events(list(run.stream.events_after(0)))["status"] == status


async def test_a_stuck_terminal_delivery_holds_the_registry_exit_only_shutdown_grace_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stuck = StuckOnTheEnd(USER)
    async with registry(shutdown_grace_s=5) as reg:
        run = start(reg, "hang", sub=stuck)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
    assert trio.current_time() - t0 == pytest.approx(5)
    assert_ended_without_it(run, stuck, "cancelled")
    assert reg.statistics().active_runs == 0


async def test_a_stuck_terminal_delivery_holds_complete_execution_only_shutdown_grace_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(shutdown_grace_s=5) as reg:
        stuck = StuckOnTheEnd(USER)
        reg.connect(stuck)
        ctx, notifier = await reg.create_execution_context("triage", USER, "m")
        await notifier.send_agent_thinking("hmm")
        t0 = trio.current_time()
        await reg.complete_execution(ctx, "done")
        assert trio.current_time() - t0 == pytest.approx(5)
        assert_ended_without_it(ctx, stuck, "succeeded")


async def test_a_stuck_terminal_delivery_holds_an_execution_block_only_shutdown_grace_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(shutdown_grace_s=5) as reg:
        stuck = StuckOnTheEnd(USER)
        reg.connect(stuck)
        async with reg.open_execution_context("triage", USER, "m") as (run, notifier):
            await notifier.send_agent_thinking("hmm")
            t0 = trio.current_time()
        assert trio.current_time() - t0 == pytest.approx(5)
        assert_ended_without_it(run, stuck, "succeeded")


# ======================================================================== limits
async def test_a_user_at_max_active_runs_per_user_is_rate_limited() -> None:
    async with registry(max_active_runs_per_user=2) as reg:
        first = start(reg, "hang", "a")
        start(reg, "hang", "b")
        with pytest.raises(RateLimited):
            start(reg, "hang", "c")
        assert reg.start_run(user_id=USER, request_id="a", agent="hang",
                             message="m") == (first, True)
        start(reg, "hang", "c", user=OTHER_USER)
        reg.cancel(first.run_id, USER)
        await first.wait_done()
        assert start(reg, "hang", "c").is_active


async def test_a_registry_at_max_active_runs_is_overloaded() -> None:
    async with registry(max_active_runs=2) as reg:
        first = start(reg, "hang", "a")
        start(reg, "hang", "b", user=OTHER_USER)
        with pytest.raises(Overloaded):
            start(reg, "hang", "c", user="carol")
        assert reg.start_run(user_id=USER, request_id="a", agent="hang",
                             message="m") == (first, True)
        assert reg.statistics().runs_started == 2


async def test_rate_limited_wins_over_overloaded() -> None:
    async with registry(max_active_runs=2, max_active_runs_per_user=2) as reg:
        start(reg, "hang", "a")
        start(reg, "hang", "b")
        with pytest.raises(RateLimited):
            start(reg, "hang", "c")


async def test_an_unknown_agent_is_refused_and_starts_nothing() -> None:
    async with registry() as reg:
        with pytest.raises(UnknownAgent):
            start(reg, "nope")
        assert reg.statistics().runs_started == 0


async def test_a_context_the_agent_refuses_is_invalid_field_and_starts_nothing() -> None:
    def validate(context: Any) -> None:
        if not isinstance(context.get("tools"), int):
            raise InvalidField("context.tools", "tools must be a whole number")

    agents = make_agents()
    agents.register("picky", echo, validate=validate)
    async with open_registry(config(), agents=agents) as reg:
        with pytest.raises(InvalidField) as info:
            start(reg, "picky", context={"tools": "many"})
        assert info.value.field == "context.tools"
        assert reg.statistics().runs_started == 0
        run = start(reg, "picky", context={"tools": 2})
        assert await run.wait_done() == {"status": "succeeded", "result": "hello"}


async def test_a_foreign_subscriber_is_refused_without_leaking_a_run() -> None:
    async with registry(max_active_runs_per_user=1) as reg:
        with pytest.raises(RunNotFound):
            start(reg, "hang", sub=MemorySubscriber(OTHER_USER))
        assert reg.statistics().active_runs == 0
        assert start(reg, "hang", "next").is_active


# ================================================================ who sees what
async def test_events_reach_only_subscribed_connections_of_the_user() -> None:
    async with registry() as reg:
        starter, bystander, stranger = (MemorySubscriber(USER), MemorySubscriber(USER),
                                        MemorySubscriber(OTHER_USER))
        for connection in (starter, bystander, stranger):
            reg.connect(connection)
        run = start(reg, "echo", sub=starter)
        await run.wait_done()
        assert len(starter.received[run.run_id]) == 3
        assert not bystander.received and not stranger.received
        with pytest.raises(RunNotFound):
            reg.resume(run.run_id, USER, 0, stranger)
        reg.resume(run.run_id, USER, 0, bystander)
        assert bystander.received[run.run_id] == starter.received[run.run_id]


async def test_supervisor_run_agent_waits_for_the_terminal_payload() -> None:
    async with registry() as reg:
        payload = await reg.supervisor.run_agent("echo", USER, "hi", request_id="r")
        assert payload == {"status": "succeeded", "result": "hi"}


async def test_a_supervisor_without_registry_refuses_to_run() -> None:
    with pytest.raises(RuntimeError):
        await Supervisor().run_agent("echo", USER, "hi", request_id="r")


# ========================================================= statistics and health
async def test_statistics_count_runs_events_and_connections() -> None:
    async with registry() as reg:
        sub = MemorySubscriber(USER)
        reg.connect(sub)
        done = start(reg, "chatty", "a", sub=sub)
        await done.wait_done()
        cancelled = start(reg, "hang", "b", sub=sub)
        await sub.wait_for(cancelled.run_id, 2)
        reg.cancel(cancelled.run_id, USER)
        await cancelled.wait_done()
        start(reg, "hang", "c")
        await trio.testing.wait_all_tasks_blocked()
        stats = reg.statistics()
        assert (stats.runs_started, stats.runs_completed, stats.active_runs) == (3, 2, 1)
        assert stats.runs_by_status == {"succeeded": 1, "cancelled": 1}
        assert stats.active_runs_per_user == {USER: 1}
        assert (stats.retained_runs, stats.connections) == (3, 1)
        assert (stats.events_emitted, stats.events_delivered) == (8 + 3 + 2, 8 + 3)
        assert (stats.events_failed, stats.events_retried, stats.dedup_hits) == (0, 0, 0)
        assert stats.events_refused == 0


async def test_health_is_ok_then_degraded_when_deliveries_fail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(delivery_retries=1) as reg:
        assert reg.health().ok
        run = start(reg, "echo", sub=MemorySubscriber(USER, fail_times=1))
        await run.wait_done()
        health = reg.health()
        assert health.status == "degraded" and not health.ok
        assert health.reasons == ("1 of 1 event deliveries failed in the last 60 s",)


async def test_health_recovers_once_the_failures_leave_its_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(delivery_retries=1) as reg:
        run = start(reg, "echo", sub=MemorySubscriber(USER, fail_times=1))
        await run.wait_done()
        assert reg.health().status == "degraded"
        await trio.sleep(30)
        assert reg.health().status == "degraded"
        for i in range(3):
            await start(reg, "echo", f"ok-{i}", sub=MemorySubscriber(USER)).wait_done()
            await trio.sleep(20)
        assert reg.health().ok


async def test_refused_events_are_not_delivery_failures() -> None:
    async with open_registry(Config(strict=False), agents=make_agents()) as reg:
        reg.connect(MemorySubscriber(USER))
        ctx, _ = await reg.create_execution_context("triage", USER, "m")
        for _ in range(5):
            unknown: Any = "agent_thinkin"
            assert not await reg.ensure_event_delivery(ctx, unknown, {"thought": "x"})
        assert reg.health().ok
        assert reg.statistics().events_refused == 5


async def test_health_is_degraded_near_max_active_runs() -> None:
    async with registry(max_active_runs=10) as reg:
        for i in range(8):
            start(reg, "hang", f"r{i}", user=f"u{i}")
        assert reg.health().ok
        start(reg, "hang", "r9", user="u9")
        assert reg.health().status == "degraded"


async def test_health_is_unhealthy_while_closing() -> None:
    seen: list[str] = []
    opened: list[Any] = []

    async def watcher(ctx: AgentContext) -> Any:
        try:
            await trio.sleep_forever()
        finally:
            seen.append(opened[0].health().status)

    async with open_registry(config(), agents=make_agents(watcher=watcher)) as reg:
        opened.append(reg)
        start(reg, "watcher")
        await trio.testing.wait_all_tasks_blocked()
        assert reg.health().ok
    assert seen == ["unhealthy"]
    assert reg.health().status == "unhealthy"


async def test_a_closed_registry_refuses_new_runs() -> None:
    async with registry() as reg:
        run = start(reg, "hang")
        await reg.aclose_runs()
        assert run.status == "cancelled"
        with pytest.raises(RegistryClosed):
            start(reg, "hang", "later")
        with pytest.raises(RegistryClosed):
            await reg.initialize()
        assert reg.statistics().active_runs == 0


async def test_get_agent_execution_registry_is_the_innermost_open_one() -> None:
    with pytest.raises(RuntimeError):
        await get_agent_execution_registry()
    async with registry() as outer:
        assert await get_agent_execution_registry() is outer
        async with registry() as inner:
            assert await get_agent_execution_registry() is inner
        assert await get_agent_execution_registry() is outer
    with pytest.raises(RuntimeError):
        await get_agent_execution_registry()
