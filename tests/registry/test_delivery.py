"""Resume, ack and ensure_event_delivery of AgentExecutionRegistry under trio."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing

from registry import (
    AgentContext,
    AgentExecutionContext,
    AgentExecutionRegistry,
    DeliveryError,
    Event,
    InvalidField,
    MemorySubscriber,
    ResumeUnavailable,
    RunNotFound,
    open_registry,
)
from tests.registry._support import (
    OTHER_USER,
    USER,
    chatty,
    check_run_events,
    config,
    hang,
    make_agents,
)


class LaggingSubscriber:
    """A transport that queues live events and reports as sent only what the test flushed."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.queued: defaultdict[str, list[Event]] = defaultdict(list)
        self.sent_through: dict[str, int] = {}

    def attach(self, run_id: str, after_seq: int, replay: list[Event]) -> None:
        self.queued[run_id] = list(replay)

    async def send_event(self, event: Event) -> None:
        self.queued[event.run_id].append(event)

    def detach(self, run_id: str) -> None:
        self.queued.pop(run_id, None)

    def delivered_through(self, run_id: str) -> int:
        return self.sent_through.get(run_id, 0)


class HangingSubscriber:
    """A transport whose every send blocks until the registry gives up on it."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.attempts = 0
        self.detached: list[str] = []

    def attach(self, run_id: str, after_seq: int, replay: list[Event]) -> None:
        pass

    async def send_event(self, event: Event) -> None:
        self.attempts += 1
        await trio.sleep_forever()

    def detach(self, run_id: str) -> None:
        self.detached.append(run_id)

    def delivered_through(self, run_id: str) -> int:
        return 0


class FlakySubscriber:
    """Fails the first attempt to send each seq in ``fail_seqs``; records what it got."""

    def __init__(self, user_id: str, fail_seqs: set[int]) -> None:
        self.user_id = user_id
        self.fail_seqs = set(fail_seqs)
        self.seqs: list[int] = []

    def attach(self, run_id: str, after_seq: int, replay: list[Event]) -> None:
        self.seqs += [e.seq for e in replay]

    async def send_event(self, event: Event) -> None:
        if event.seq in self.fail_seqs:
            self.fail_seqs.discard(event.seq)
            raise DeliveryError("injected failure")
        self.seqs.append(event.seq)

    def detach(self, run_id: str) -> None:
        pass

    def delivered_through(self, run_id: str) -> int:
        return self.seqs[-1] if self.seqs else 0


async def finished_chatty_run(reg: AgentExecutionRegistry) -> tuple[Any, MemorySubscriber]:
    """A completed run of ``chatty`` (8 events) and the subscriber that started it."""
    sub = MemorySubscriber(USER)
    run, _ = reg.start_run(user_id=USER, request_id="r", agent="chatty", message="m",
                           subscriber=sub)
    await run.wait_done()
    assert len(sub.received[run.run_id]) == 8
    return run, sub


def registry(**settings: Any) -> Any:
    """``open_registry`` with the test agents and a strict config with ``settings``."""
    return open_registry(config(**settings), agents=make_agents(chatty=chatty, hang=hang))


# ======================================================================== resume
@pytest.mark.parametrize("after_seq", [0, 1, 5, 7, 8])
async def test_resume_replays_exactly_the_events_after_the_seq(after_seq: int) -> None:
    async with registry() as reg:
        run, starter = await finished_chatty_run(reg)
        late = MemorySubscriber(USER)
        reg.resume(run.run_id, USER, after_seq, late)
        assert late.received[run.run_id] == starter.received[run.run_id][after_seq:]


async def test_resume_mid_run_gets_the_replay_then_live_events_once() -> None:
    gate = trio.Event()

    async def gated(ctx: AgentContext) -> Any:
        await ctx.think("before")
        await gate.wait()
        for word in ("x", "y"):
            await ctx.partial(word)
        return "xy"

    async with open_registry(config(), agents=make_agents(gated=gated)) as reg:
        starter, late = MemorySubscriber(USER), MemorySubscriber(USER)
        run, _ = reg.start_run(user_id=USER, request_id="r", agent="gated", message="m",
                               subscriber=starter)
        await starter.wait_for(run.run_id, 2)
        reg.resume(run.run_id, USER, 1, late)
        reg.resume(run.run_id, USER, 0, starter)  # restarts the starter's copy from seq 1
        gate.set()
        await run.wait_done()
        full = starter.received[run.run_id][2:]
        check_run_events(full)
        assert [e.seq for e in late.received[run.run_id]] == [2, 3, 4, 5]
        assert late.received[run.run_id] == full[1:]


@pytest.mark.parametrize("after_seq", [9, 100, -1])
async def test_resume_after_a_seq_not_in_the_run_is_invalid_after_seq(after_seq: int) -> None:
    async with registry() as reg:
        run, _ = await finished_chatty_run(reg)
        sub = MemorySubscriber(USER)
        with pytest.raises(InvalidField) as info:
            reg.resume(run.run_id, USER, after_seq, sub)
        assert info.value.field == "after_seq"
        assert not sub.received
        assert sub not in reg.manager.subscribers(run.run_id)


async def test_resume_ack_and_cancel_of_another_users_run_are_not_found() -> None:
    async with registry() as reg:
        run, _ = await finished_chatty_run(reg)
        stranger = MemorySubscriber(OTHER_USER)
        with pytest.raises(RunNotFound):
            reg.resume(run.run_id, OTHER_USER, 0, stranger)
        with pytest.raises(RunNotFound):
            reg.ack(run.run_id, OTHER_USER, 1)
        with pytest.raises(RunNotFound):
            reg.cancel(run.run_id, OTHER_USER)
        with pytest.raises(RunNotFound):
            reg.resume("0" * 32, USER, 0, MemorySubscriber(USER))
        assert not stranger.received


async def test_resume_after_acked_and_trimmed_events_is_unavailable() -> None:
    async with registry() as reg:
        run, _ = await finished_chatty_run(reg)
        reg.ack(run.run_id, USER, 5)
        with pytest.raises(ResumeUnavailable):
            reg.resume(run.run_id, USER, 4, MemorySubscriber(USER))
        late = MemorySubscriber(USER)
        reg.resume(run.run_id, USER, 5, late)
        assert [e.seq for e in late.received[run.run_id]] == [6, 7, 8]


async def test_max_retained_events_per_run_keeps_the_newest() -> None:
    async with registry(max_retained_events_per_run=3) as reg:
        run, starter = await finished_chatty_run(reg)
        with pytest.raises(ResumeUnavailable):
            reg.resume(run.run_id, USER, 4, MemorySubscriber(USER))
        late = MemorySubscriber(USER)
        reg.resume(run.run_id, USER, 5, late)
        assert late.received[run.run_id] == starter.received[run.run_id][5:]


# =========================================================================== ack
@pytest.mark.parametrize("seq", [9, 1000, -1])
async def test_ack_of_a_seq_not_in_the_run_is_invalid_seq(seq: int) -> None:
    async with registry() as reg:
        run, _ = await finished_chatty_run(reg)
        with pytest.raises(InvalidField) as info:
            reg.ack(run.run_id, USER, seq)
        assert info.value.field == "seq"
        reg.resume(run.run_id, USER, 0, MemorySubscriber(USER))


async def test_ack_trims_only_what_every_subscribed_connection_has_sent() -> None:
    async with registry() as reg:
        run, _ = await finished_chatty_run(reg)
        lagging = LaggingSubscriber(USER)
        reg.resume(run.run_id, USER, 0, lagging)
        lagging.sent_through[run.run_id] = 2
        reg.ack(run.run_id, USER, 6)
        with pytest.raises(ResumeUnavailable):
            reg.resume(run.run_id, USER, 1, MemorySubscriber(USER))
        reg.resume(run.run_id, USER, 2, MemorySubscriber(USER))
        lagging.sent_through[run.run_id] = 8
        reg.ack(run.run_id, USER, 6)
        with pytest.raises(ResumeUnavailable):
            reg.resume(run.run_id, USER, 5, MemorySubscriber(USER))
        reg.resume(run.run_id, USER, 6, MemorySubscriber(USER))


async def test_ack_is_cumulative_and_a_lower_ack_trims_nothing_more() -> None:
    async with registry() as reg:
        run, _ = await finished_chatty_run(reg)
        reg.ack(run.run_id, USER, 3)
        reg.ack(run.run_id, USER, 1)
        reg.resume(run.run_id, USER, 3, MemorySubscriber(USER))
        with pytest.raises(ResumeUnavailable):
            reg.resume(run.run_id, USER, 2, MemorySubscriber(USER))


# ========================================================= ensure_event_delivery
async def seed_run(reg: AgentExecutionRegistry, sub: Any) -> AgentExecutionContext:
    reg.connect(sub)
    ctx, _ = await reg.create_execution_context("triage", USER, "m", {"request_id": "r"})
    return ctx


@pytest.mark.parametrize("fail_times", [0, 1, 2])
async def test_a_delivery_that_gets_through_within_the_retries_is_true(
    fail_times: int, autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(delivery_retries=3, retry_delay_s=0.25) as reg:
        sub = MemorySubscriber(USER, fail_times=fail_times)
        ctx = await seed_run(reg, sub)
        t0 = trio.current_time()
        assert await reg.ensure_event_delivery(ctx, "agent_started", {"agent": "triage"})
        assert trio.current_time() - t0 == pytest.approx(0.25 * fail_times)
        assert sub.attempts == fail_times + 1
        assert [e.seq for e in sub.received[ctx.run_id]] == [1]
        stats = reg.statistics()
        assert (stats.events_retried, stats.events_failed, stats.events_delivered) == (
            fail_times, 0, 1)
        assert sub in reg.manager.subscribers(ctx.run_id)


@pytest.mark.parametrize("fail_times", [3, 10])
async def test_a_delivery_failing_every_attempt_is_false_and_detaches_the_subscriber(
    fail_times: int, autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(delivery_retries=3, retry_delay_s=0.25) as reg:
        sub, other = MemorySubscriber(USER, fail_times=fail_times), MemorySubscriber(USER)
        reg.connect(other)
        ctx = await seed_run(reg, sub)
        t0 = trio.current_time()
        assert not await reg.ensure_event_delivery(ctx, "agent_started", {"agent": "triage"})
        assert trio.current_time() - t0 == pytest.approx(0.25 * 2)
        assert sub.attempts == 3
        stats = reg.statistics()
        assert (stats.events_retried, stats.events_failed, stats.events_delivered) == (2, 1, 1)
        assert sub.detached == [ctx.run_id]
        assert reg.manager.subscribers(ctx.run_id) == (other,)
        assert await reg.ensure_event_delivery(ctx, "agent_thinking", {"thought": "t"})
        assert sub.attempts == 3
        assert [e.seq for e in other.received[ctx.run_id]] == [1, 2]
        reg.resume(ctx.run_id, USER, 0, sub)
        assert [e.seq for e in sub.received[ctx.run_id]] == [1, 2]


async def test_each_attempt_is_bounded_by_event_delivery_timeout_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = {"delivery_retries": 3, "retry_delay_s": 0.25, "event_delivery_timeout_s": 2}
    async with registry(**config) as reg:
        sub = HangingSubscriber(USER)
        ctx = await seed_run(reg, sub)
        t0 = trio.current_time()
        assert not await reg.ensure_event_delivery(ctx, "agent_thinking", {"thought": "t"})
        assert trio.current_time() - t0 == pytest.approx(3 * 2 + 2 * 0.25)
        assert (sub.attempts, sub.detached) == (3, [ctx.run_id])
        assert ctx.is_active


BAD_EVENTS: list[tuple[str, Any]] = [
    ("agent_exploded", {"x": 1}),
    ("agent_thinking", {"thought": 1}),
    ("agent_thinking", None),
    ("tool_executing", {"tool": "search", "call_id": "c"}),
    ("tool_completed", {"tool": "search", "call_id": "nope", "status": "ok", "result": 1}),
    ("agent_started", {"agent": "again"}),
    ("agent_completed", {"status": "succeeded"}),
    ("agent_completed", {"status": "exploded", "error": "x"}),
    ("agent_completed", "done"),
]


@pytest.mark.parametrize(("event_type", "payload"), BAD_EVENTS, ids=str)
async def test_a_bad_event_is_false_and_never_raises_nor_breaks_the_run(
    event_type: str, payload: Any,
) -> None:
    """Not strict: a refused event is False (test_strict.py: it raises with ``strict``)."""
    async with registry(strict=False) as reg:
        sub = MemorySubscriber(USER)
        ctx = await seed_run(reg, sub)
        assert await reg.ensure_event_delivery(ctx, "agent_started", {"agent": "triage"})
        assert await reg.ensure_event_delivery(ctx, event_type, payload) is False
        assert ctx.is_active
        assert await reg.ensure_event_delivery(ctx, "partial_result", {"text": "ok"})
        await reg.complete_execution(ctx, "fine")
        check_run_events(sub.received[ctx.run_id])
        stats = reg.statistics()
        assert (stats.events_refused, stats.events_failed) == (1, 0)


async def test_an_event_after_the_run_ended_is_false() -> None:
    """Not strict: a refused event is False."""
    async with registry(strict=False) as reg:
        sub = MemorySubscriber(USER)
        ctx = await seed_run(reg, sub)
        await reg.complete_execution(ctx, "done")
        assert not await reg.ensure_event_delivery(ctx, "agent_thinking", {"thought": "late"})
        assert not await reg.ensure_event_delivery(
            ctx, "agent_completed", {"status": "failed", "error": "late"})
        assert ctx.status == "succeeded"
        assert sub.received[ctx.run_id][-1].payload == {"status": "succeeded", "result": "done"}


async def test_a_refused_first_event_leaves_no_gap_for_subscribers() -> None:
    """Not strict: a refused event is False."""
    async with registry(strict=False) as reg:
        sub = MemorySubscriber(USER)
        ctx = await seed_run(reg, sub)
        payload = {"tool": "search", "call_id": "nope", "status": "ok", "result": 1}
        assert not await reg.ensure_event_delivery(ctx, "tool_completed", payload)
        assert await reg.ensure_event_delivery(ctx, "agent_thinking", {"thought": "t"})
        await reg.complete_execution(ctx, "done")
        check_run_events(sub.received[ctx.run_id])


async def test_a_run_cancelled_while_a_delivery_is_retried_leaves_no_gap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The event being retried is recorded: the subscriber that never got it is unsubscribed
    (it gets nothing after the gap) and a resume from 0 gives it the whole run."""
    async with registry(delivery_retries=3, retry_delay_s=1) as reg:
        sub = MemorySubscriber(USER, fail_times=1)
        run, _ = reg.start_run(user_id=USER, request_id="r", agent="hang", message="m",
                               subscriber=sub)
        await trio.sleep(0.5)  # agent_started failed once; its retry is 0.5 s away
        assert sub.attempts == 1
        reg.cancel(run.run_id, USER)
        await run.wait_done()
        assert (sub.seqs(run.run_id), sub.detached) == ([], [run.run_id])
        reg.resume(run.run_id, USER, 0, sub)
        assert check_run_events(sub.received[run.run_id])["status"] == "cancelled"
        assert sub.seqs(run.run_id) == [1, 2]


async def test_an_agent_completing_itself_ends_with_its_own_payload() -> None:
    async def finisher(ctx: AgentContext) -> Any:
        payload: Mapping[str, Any] = {"status": "failed", "error": "gave up"}
        await ctx.emit("agent_completed", payload)
        raise AssertionError("not reached: the run's scope is cancelled")

    async with open_registry(config(), agents=make_agents(finisher=finisher)) as reg:
        sub = MemorySubscriber(USER)
        run, _ = reg.start_run(user_id=USER, request_id="r", agent="finisher", message="m",
                               subscriber=sub)
        assert await run.wait_done() == {"status": "failed", "error": "gave up"}
        check_run_events(sub.received[run.run_id])


async def test_a_socket_resuming_during_a_paused_fan_out_gets_each_seq_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Subscribed again while seq 1 waits on another socket's retry: replay, then live, once."""
    async with registry(retry_delay_s=1) as reg:
        slow, other = MemorySubscriber(USER, fail_times=1), MemorySubscriber(USER)
        run, _ = reg.start_run(user_id=USER, request_id="r", agent="hang", message="m",
                               subscriber=slow)
        reg.resume(run.run_id, USER, 0, other)
        await trio.sleep(0.5)  # agent_started is recorded; its fan-out waits on slow's retry
        assert other.seqs(run.run_id) == []
        reg.resume(run.run_id, USER, 0, other)
        await trio.sleep(5)
        assert other.seqs(run.run_id) == [1, 2]
        assert slow.seqs(run.run_id) == [1, 2]


async def test_events_emitted_from_parallel_tasks_reach_every_socket_in_seq_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An agent running two steps at once; one socket retries seq 2 (Subscriber: seq order)."""
    async def parallel(ctx: AgentContext) -> Any:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.think, "one")
            nursery.start_soon(ctx.think, "two")
        return "both"

    async with open_registry(config(retry_delay_s=1), agents=make_agents(p=parallel)) as reg:
        flaky, steady = FlakySubscriber(USER, {2}), MemorySubscriber(USER)
        run, _ = reg.start_run(user_id=USER, request_id="r", agent="p", message="m",
                               subscriber=flaky)
        reg.resume(run.run_id, USER, 0, steady)
        await run.wait_done()
        assert steady.seqs(run.run_id) == [1, 2, 3, 4]
        assert flaky.seqs == [1, 2, 3, 4]


async def test_a_caller_cancelled_mid_delivery_leaves_no_subscriber_with_a_gap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Seed API: the first event (agent_started synthesised + thinking) is cut off by a timeout.

    Neither connection got seq 1, so both are unsubscribed rather than shown a gap; each gets
    the whole run by resuming from 0.
    """
    async with registry(retry_delay_s=1) as reg:
        flaky, steady = MemorySubscriber(USER, fail_times=1), MemorySubscriber(USER)
        reg.connect(flaky)
        ctx, notifier = await reg.create_execution_context("triage", USER, "m")
        reg.resume(ctx.run_id, USER, 0, steady)
        with trio.move_on_after(0.5):
            await notifier.send_agent_thinking("cut off")
        assert await notifier.send_partial_result("more")
        await reg.complete_execution(ctx, "done")
        for sub in (flaky, steady):
            assert (sub.seqs(ctx.run_id), sub.detached) == ([], [ctx.run_id])
            reg.resume(ctx.run_id, USER, 0, sub)
            assert sub.seqs(ctx.run_id) == [1, 2, 3, 4]
            check_run_events(sub.received[ctx.run_id])


async def test_an_immediate_delivery_subscriber_is_retried_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Queueing(FlakySubscriber):
        immediate_delivery = True

    async with registry(delivery_retries=2) as reg:
        sub = Queueing(USER, {1})
        ctx = await seed_run(reg, sub)
        assert await reg.ensure_event_delivery(ctx, "agent_started", {"agent": "triage"})
        assert sub.seqs == [1]
        assert reg.statistics().events_retried == 1


async def test_a_subscriber_raising_an_unexpected_error_never_reaches_the_agent() -> None:
    """ensure_event_delivery "never raises into the agent": a broken transport is given up on."""
    class Broken(FlakySubscriber):
        async def send_event(self, event: Event) -> None:
            raise RuntimeError("transport bug")

    async with registry() as reg:
        broken, steady = Broken(USER, set()), MemorySubscriber(USER)
        run, _ = reg.start_run(user_id=USER, request_id="r", agent="chatty", message="m",
                               subscriber=broken)
        reg.resume(run.run_id, USER, 0, steady)
        assert await run.wait_done() == {"status": "succeeded", "result": "abc"}
        check_run_events(steady.received[run.run_id])
        assert broken not in reg.manager.subscribers(run.run_id)


async def test_a_run_cancelled_while_parallel_emits_wait_their_turn_leaves_no_gap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def parallel(ctx: AgentContext) -> Any:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.think, "one")
            nursery.start_soon(ctx.think, "two")
        await trio.sleep_forever()

    async with open_registry(config(retry_delay_s=1), agents=make_agents(p=parallel)) as reg:
        flaky, steady = FlakySubscriber(USER, {2}), MemorySubscriber(USER)
        run, _ = reg.start_run(user_id=USER, request_id="r", agent="p", message="m",
                               subscriber=flaky)
        reg.resume(run.run_id, USER, 0, steady)
        await trio.sleep(0.5)  # seq 2 waits on flaky's retry, seq 3 waits for its turn
        reg.cancel(run.run_id, USER)
        await run.wait_done()
        for seqs in (flaky.seqs, steady.seqs(run.run_id)):
            assert seqs == list(range(1, len(seqs) + 1)), seqs
        late = MemorySubscriber(USER)
        reg.resume(run.run_id, USER, 0, late)
        assert check_run_events(late.received[run.run_id])["status"] == "cancelled"
        assert late.seqs(run.run_id) == [1, 2, 3, 4]


async def test_in_direct_mode_events_go_out_live_and_nothing_is_kept_for_a_resume() -> None:
    async with registry(delivery_mode="direct") as reg:
        run, starter = await finished_chatty_run(reg)
        check_run_events(starter.received[run.run_id])
        assert run.stream.retained_count == 0
        with pytest.raises(ResumeUnavailable, match="direct"):
            reg.resume(run.run_id, USER, 0, MemorySubscriber(USER))
