"""Retention bounds (PROTOCOL.md v2): ``max_retained_runs_per_user`` and ``max_retained_mib``.

An ended run stays ``retention_s`` for late resumes, unless a bound needs the room: beyond
``max_retained_runs_per_user`` ended runs of one user, or ``max_retained_mib`` of events in
all, the oldest ended runs are dropped first. A dropped run is ``not_found`` for resume, ack
and cancel, and its request_id starts a new run. Dropped means gone: its memory too.
"""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import pytest
import trio.testing

from registry import (
    AgentContext,
    AgentExecutionRegistry,
    Config,
    Event,
    MemorySubscriber,
    OutboundQueue,
    ResumeUnavailable,
    RunNotFound,
    open_registry,
)
from tests.registry._support import OTHER_USER, USER, echo, hang, make_agents

KB = 1000
MIB = 1024 * 1024
THIRD = "carol"

AgentFn = Callable[[AgentContext], Coroutine[Any, Any, Any]]


def big(parts: int, size: int, *, then_hang: bool = False) -> AgentFn:
    """An agent that streams ``parts`` partial results of ``size`` characters each."""

    async def agent(ctx: AgentContext) -> Any:
        for index in range(parts):
            await ctx.partial(f"{index:08d}".ljust(size, "x"))
        if then_hang:
            await anyio.sleep_forever()
        return "done"

    return agent


AGENTS = {
    "echo": echo,
    "hang": hang,
    "big": big(8, 50 * KB),  # ~400 KB of events
    "big_then_hang": big(6, 100 * KB, then_hang=True),  # ~600 KB, and it never ends
    "huge_then_hang": big(30, 100 * KB, then_hang=True),  # ~3 MB, and it never ends
}


def registry(**settings: Any) -> Any:
    return open_registry(Config(**settings), agents=make_agents(**AGENTS))


class Runs:
    """Starts runs of one registry and remembers what each subscriber received."""

    def __init__(self, reg: AgentExecutionRegistry) -> None:
        self.reg = reg
        self.count = 0

    def start(self, agent: str, user: str = USER, request_id: str | None = None,
              message: str = "hello") -> tuple[Any, MemorySubscriber]:
        self.count += 1
        sub = MemorySubscriber(user)
        run, duplicate = self.reg.start_run(
            user_id=user, request_id=request_id or f"req-{self.count}", agent=agent,
            message=message, subscriber=sub)
        assert not duplicate
        return run, sub

    async def finished(self, agent: str = "echo", user: str = USER,
                       message: str = "hello") -> tuple[Any, list[Event]]:
        """A run that has ended, and all its events."""
        run, sub = self.start(agent, user, message=message)
        await run.wait_done()
        return run, sub.received[run.run_id]

    def replay(self, run: Any, user: str = USER) -> list[Event]:
        """What a resume from the start hands a new subscriber."""
        late = MemorySubscriber(user)
        self.reg.resume(run.run_id, user, 0, late)
        return late.received[run.run_id]

    def assert_dropped(self, run: Any, user: str = USER) -> None:
        """Not found for get_run, resume, ack and cancel; the request_id starts a new run."""
        with pytest.raises(RunNotFound):
            self.reg.get_run(run.run_id, user)
        with pytest.raises(RunNotFound):
            self.reg.resume(run.run_id, user, 0, MemorySubscriber(user))
        with pytest.raises(RunNotFound):
            self.reg.ack(run.run_id, user, 1)
        with pytest.raises(RunNotFound):
            self.reg.cancel(run.run_id, user)
        fresh, duplicate = self.reg.start_run(user_id=user, request_id=run.request_id,
                                              agent="echo", message="again")
        assert not duplicate and fresh.run_id != run.run_id


# ======================================================== max_retained_runs_per_user
async def test_beyond_max_retained_runs_per_user_the_users_oldest_ended_run_is_dropped() -> None:
    async with registry(max_retained_runs_per_user=3) as reg:
        runs = Runs(reg)
        bobs = [await runs.finished(user=OTHER_USER) for _ in range(3)]
        alices = [await runs.finished() for _ in range(4)]
        for run, events in alices[1:]:
            assert runs.replay(run) == events
        for run, events in bobs:  # per user: bob keeps his three
            assert runs.replay(run, OTHER_USER) == events
        assert reg.statistics().retained_runs == 6
        runs.assert_dropped(alices[0][0])


async def test_the_oldest_ended_run_goes_not_the_oldest_started() -> None:
    async with registry(max_retained_runs_per_user=3) as reg:
        runs = Runs(reg)
        long_run, long_sub = runs.start("hang")
        ended = [await runs.finished() for _ in range(3)]
        assert reg.statistics().retained_runs == 4  # an active run does not count
        reg.cancel(long_run.run_id, USER)
        await long_run.wait_done()  # now four ended runs: the first to end goes
        assert runs.replay(long_run) == long_sub.received[long_run.run_id]
        for run, events in ended[1:]:
            assert runs.replay(run) == events
        runs.assert_dropped(ended[0][0])


async def test_active_runs_are_never_dropped_for_max_retained_runs_per_user() -> None:
    async with registry(max_retained_runs_per_user=1, max_active_runs_per_user=20) as reg:
        runs = Runs(reg)
        active = [runs.start("hang") for _ in range(5)]
        for _ in range(3):
            await runs.finished()
        for run, sub in active:
            await sub.wait_for(run.run_id, 2)
            assert runs.replay(run) == sub.received[run.run_id]
        assert reg.statistics().retained_runs == 5 + 1


# ================================================================ max_retained_mib
async def test_beyond_max_retained_mib_the_oldest_ended_runs_go_first_whoever_owns_them() -> None:
    async with registry(max_retained_mib=1.0) as reg:
        runs = Runs(reg)
        oldest = await runs.finished("big", USER)
        middle = await runs.finished("big", OTHER_USER)
        assert runs.replay(oldest[0], USER) == oldest[1]  # ~800 KB: both kept
        newest = await runs.finished("big", THIRD)  # ~1.2 MB: the oldest ended run goes
        assert runs.replay(middle[0], OTHER_USER) == middle[1]
        assert runs.replay(newest[0], THIRD) == newest[1]
        runs.assert_dropped(oldest[0], USER)


async def test_an_active_run_within_the_budget_outlives_older_ended_runs() -> None:
    async with registry(max_retained_mib=1.0) as reg:
        runs = Runs(reg)
        first = await runs.finished("big", OTHER_USER)
        active, sub = runs.start("big_then_hang", USER)  # ~600 KB and still going
        await sub.wait_for(active.run_id, 7)
        second = await runs.finished("big", OTHER_USER)  # ~1.4 MB: ended runs go, oldest first
        runs.assert_dropped(first[0], OTHER_USER)
        assert runs.replay(second[0], OTHER_USER) == second[1]
        assert runs.replay(active, USER) == sub.received[active.run_id]
        reg.cancel(active.run_id, USER)
        await active.wait_done()


async def test_an_active_run_alone_cannot_hold_more_than_max_retained_mib() -> None:
    """~3 MB of events of a run still going, with a budget of 1 MiB: the oldest are given up.

    (Its one subscriber already has every event, so nothing still needs them.)
    """
    async with registry(max_retained_mib=1.0) as reg:
        runs = Runs(reg)
        run, sub = runs.start("huge_then_hang")
        await sub.wait_for(run.run_id, 31)
        with pytest.raises(ResumeUnavailable):
            runs.replay(run)
        newest = MemorySubscriber(USER)  # the newest events are the ones kept
        reg.resume(run.run_id, USER, 30, newest)
        assert newest.received[run.run_id] == sub.received[run.run_id][30:]
        reg.cancel(run.run_id, USER)
        await run.wait_done()


async def test_a_socket_still_sends_every_event_of_a_run_dropped_before_it_wrote_them() -> None:
    """Another user's run still going holds the budget, so a run is dropped the moment it
    ends, before its socket has written a frame: the socket still gets every event through
    ``agent_completed`` (they count against its own bounds), and the run is gone."""
    async with registry(max_retained_mib=1.0) as reg:
        runs = Runs(reg)
        hog, hog_sub = runs.start("huge_then_hang", OTHER_USER)
        await hog_sub.wait_for(hog.run_id, 31)  # ~3 MB emitted, ~1 MiB still held
        socket = OutboundQueue(USER, max_messages=100, max_bytes=8 * MIB)
        reg.connect(socket)
        run, _ = reg.start_run(user_id=USER, request_id="r1", agent="echo",
                               message="M" * 700 * KB, subscriber=socket)
        await run.wait_done()
        runs.assert_dropped(run)
        frames, _ = socket.take(100 * MIB)
        events = [json.loads(frame) for frame in frames]
        assert [(e["run_id"], e["seq"]) for e in events] == [(run.run_id, 1), (run.run_id, 2),
                                                             (run.run_id, 3)]
        assert events[-1]["type"] == "agent_completed"
        assert events[-1]["payload"]["result"] == "M" * 700 * KB
        assert socket.run_ids() == [] and (socket.queued, socket.queued_bytes) == (0, 0)
        reg.cancel(hog.run_id, OTHER_USER)
        await hog.wait_done()


async def test_a_socket_replaying_a_run_the_budget_drops_finishes_within_its_own_bounds() -> None:
    """A resume of an ended run is being replayed when the run is dropped: what is left of
    the replay counts against the socket's bounds from then on. Within them it is sent;
    beyond them the socket is closed with 4008 (the run is then ``not_found``)."""
    async with registry(max_retained_mib=1.0) as reg:
        runs = Runs(reg)
        first, events = await runs.finished("big")
        roomy = OutboundQueue(USER, max_messages=100, max_bytes=8 * MIB)
        tight = OutboundQueue(USER, max_messages=100, max_bytes=100 * KB)
        for socket in (roomy, tight):
            reg.connect(socket)
            reg.resume(first.run_id, USER, 0, socket)
            socket.take(1)  # the replay has begun
        await runs.finished("big", OTHER_USER)
        await runs.finished("big", OTHER_USER)  # over the budget: the oldest ended run goes
        runs.assert_dropped(first)
        assert tight.close_code == 4008 and not tight.has_frames()
        assert tight not in reg.manager.all_connections()
        frames, _ = roomy.take(100 * MIB)
        assert [json.loads(f)["seq"] for f in frames] == [e.seq for e in events[1:]]
        assert roomy.run_ids() == [] and (roomy.queued, roomy.queued_bytes) == (0, 0)


# ================================================================ dropped means freed
async def _dropped_runs_alive(reg: AgentExecutionRegistry, count: int) -> list[str]:
    """Ends ``count`` echo runs of 60 KB messages; returns the ids of those still in memory."""
    runs = Runs(reg)
    refs = []
    for _ in range(count):
        run, _ = await runs.finished(message="M" * 60 * KB)
        refs.append((run.run_id, weakref.ref(run)))
        del run
    await trio.testing.wait_all_tasks_blocked()
    gc.collect()
    return [run_id for run_id, ref in refs if ref() is not None]


async def test_a_run_dropped_by_max_retained_runs_per_user_is_freed_at_once() -> None:
    async with registry(max_retained_runs_per_user=1, retention_s=3600) as reg:
        alive = await _dropped_runs_alive(reg, 5)
        assert reg.statistics().retained_runs == 1
    assert len(alive) == 1, f"{len(alive)} runs in memory, 1 retained"


async def test_a_run_dropped_by_max_retained_mib_is_freed_at_once() -> None:
    async with registry(max_retained_mib=0.1, retention_s=3600) as reg:
        alive = await _dropped_runs_alive(reg, 5)
        assert reg.statistics().retained_runs == 1
    assert len(alive) == 1, f"{len(alive)} runs in memory, 1 retained"


async def test_a_detached_run_dropped_by_max_retained_mib_is_freed_before_its_detach_timer(
) -> None:
    """Its follower left while it ran (so a detach timer was started), it ended, and the
    budget dropped it: the timer does not keep it, its stream and events alive (a client
    closed 4008 again and again would otherwise pin ``detached_run_timeout_s`` of runs)."""
    async with registry(max_retained_mib=0.5, retention_s=3600,
                        detached_run_timeout_s=3600) as reg:
        runs = Runs(reg)
        refs = []
        for _ in range(5):
            run, sub = runs.start("big")  # ~400 KB of events
            reg.disconnect(sub)  # nobody follows it any more: its detach timer starts
            await run.wait_done()
            refs.append(weakref.ref(run))
            del run, sub
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        assert reg.statistics().retained_runs == 1
        alive = [ref for ref in refs if ref() is not None]
        assert len(alive) == 1, f"{len(alive)} runs in memory, 1 retained"


async def test_runs_expired_after_retention_s_are_freed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with registry(retention_s=10) as reg:
        runs = Runs(reg)
        refs = []
        for _ in range(3):
            run, _ = await runs.finished()
            refs.append(weakref.ref(run))
            del run
        await trio.sleep(11)
        gc.collect()
        assert reg.statistics().retained_runs == 0
        assert [ref for ref in refs if ref() is not None] == []
