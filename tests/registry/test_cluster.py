"""A service of several nodes (PROTOCOL v2, "Multi-node: redis_url"), in one trio run.

Three registries share one :class:`MemorySharedState`, each through its own link
(``_cluster_support``). A user's socket on a node is an :class:`OutboundQueue` driven through
the transport's calls (``on_connect``, ``on_start_agent``, ``on_resume``, ...); each test
asserts what those sockets receive, with the shared checker (``loadtests.checker``): per run,
seq from 1 without gap or repeat, agent_started first, tools paired, one agent_completed last.

Time is trio's ``MockClock`` (autojump): leases, detach timers and retries run in mock time.
Tests named ``..._bug_...`` or whose docstring starts with "BUG" fail on purpose: each shows
a way the library breaks the contract (see its docstring).
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from loadtests.checker import check_run
from registry import (
    Config,
    InvalidField,
    Overloaded,
    RateLimited,
    ResumeUnavailable,
    RunNotFound,
    TooManyConnections,
    open_registry,
)
from registry._events import encode_event, envelope_prefix
from registry._shared import RunRecord
from registry._shared_memory import MemorySharedState
from tests.registry._cluster_support import AGENTS, TICK_S, Cluster, Socket, open_cluster
from tests.registry._support import OTHER_USER, USER, make_agents

LEASE_S = Config().node_lease_s


def types_of(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def active_run_ids(cluster: Cluster) -> set[str]:
    return {run.run_id for node in cluster.nodes.values() for run in node.reg.active_runs()}


async def settle() -> None:
    """Lets every node finish what it is doing (writes to the shared state included)."""
    await trio.testing.wait_all_tasks_blocked()


# ========================================================================== dedup
async def test_a_repeated_start_on_another_node_answers_the_first_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster() as cluster:
        on_a = await Socket(cluster["A"]).connect()
        on_b = await Socket(cluster["B"]).connect()
        run_id = await on_a.start("ticker", "same")
        ids, duplicate = await cluster["B"].on_start_agent(
            user_id=USER, request_id="same", agent="ticker", message="again",
            subscriber=on_b.queue)
        assert (ids.run_id, duplicate) == (run_id, True)
        events = await on_a.until_completed(run_id)
        assert check_run(events) == {"status": "succeeded", "result": "done"}
        assert on_b.events(run_id) == []  # a duplicate subscribes nothing new
        assert sum(n.reg.statistics().runs_started for n in cluster.nodes.values()) == 1


async def test_concurrent_starts_of_one_request_over_three_nodes_make_one_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(rtt=0.001) as cluster:
        answers: list[tuple[str, bool]] = []

        async def start(node: str) -> None:
            ids, duplicate = await cluster[node].on_start_agent(
                user_id=USER, request_id="once", agent="hang", message="m")
            answers.append((ids.run_id, duplicate))

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(start, "ABC"[i % 3])
        assert len({run_id for run_id, _ in answers}) == 1
        assert sorted(duplicate for _, duplicate in answers) == [False] + [True] * 29
        assert active_run_ids(cluster) == {answers[0][0]}
        assert sum(n.reg.statistics().runs_started for n in cluster.nodes.values()) == 1


# ========================================================================= limits
async def test_the_per_user_run_limit_holds_across_nodes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(max_active_runs_per_user=2) as cluster:
        on_a, on_b, on_c = [await Socket(cluster[n]).connect() for n in "ABC"]
        first = await on_a.start("hang", "r1")
        await on_b.start("hang", "r2")
        with pytest.raises(RateLimited):
            await on_c.start("hang", "r3")
        other = await Socket(cluster["C"], OTHER_USER).connect()
        await other.start("hang", "r3")  # the limit is per user
        await cluster["C"].on_cancel(first, USER)
        assert check_run(await on_a.until_completed(first))["status"] == "cancelled"
        await settle()
        assert await on_c.start("hang", "r3")


async def test_a_run_is_refused_on_another_node_right_after_agent_completed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once a bug: a client that got ``agent_completed`` and at once starts its next run on another
    node is ``rate_limited``: the slot is freed in the shared state only when the replicator
    has written the run's end, one or more round trips later (on one node it is free as soon
    as agent_completed is delivered)."""
    async with open_cluster(max_active_runs_per_user=1) as cluster:
        on_a = await Socket(cluster["A"]).connect()
        on_c = await Socket(cluster["C"]).connect()
        run_id = await on_a.start("echo", "r1")
        await on_a.until_completed(run_id)
        assert await on_c.start("echo", "r2")


async def test_the_service_run_limit_holds_across_nodes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(max_active_runs=3) as cluster:
        sockets = [await Socket(cluster[n], f"user-{n}").connect() for n in "ABC"]
        run_ids = [await s.start("hang") for s in sockets]
        for node in "ABC":
            late = await Socket(cluster[node], f"late-{node}").connect()
            with pytest.raises(Overloaded):
                await late.start("hang")
        await cluster["B"].on_cancel(run_ids[0], "user-A")  # routed to A
        assert check_run(await sockets[0].until_completed(run_ids[0]))["status"] == "cancelled"
        await settle()
        late = await Socket(cluster["B"], "late").connect()
        assert await late.start("hang")


async def test_connections_are_limited_across_nodes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(max_connections_per_user=2) as cluster:
        on_a = await Socket(cluster["A"]).connect()
        await Socket(cluster["B"]).connect()
        with pytest.raises(TooManyConnections):
            await Socket(cluster["C"]).connect()
        await Socket(cluster["C"], OTHER_USER).connect()  # per user
        await on_a.disconnect()
        await Socket(cluster["C"]).connect()


# ========================================================================= resume
async def test_resume_on_another_node_after_a_drop_fills_exactly_the_gap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster() as cluster:
        on_a = await Socket(cluster["A"]).connect()
        run_id = await on_a.start("ticker", context={"ticks": 8})
        held = await on_a.until_seq(run_id, 4)
        await on_a.disconnect()
        await trio.sleep(2 * TICK_S)  # events go on while no socket follows
        on_b = await Socket(cluster["B"]).connect()
        await on_b.resume(run_id, held[-1]["seq"])
        rest = await on_b.until_completed(run_id)
        assert rest[0]["seq"] == held[-1]["seq"] + 1
        assert check_run(held + rest) == {"status": "succeeded", "result": "done"}
        assert len(held + rest) == 3 + 8


async def test_resume_on_another_node_right_after_reading_the_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once a bug: ``resume`` with the last seq held, on another node, is ``invalid_field``
    (``after_seq`` "beyond the last event") while the run's node has not yet written those
    events to the shared state: its own sockets get events before they are replicated.

    Here each shared-state call takes 2 ms: the client read all 8 events of a short run on A,
    and B's mirror holds 3 of them when the resume arrives.
    """
    async with open_cluster(rtt=0.002) as cluster:
        on_a = await Socket(cluster["A"]).connect()
        run_id = await on_a.start("chatty")
        held = await on_a.until_completed(run_id)
        await on_a.disconnect()
        on_b = await Socket(cluster["B"]).connect()
        await on_b.resume(run_id, held[-1]["seq"])  # raises InvalidField
        await settle()
        assert on_b.events(run_id) == []  # nothing was missing


async def test_resume_of_an_ended_run_on_another_node_replays_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster() as cluster:
        on_a = await Socket(cluster["A"]).connect()
        run_id = await on_a.start("chatty")
        original = await on_a.until_completed(run_id)
        await settle()
        on_b = await Socket(cluster["B"]).connect()
        await on_b.resume(run_id, 0)
        assert await on_b.until_completed(run_id) == original
        await on_b.resume(run_id, 5)  # again, from the middle
        await settle()
        assert on_b.events(run_id) == original + original[5:]
        assert check_run(original)["result"] == "abc"


async def test_resume_on_another_node_refuses_a_seq_beyond_the_last_and_foreign_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster() as cluster:
        on_a = await Socket(cluster["A"]).connect()
        run_id = await on_a.start("chatty")
        events = await on_a.until_completed(run_id)
        await settle()
        on_b = await Socket(cluster["B"]).connect()
        with pytest.raises(InvalidField) as beyond:
            await on_b.resume(run_id, events[-1]["seq"] + 1)
        assert beyond.value.field == "after_seq"
        stranger = await Socket(cluster["B"], OTHER_USER).connect()
        unknown = "f" * 32
        with pytest.raises(RunNotFound) as foreign:
            await stranger.resume(run_id, 0)
        with pytest.raises(RunNotFound) as missing:
            await stranger.resume(unknown, 0)
        assert str(foreign.value).replace(run_id, unknown) == str(missing.value)
        with pytest.raises(RunNotFound):
            await cluster["C"].on_ack(run_id, OTHER_USER, 1)
        with pytest.raises(RunNotFound):
            await cluster["C"].on_cancel(run_id, OTHER_USER)
        await settle()
        assert stranger.frames == [] and on_b.events(run_id) == []


async def test_a_refused_resume_on_another_node_keeps_the_run_from_being_detached(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once a bug: a ``resume`` refused on node B (here ``invalid_field``; ``resume_unavailable``
    too) leaves B a mirror of the run that nobody follows, which tells A forever that a socket
    follows the run: A never cancels it as detached (guarantee 5)."""
    async with open_cluster(detached_run_timeout_s=3) as cluster:
        on_a = await Socket(cluster["A"]).connect()
        run_id = await on_a.start("hang")
        await on_a.until_seq(run_id, 2)
        await on_a.disconnect()
        on_b = await Socket(cluster["B"]).connect()
        with pytest.raises(InvalidField):
            await on_b.resume(run_id, 99)
        run = cluster["A"].get_run(run_id, USER)
        with trio.fail_after(60):
            final = await run.wait_done()
        assert final["status"] == "cancelled"


# ==================================================================== live follow
async def test_sockets_on_two_nodes_follow_a_live_run_each_event_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster() as cluster:
        on_a = await Socket(cluster["A"]).connect()
        on_b = await Socket(cluster["B"]).connect()
        run_id = await on_a.start("ticker", context={"ticks": 6})
        await on_b.resume(run_id, 0)
        await on_b.until_seq(run_id, 3)
        assert not cluster["A"].get_run(run_id, USER).stream.ended  # followed while live
        here, there = await on_a.until_completed(run_id), await on_b.until_completed(run_id)
        assert check_run(here) == check_run(there) == {"status": "succeeded", "result": "done"}
        assert here == there and len(here) == 3 + 6
        stranger = await Socket(cluster["B"], OTHER_USER).connect()
        assert stranger.frames == []


# ========================================================================= cancel
async def test_a_cancel_from_another_node_ends_the_run_where_it_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster() as cluster:
        on_a = await Socket(cluster["A"]).connect()
        on_b = await Socket(cluster["B"]).connect()
        run_id = await on_a.start("in_tool")
        await on_b.resume(run_id, 0)
        await on_b.until_seq(run_id, 2)
        await cluster["C"].on_cancel(run_id, USER)
        for socket in (on_a, on_b):
            events = await socket.until_completed(run_id)
            assert types_of(events) == ["agent_started", "tool_executing", "tool_completed",
                                        "agent_completed"]
            assert check_run(events)["status"] == "cancelled"
            assert events[2]["payload"]["status"] == "cancelled"
        await settle()
        await cluster["C"].on_cancel(run_id, USER)  # ended: a no-op
        await cluster["B"].on_cancel(run_id, USER)
        await settle()
        assert len(on_a.events(run_id)) == len(on_b.events(run_id)) == 4


# ============================================================================ ack
async def test_an_ack_on_another_node_trims_the_shared_log(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster() as cluster:
        on_a = await Socket(cluster["A"]).connect()
        on_b = await Socket(cluster["B"]).connect()
        run_id = await on_a.start("ticker", context={"ticks": 8})
        await on_b.resume(run_id, 0)
        await on_b.until_seq(run_id, 5)
        await cluster["B"].on_ack(run_id, USER, 5)
        on_c = await Socket(cluster["C"]).connect()
        with pytest.raises(ResumeUnavailable):
            await on_c.resume(run_id, 3)
        with pytest.raises(InvalidField) as beyond:
            await cluster["C"].on_ack(run_id, USER, 99)
        assert beyond.value.field == "seq"
        await on_c.resume(run_id, 5)
        rest = await on_c.until_completed(run_id)
        assert check_run(on_b.events(run_id)[:5] + rest)["status"] == "succeeded"
        assert check_run(await on_b.until_completed(run_id))["status"] == "succeeded"


async def test_an_ack_trims_events_a_lagging_node_has_not_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once a bug: an ``ack`` trims the shared log past what another node's mirror has read. When
    that mirror asks for more, the log starts after a gap: ``RunStream.extend`` raises
    StreamError in the mirror's tail task, which crashes node B (its whole task group)."""
    async with open_cluster() as cluster:
        on_a = await Socket(cluster["A"]).connect()
        on_b = await Socket(cluster["B"]).connect()
        run_id = await on_a.start("ticker", context={"ticks": 8})
        await on_b.resume(run_id, 0)
        await on_b.until_seq(run_id, 3)
        cluster.nodes["B"].link.tail_gate = gate = trio.Event()  # B's link is slow a moment
        await on_a.until_seq(run_id, 6)
        await cluster["A"].on_ack(run_id, USER, 6)  # the client holds 1..6 (from A)
        await on_a.until_seq(run_id, 7)
        gate.set()
        events = await on_b.until_completed(run_id)
        assert check_run(events)["status"] == "succeeded"


# ========================================================================= detach
async def test_a_run_followed_only_from_another_node_is_detached_once_that_socket_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timeout = 3.0
    async with open_cluster(detached_run_timeout_s=timeout) as cluster:
        ids, _ = await cluster["A"].on_start_agent(
            user_id=USER, request_id="r", agent="ticker", message="m", context={"ticks": 600})
        run = cluster["A"].get_run(ids.run_id, USER)
        on_b = await Socket(cluster["B"]).connect()
        await on_b.resume(run.run_id, 0)
        await trio.sleep(10 * timeout)  # time passes; only B follows
        assert run.is_active
        assert len(on_b.events(run.run_id)) >= 10 * timeout / TICK_S
        await on_b.disconnect()
        left_at = trio.current_time()
        with trio.fail_after(4 * timeout):
            final = await run.wait_done()
        assert final["status"] == "cancelled"
        assert trio.current_time() - left_at >= timeout
        on_c = await Socket(cluster["C"]).connect()
        await settle()
        await on_c.resume(run.run_id, 0)
        assert check_run(await on_c.until_completed(run.run_id))["status"] == "cancelled"


# ====================================================================== node loss
def _frames(record: RunRecord, ts: float) -> list[tuple[int, bytes]]:
    prefix = envelope_prefix(record.run_id, record.thread_id)
    events: list[tuple[str, dict[str, Any]]] = [
        ("agent_started", {"agent": record.agent}),
        ("agent_thinking", {"thought": "hm"}),
        ("tool_executing", {"tool": "search", "call_id": "c1", "args": {}}),
        ("tool_executing", {"tool": "fetch", "call_id": "c2", "args": {}}),
        ("tool_completed", {"tool": "search", "call_id": "c1", "status": "ok", "result": 1}),
    ]
    return [(seq, encode_event(prefix, kind, seq, ts, payload))
            for seq, (kind, payload) in enumerate(events, start=1)]


async def test_a_lost_node_s_run_is_ended_once_by_the_survivors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A node that recorded five events (one tool still open) and stopped beating: one of two
    survivors appends exactly its closing events, seen by sockets on both."""
    async with open_cluster("BC") as cluster:
        shared = cluster.shared
        await shared.heartbeat("node_gone", LEASE_S)
        record = RunRecord(run_id="9" * 32, user_id=USER, request_id="r", thread_id="t",
                           agent="in_tool", node_id="node_gone")
        await shared.admit(record, max_active_runs_per_user=10, max_active_runs=100,
                           dedup_ttl_s=600)
        await shared.append(record.run_id, _frames(record, time.time()))
        await shared.set_open_tools(record.run_id, {"c2": "fetch"})
        lost_at = trio.current_time()
        on_b = await Socket(cluster["B"]).connect()
        on_c = await Socket(cluster["C"]).connect()
        await on_b.resume(record.run_id, 0)
        await on_c.resume(record.run_id, 3)
        events = await on_b.until_completed(record.run_id)
        assert trio.current_time() - lost_at <= LEASE_S + LEASE_S / 2
        assert types_of(events)[5:] == ["tool_completed", "agent_completed"]
        assert events[5]["payload"]["call_id"] == "c2"
        assert events[5]["payload"]["status"] == "error"
        assert check_run(events) == {"status": "failed", "error": "node_lost"}
        assert await on_c.until_completed(record.run_id) == events[3:]
        await settle()
        _, log = await shared.read(record.run_id, 0)
        assert [seq for seq, _ in log] == [1, 2, 3, 4, 5, 6, 7]
        assert await shared.record(record.run_id) == attrs.evolve(
            record, ended=True, open_tools={"c2": "fetch"})
        assert await shared.dead_nodes() == []
        assert await shared.node_runs("node_gone") == []


async def test_a_crashed_node_s_runs_end_node_lost_for_sockets_elsewhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(max_active_runs_per_user=2) as cluster:
        on_a = await Socket(cluster["A"]).connect()
        on_b = await Socket(cluster["B"]).connect()
        in_tool = await on_a.start("in_tool", "r1")
        ticking = await on_a.start("ticker", "r2", context={"ticks": 600})
        await on_b.resume(in_tool, 0)
        await on_b.resume(ticking, 0)
        await on_b.until_seq(ticking, 5)
        await settle()
        crashed_at = trio.current_time()
        await cluster.nodes["A"].crash()
        tool_run = await on_b.until_completed(in_tool)
        tick_run = await on_b.until_completed(ticking)
        assert trio.current_time() - crashed_at <= LEASE_S + LEASE_S / 2
        assert types_of(tool_run) == ["agent_started", "tool_executing", "tool_completed",
                                      "agent_completed"]
        assert tool_run[2]["payload"]["status"] == "error"
        for events in (tool_run, tick_run):
            assert check_run(events) == {"status": "failed", "error": "node_lost"}
        assert types_of(tick_run)[-2:] == ["partial_result", "agent_completed"]
        await settle()
        assert await on_b.start("hang", "r3") and await on_b.start("hang", "r4")  # slots freed


async def test_a_crashed_node_s_runs_end_within_node_lease_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once a bug: PROTOCOL says a dead node's runs end *within* ``node_lease_s``. A node that dies
    just after a heartbeat keeps its lease for ``node_lease_s``, and survivors look for dead
    nodes only every ``node_lease_s / 2``: its runs end up to 1.5 x ``node_lease_s`` later
    (11.6 s here, with the default 10 s)."""
    async with open_cluster() as cluster:
        on_a = await Socket(cluster["A"]).connect()
        on_b = await Socket(cluster["B"]).connect()
        run_id = await on_a.start("in_tool")
        await on_b.resume(run_id, 0)
        await trio.sleep_until(LEASE_S / 3 + 0.1)  # just after A's second heartbeat
        crashed_at = trio.current_time()
        await cluster.nodes["A"].crash()
        assert check_run(await on_b.until_completed(run_id))["error"] == "node_lost"
        assert trio.current_time() - crashed_at <= LEASE_S


# ======================================================================= shutdown
async def test_a_graceful_exit_writes_each_run_s_end_to_the_shared_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once a bug: a node that shuts down gracefully can leave its runs active in the shared state
    forever: ``drain_outbox`` returns while the replicator's last batch is still being
    written (the batch is out of the outbox), then ``leave_cluster`` forgets the node and the
    registry cancels the replicator mid-batch. With a run in a tool the batch is (append,
    open tools, finish): the end is appended but ``finish`` never runs, and since the node
    left, no survivor takes it over. The user's run slot is lost for good."""
    async with open_cluster(max_active_runs_per_user=1) as cluster:
        on_a = await Socket(cluster["A"]).connect()
        on_b = await Socket(cluster["B"]).connect()
        run_id = await on_a.start("in_tool")
        await on_b.resume(run_id, 0)
        await on_b.until_seq(run_id, 2)
        await cluster.nodes["A"].stop()
        assert check_run(await on_b.until_completed(run_id))["status"] == "cancelled"
        await trio.sleep(3 * LEASE_S)
        assert await on_b.start("echo", "next")


async def test_a_node_exits_cleanly_while_the_shared_state_is_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once a bug: leaving the service during an outage raises SharedStateUnavailable out of
    ``open_registry`` (``leave_cluster`` does not catch it from ``forget_node``)."""
    shared = MemorySharedState()
    async with open_registry(Config(), agents=make_agents(**AGENTS), shared=shared):
        shared.unavailable = True


async def test_a_cancelled_registry_ends_runs_followed_elsewhere_as_cancelled() -> None:
    """BUG (real clock: the bug spins, so a mock clock would never move): a registry whose
    block is cancelled must still end its runs with ``agent_completed`` cancelled
    (``open_registry``: "on exit (normal, exception or cancellation)"). The cancellation
    stops the replicator first; ``drain_outbox`` then busy-loops on an already set event for
    ``shutdown_grace_s`` and nothing is written. A socket on another node gets ``failed``
    ``node_lost`` a lease later instead."""
    shared = MemorySharedState()
    settings = Config(strict=True, shutdown_grace_s=0.3, node_lease_s=0.6)
    agents = make_agents(**AGENTS)
    with trio.fail_after(10):
        async with open_registry(settings, agents=agents, shared=shared) as node_b:
            on_b = await Socket(node_b).connect()
            with trio.CancelScope() as scope:
                async with open_registry(settings, agents=agents, shared=shared) as node_a:
                    on_a = await Socket(node_a).connect()
                    run_id = await on_a.start("hang")
                    await on_b.resume(run_id, 0)
                    await on_b.until_seq(run_id, 2)
                    scope.cancel()
            final = check_run(await on_b.until_completed(run_id))
            assert final == {"status": "cancelled", "error": "the server is shutting down"}


# ========================================================================= outage
async def test_an_outage_refuses_starts_degrades_health_and_loses_no_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster() as cluster:
        shared = cluster.shared
        on_a = await Socket(cluster["A"]).connect()
        on_b = await Socket(cluster["B"]).connect()
        run_id = await on_a.start("ticker", context={"ticks": 12})
        await on_b.resume(run_id, 0)
        await on_b.until_seq(run_id, 3)
        shared.unavailable = True
        with pytest.raises(Overloaded):
            await on_a.start("echo", "during")
        await trio.sleep(LEASE_S / 3)  # a heartbeat at most
        for node in "ABC":
            health = cluster[node].health()
            assert health.status == "degraded"
            assert any("shared state" in reason for reason in health.reasons), health
        seen = len(await on_a.until_seq(run_id, 8))  # A's own socket goes on
        assert seen >= 8 and on_b.seqs(run_id)[-1] < seen
        shared.unavailable = False
        here = await on_a.until_completed(run_id)
        there = await on_b.until_completed(run_id)
        assert here == there and check_run(here)["result"] == "done"
        await settle()
        trimmed, log = await shared.read(run_id, 0)
        assert trimmed == 0 and [seq for seq, _ in log] == list(range(1, 3 + 12 + 1))
        assert (await shared.record(run_id) or pytest.fail("record gone")).ended
        on_c = await Socket(cluster["C"]).connect()
        assert await on_c.start("echo", "after")  # starts work again
        await trio.sleep(LEASE_S / 3)
        assert all(cluster[node].health().ok for node in "ABC")


async def test_a_run_that_outgrows_the_outage_buffer_ends_failed_and_nothing_is_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Events wait for the store in a bounded buffer (a quarter of ``max_retained_mib``, at
    least 1 MiB): a run that keeps emitting past it ends ``failed``, saying why; its
    socket sees every event, and once the store is back so does every other node."""
    async with open_cluster(max_retained_mib=4) as cluster:
        on_a = await Socket(cluster["A"]).connect()
        run_id = await on_a.start("flood", context={"count": 400})  # 3.2 MiB
        await on_a.until_seq(run_id, 2)
        cluster.shared.unavailable = True
        events = await on_a.until_completed(run_id)
        end = events[-1]["payload"]
        assert end["status"] == "failed"
        assert "shared state is unreachable" in end["error"], end
        assert 2 < len(events) < 3 + 400
        cluster.shared.unavailable = False
        on_b = await Socket(cluster["B"]).connect()
        await on_b.resume(run_id, 0)
        assert await on_b.until_completed(run_id) == events
        assert check_run(events)["status"] == "failed"


async def test_a_start_whose_admission_answer_was_lost_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The store registered the run, but the node timed out waiting and refused the start
    (overloaded): the node undoes it, so the request starts afresh and the slot is free."""
    async with open_cluster(max_active_runs_per_user=1) as cluster:
        on_a = await Socket(cluster["A"]).connect()
        cluster.nodes["A"].link.lose_admit_replies = True
        with pytest.raises(Overloaded):
            await on_a.start("echo", request_id="q")
        cluster.nodes["A"].link.lose_admit_replies = False
        await settle()
        on_b = await Socket(cluster["B"]).connect()
        ids, duplicate = await cluster["B"].on_start_agent(
            user_id=USER, request_id="q", agent="echo", message="again",
            subscriber=on_b.queue)
        assert not duplicate
        assert check_run(await on_b.until_completed(ids.run_id))["status"] == "succeeded"


async def test_a_store_that_lost_everything_gets_each_node_s_runs_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A Redis restarted empty: each node's next heartbeat finds it unknown, and the node
    writes its runs (active and retained) and connections again, before more events."""
    async with open_cluster(max_active_runs_per_user=1, max_connections_per_user=2) as cluster:
        on_a = await Socket(cluster["A"]).connect()
        done = await on_a.start("echo", request_id="done")
        ended = await on_a.until_completed(done)
        run_id = await on_a.start("ticker", request_id="live", context={"ticks": 8})
        await on_a.until_seq(run_id, 4)
        cluster.shared.flush()
        await trio.sleep(LEASE_S / 3)  # a heartbeat at most
        on_b = await Socket(cluster["B"]).connect()
        with pytest.raises(TooManyConnections):  # A's socket counts again
            await Socket(cluster["C"]).connect()
        with pytest.raises(RateLimited):  # and so does the live run's slot
            await on_b.start("echo", request_id="another")
        ids, duplicate = await cluster["B"].on_start_agent(
            user_id=USER, request_id="live", agent="ticker", message="again")
        assert (ids.run_id, duplicate) == (run_id, True)
        await on_b.resume(done, 0)
        assert await on_b.until_completed(done) == ended
        await on_b.resume(run_id, 0)
        assert await on_b.until_completed(run_id) == await on_a.until_completed(run_id)
        assert check_run(on_b.events(run_id))["result"] == "done"


async def test_a_socket_closed_during_an_outage_still_counts_afterwards(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once a bug: ``on_disconnect`` during an outage forgets the connection locally only; the
    shared count keeps it as long as its node lives, so once the store is back the user is
    refused (TooManyConnections) on every node although no socket of theirs is open."""
    async with open_cluster(max_connections_per_user=2) as cluster:
        sockets = [await Socket(cluster[n]).connect() for n in "AB"]
        cluster.shared.unavailable = True
        for socket in sockets:
            socket.reg.on_disconnect(socket.queue)  # written once the store is back
        cluster.shared.unavailable = False
        await trio.sleep(LEASE_S)
        for node in "AB":
            await Socket(cluster[node]).connect()
