"""The SharedState contract, run against MemorySharedState and RedisSharedState alike.

The Redis half runs on a real ``redis-server`` that a module fixture starts on a free port
(in a temporary directory, without persistence); each test takes its own key prefix. Without
``redis-server`` those tests fail, saying how to install it: CI has it.
"""

from __future__ import annotations

import hashlib
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import attrs
import coredis
import pytest
import trio
import trio.testing

from registry._errors import Overloaded, RateLimited
from registry._redis import open_redis_state
from registry._shared import Batch, RunRecord, SharedState, SharedStateUnavailable
from registry._shared_memory import MemorySharedState
from tests import _redis
from tests._redis import RedisServer
from tests._redis import free_port as _free_port

OUTAGE_S = 3.0  # a call to a stopped Redis raises within this
POLL_S = 5.0  # bound of every polling loop (expiry, leases, resubscription)

# the redis-server fixtures (tests/_redis.py)
redis_server = _redis.redis_server
own_redis_server = _redis.own_redis_server


# ------------------------------------------------------------------ the store
@attrs.frozen
class Store:
    """Two nodes' views of one shared store (one object for memory, two clients for Redis).

    Attributes:
        settle: Returns once every ``tail`` in progress is blocked waiting.
    """

    a: SharedState
    b: SharedState
    settle: Callable[[int], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> RedisServer | None:
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server


@pytest.fixture
async def store(backend: RedisServer | None) -> AsyncIterator[Store]:
    if backend is None:
        memory = MemorySharedState()
        yield Store(memory, memory, lambda _: trio.testing.wait_all_tasks_blocked())
        return
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_redis_state(backend.url, key_prefix=prefix))
        b = await stack.enter_async_context(open_redis_state(backend.url, key_prefix=prefix))
        raw = await stack.enter_async_context(coredis.Redis.from_url(backend.url))

        async def settle(tails: int) -> None:
            await poll(lambda: _blocked_clients(raw, tails))

        yield Store(a, b, settle)


async def _blocked_clients(raw: coredis.Redis[bytes], at_least: int) -> bool:
    info = await raw.info("clients")
    blocked: Any = info["blocked_clients"]
    return int(blocked) >= at_least


async def poll(condition: Callable[[], Awaitable[bool]]) -> None:
    """Waits (a bounded while) until ``condition()`` holds: for expiries and leases."""
    with trio.fail_after(POLL_S):
        while not await condition():
            await trio.sleep(0.02)


def run_record(run_id: str, *, user: str = "alice", request: str | None = None,
               node: str = "n1") -> RunRecord:
    return RunRecord(run_id=run_id, user_id=user, request_id=request or f"req-{run_id}",
                     thread_id=f"thread-{run_id}", agent="triage", node_id=node)


async def admit(state: SharedState, record: RunRecord, *, per_user: int = 10,
                total: int = 100, ttl: float = 60.0) -> tuple[RunRecord, bool]:
    return await state.admit(record, max_active_runs_per_user=per_user,
                             max_active_runs=total, dedup_ttl_s=ttl)


def events(*seqs: int) -> list[tuple[int, bytes]]:
    return [(seq, f'{{"seq": {seq}}}'.encode()) for seq in seqs]


# ------------------------------------------------------------------ admission
async def test_admit_registers_a_new_run_and_finds_it_again(store: Store) -> None:
    first = run_record("r1", request="q")
    assert await admit(store.a, first) == (first, False)
    again = await admit(store.b, run_record("r2", request="q", node="n2"))
    assert again == (first, True)
    assert await store.b.record("r2") is None


async def test_dedup_is_per_user_whatever_the_ids_contain(store: Store) -> None:
    tricky = [("a:b", "c"), ("a", "b:c"), ("a", "b"), ("", ":"), ("ü:\n*{x}", "run:r1:log")]
    for number, (user, request) in enumerate(tricky):
        record = run_record(f"r{number}", user=user, request=request)
        assert await admit(store.a, record) == (record, False)
    for number, (user, request) in enumerate(tricky):
        found, existed = await admit(store.b, run_record("other", user=user, request=request))
        assert (found.run_id, existed) == (f"r{number}", True)


async def test_a_user_at_the_limit_is_rate_limited_on_every_node(store: Store) -> None:
    await admit(store.a, run_record("r1"), per_user=2)
    await admit(store.b, run_record("r2", node="n2"), per_user=2)
    for state in (store.a, store.b):
        with pytest.raises(RateLimited):
            await admit(state, run_record("r3"), per_user=2)
    await admit(store.a, run_record("r4", user="bob"), per_user=2)
    assert await store.a.record("r3") is None


async def test_the_service_at_its_limit_is_overloaded_on_every_node(store: Store) -> None:
    await admit(store.a, run_record("r1", user="u1"), total=2)
    await admit(store.b, run_record("r2", user="u2", node="n2"), total=2)
    for state in (store.a, store.b):
        with pytest.raises(Overloaded):
            await admit(state, run_record("r3", user="u3"), total=2)
    with pytest.raises(RateLimited):  # the user's limit is checked first
        await admit(store.a, run_record("r4", user="u1"), per_user=1, total=2)


async def test_admissions_at_one_moment_each_get_their_own_answer(store: Store) -> None:
    """Twelve starts at once, as a burst of clients starting their next runs: two ask for
    the same request (one run, the other a duplicate), one user goes over its limit, and
    the rest are admitted, each told its own outcome."""
    answers: dict[str, tuple[RunRecord, bool]] = {}
    refused: list[str] = []

    async def start(record: RunRecord, per_user: int = 10) -> None:
        try:
            answers[record.run_id] = await admit(store.a, record, per_user=per_user)
        except RateLimited:
            refused.append(record.run_id)

    records = [run_record(f"r{i}", user=f"u{i}") for i in range(8)]
    twins = [run_record("t1", user="twin", request="same"),
             run_record("t2", user="twin", request="same")]
    async with trio.open_nursery() as nursery:
        for record in records + twins:
            nursery.start_soon(start, record)
        for run_id in ("l1", "l2"):
            nursery.start_soon(start, run_record(run_id, user="busy"), 1)
    for record in records:
        assert answers[record.run_id] == (record, False)
    (first, first_dup), (second, second_dup) = answers["t1"], answers["t2"]
    assert first.run_id == second.run_id
    assert sorted([first_dup, second_dup]) == [False, True]
    assert len(refused) == 1 and ({"l1", "l2"} - set(refused)) <= set(answers)


async def test_a_duplicate_is_found_even_at_the_limits(store: Store) -> None:
    first = run_record("r1", request="q")
    await admit(store.a, first, per_user=1, total=1)
    assert await admit(store.b, run_record("r2", request="q"), per_user=1, total=1) == (
        first, True)


async def test_finish_frees_exactly_one_slot(store: Store) -> None:
    for number in range(3):
        await admit(store.a, run_record(f"r{number}", user=f"u{number % 2}"), per_user=2, total=3)
    await store.b.finish("r0", retention_s=60)
    await store.b.finish("r0", retention_s=60)
    await admit(store.b, run_record("r3", user="u0"), per_user=2, total=3)
    with pytest.raises(Overloaded):
        await admit(store.a, run_record("r4", user="u2"), per_user=2, total=3)
    with pytest.raises(RateLimited):
        await admit(store.a, run_record("r5", user="u0"), per_user=2, total=4)
    await store.a.finish("r2", retention_s=60)
    await admit(store.a, run_record("r6", user="u0"), per_user=2, total=3)


async def test_concurrent_admits_of_one_request_make_one_run(store: Store) -> None:
    results: list[tuple[RunRecord, bool]] = []

    async def one(number: int) -> None:
        state = (store.a, store.b)[number % 2]
        results.append(await admit(state, run_record(f"r{number}", request="q")))

    async with anyio.create_task_group() as tg:
        for number in range(50):
            tg.start_soon(one, number)
    assert sum(not existed for _, existed in results) == 1
    assert len({record.run_id for record, _ in results}) == 1


async def test_concurrent_admits_never_pass_the_user_limit(store: Store) -> None:
    admitted: list[str] = []
    limited = 0

    async def one(number: int) -> None:
        nonlocal limited
        state = (store.a, store.b)[number % 2]
        try:
            record, existed = await admit(state, run_record(f"r{number}"), per_user=10)
        except RateLimited:
            limited += 1
        else:
            assert not existed
            admitted.append(record.run_id)

    async with anyio.create_task_group() as tg:
        for number in range(50):
            tg.start_soon(one, number)
    assert (len(admitted), limited) == (10, 40)
    assert sorted(await store.a.node_runs("n1")) == sorted(admitted)


async def test_the_record_round_trips_with_its_open_tools(store: Store) -> None:
    record = RunRecord(run_id="r1", user_id="ü:1", request_id="q", thread_id="t", agent="a",
                       node_id="n1", open_tools={"c1": "search"})
    await admit(store.a, record)
    assert await store.b.record("r1") == record
    await store.a.set_open_tools("r1", {"c1": "search", "c2": "fetch"})
    assert await store.b.record("r1") == attrs.evolve(
        record, open_tools={"c1": "search", "c2": "fetch"})
    await store.a.set_open_tools("r1", {})
    assert await store.b.record("r1") == attrs.evolve(record, open_tools={})
    assert await store.b.record("nope") is None
    await store.a.set_open_tools("nope", {"c": "t"})  # a run that is gone stays gone
    assert await store.b.record("nope") is None


async def test_finish_is_idempotent_and_everything_expires_after_retention(
    store: Store,
) -> None:
    await admit(store.a, run_record("r1", request="q"), per_user=1)
    await store.a.append("r1", events(1, 2, 3))
    await store.a.trim("r1", 1)
    await store.a.finish("r1", retention_s=0.3)
    await store.b.finish("r1", retention_s=0.3)
    assert (await store.b.record("r1")) == attrs.evolve(run_record("r1", request="q"),
                                                         ended=True)
    assert await store.b.read("r1", 0) == (1, events(2, 3))
    found, existed = await admit(store.b, run_record("r2", request="q"), per_user=1)
    assert (found.run_id, found.ended, existed) == ("r1", True, True)

    async def expired() -> bool:
        return await store.b.record("r1") is None

    await poll(expired)
    assert await store.b.read("r1", 0) == (0, [])
    assert await admit(store.b, run_record("r3", request="q"), per_user=1) == (
        run_record("r3", request="q"), False)


async def test_the_dedup_key_expires_after_its_ttl_while_the_run_is_active(
    store: Store,
) -> None:
    await admit(store.a, run_record("r1", request="q"), ttl=0.2)

    async def new_run() -> bool:
        _, existed = await admit(store.b, run_record("r2", request="q"), ttl=60)
        return not existed

    await poll(new_run)
    assert (await store.a.record("r1")) is not None


async def test_drop_forgets_a_run_at_once(store: Store) -> None:
    await admit(store.a, run_record("r1", request="q"), per_user=1)
    await store.a.append("r1", events(1, 2))
    await store.b.drop("r1")
    assert await store.a.record("r1") is None
    assert await store.a.read("r1", 0) == (0, [])
    assert await store.a.node_runs("n1") == []
    assert await admit(store.a, run_record("r2", request="q"), per_user=1) == (
        run_record("r2", request="q"), False)
    await store.b.drop("r1")
    await store.b.drop("never")


async def test_a_dropped_run_leaves_the_dedup_key_of_a_newer_run(store: Store) -> None:
    await admit(store.a, run_record("r1", request="q"))
    await store.a.finish("r1", retention_s=60)
    await store.a.drop("r1")
    await admit(store.a, run_record("r2", request="q"))
    await store.a.finish("r2", retention_s=60)
    await store.b.drop("r1")
    found, existed = await admit(store.b, run_record("r3", request="q"))
    assert (found.run_id, existed) == ("r2", True)


# ------------------------------------------------------------------ event log
async def test_append_skips_every_seq_already_there(store: Store) -> None:
    await admit(store.a, run_record("r1"))
    await store.a.append("r1", events(1, 2, 3, 4, 5))
    await store.a.append("r1", [(seq, b"changed") for seq in (3, 4, 5)] + events(6, 7))
    await store.a.append("r1", [(2, b"late"), (4, b"late")])  # an out-of-order resend
    await store.a.append("r1", [])
    assert await store.b.read("r1", 0) == (0, events(1, 2, 3, 4, 5, 6, 7))


async def test_read_returns_every_event_after_any_seq(store: Store) -> None:
    await admit(store.a, run_record("r1"))
    await store.a.append("r1", events(1, 2, 3, 4))
    for after in range(6):
        assert await store.b.read("r1", after) == (0, events(*range(after + 1, 5)))
    assert await store.b.read("unknown", 0) == (0, [])


async def test_read_after_trim_says_what_was_trimmed(store: Store) -> None:
    await admit(store.a, run_record("r1"))
    await store.a.append("r1", events(1, 2, 3, 4, 5))
    await store.a.trim("r1", 3)
    assert await store.b.read("r1", 0) == (3, events(4, 5))
    assert await store.b.read("r1", 4) == (3, events(5))
    await store.a.trim("r1", 2)  # never back
    assert await store.b.read("r1", 0) == (3, events(4, 5))
    await store.a.trim("r1", 5)
    assert await store.b.read("r1", 0) == (5, [])
    await store.a.append("r1", events(5, 6))
    assert await store.b.read("r1", 0) == (5, events(6))
    await store.a.trim("r1", 9)  # beyond the top: a late append of a trimmed seq is skipped
    await store.a.append("r1", events(8, 9, 10))
    assert await store.b.read("r1", 0) == (9, events(10))


async def test_trim_of_a_run_without_events_or_record(store: Store) -> None:
    await admit(store.a, run_record("r1"))
    await store.a.trim("r1", 2)
    await store.a.append("r1", events(1, 2, 3))
    assert await store.b.read("r1", 0) == (2, events(3))
    await store.a.trim("gone", 5)
    assert await store.b.read("gone", 0) == (0, [])


async def test_tail_returns_what_is_there_at_once(store: Store) -> None:
    await admit(store.a, run_record("r1"))
    await store.a.append("r1", events(1, 2, 3))
    with trio.fail_after(1):
        assert await store.b.tail("r1", 1, wait_s=30) == events(2, 3)
        assert await store.b.tail("r1", 0, wait_s=0) == events(1, 2, 3)
        assert await store.b.tail("r1", 3, wait_s=0) == []


async def test_tail_waits_for_the_first_event_and_wakes_on_append(store: Store) -> None:
    await admit(store.a, run_record("r1"))
    await store.a.append("r1", events(1))
    got: dict[str, list[tuple[int, bytes]]] = {}

    async def tail(name: str, run_id: str) -> None:
        got[name] = await store.b.tail(run_id, 1, wait_s=30)

    with trio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(tail, "r1", "r1")
            tg.start_soon(tail, "r2", "r2")  # a log that does not exist yet
            await store.settle(2)
            await store.a.append("r1", events(1, 2, 3))
            await store.a.append("r2", events(1, 2))
    assert got == {"r1": events(2, 3), "r2": events(2)}


async def test_tail_returns_nothing_when_nothing_comes(store: Store) -> None:
    await admit(store.a, run_record("r1"))
    await store.a.append("r1", events(1))
    started = trio.current_time()
    assert await store.b.tail("r1", 1, wait_s=0.2) == []
    assert 0.15 <= trio.current_time() - started < 2


# ---------------------------------------------------------------- connections
async def test_connections_are_counted_across_nodes(store: Store) -> None:
    assert await store.a.connect("alice", "c1", "n1", 2)
    assert await store.b.connect("alice", "c2", "n2", 2)
    assert not await store.a.connect("alice", "c3", "n1", 2)
    assert not await store.b.connect("alice", "c3", "n2", 2)
    assert await store.a.connect("alice", "c1", "n1", 2)  # already counted
    assert await store.a.connect("alice:x", "c3", "n1", 2)  # another user
    await store.a.disconnect("alice", "c2")
    await store.a.disconnect("alice", "c2")
    await store.a.disconnect("alice", "never")
    assert await store.b.connect("alice", "c3", "n2", 2)
    assert not await store.b.connect("alice", "c4", "n2", 2)


# ---------------------------------------------------------------------- nodes
async def test_a_node_whose_lease_runs_out_is_dead_until_claimed(store: Store) -> None:
    assert await store.a.dead_nodes() == []
    await store.a.heartbeat("n1", lease_s=0.3)
    await store.b.heartbeat("n2", lease_s=60)
    assert await store.a.dead_nodes() == []
    assert not await store.a.claim("n2", by="n1")  # alive: nothing to claim

    async def n1_dead() -> bool:
        return await store.b.dead_nodes() == ["n1"]

    await poll(n1_dead)
    winners: list[str] = []

    async def claim(number: int) -> None:
        if await (store.a, store.b)[number % 2].claim("n1", by=f"s{number}"):
            winners.append(f"s{number}")

    async with anyio.create_task_group() as tg:
        for number in range(20):
            tg.start_soon(claim, number)
    assert len(winners) == 1
    assert await store.a.dead_nodes() == []
    assert await store.a.claim("n1", by=winners[0])  # the winner again (a retried claim)
    assert not await store.a.claim("n1", by="someone else")


async def test_a_node_that_heartbeats_again_is_alive(store: Store) -> None:
    await store.a.heartbeat("n1", lease_s=0.2)

    async def n1_dead() -> bool:
        return await store.b.dead_nodes() == ["n1"]

    await poll(n1_dead)
    await store.a.heartbeat("n1", lease_s=60)
    assert await store.b.dead_nodes() == []


async def test_a_heartbeat_says_whether_the_store_knew_the_node(store: Store) -> None:
    assert await store.a.heartbeat("n1", lease_s=60) is False  # its first beat
    assert await store.b.heartbeat("n1", lease_s=60) is True
    await store.a.forget_node("n1")  # as after a clean exit, or a store that lost it
    assert await store.a.heartbeat("n1", lease_s=60) is False


async def test_restore_writes_a_lost_active_run_again(store: Store) -> None:
    record = attrs.evolve(run_record("r1", request="q"), open_tools={"c1": "search"})
    assert await store.a.restore(record, events(3, 4), trimmed=2, dedup_ttl_s=60,
                                 retention_s=60)
    assert await store.b.record("r1") == record
    assert await store.b.read("r1", 0) == (2, events(3, 4))
    assert await store.b.node_runs("n1") == ["r1"]
    assert await admit(store.b, run_record("r2", request="q", node="n2")) == (record, True)
    with pytest.raises(RateLimited):  # its slot counts again
        await admit(store.b, run_record("r3", request="other"), per_user=1)
    await store.a.append("r1", events(4, 5))  # the node goes on where it was
    assert await store.b.read("r1", 3) == (2, events(4, 5))


async def test_restore_writes_a_lost_ended_run_again_for_its_retention(store: Store) -> None:
    record = attrs.evolve(run_record("r1", request="q"), ended=True)
    assert await store.a.restore(record, events(1, 2), trimmed=0, dedup_ttl_s=60,
                                 retention_s=0.3)
    assert await store.b.record("r1") == record
    assert await store.b.node_runs("n1") == []  # no slot
    assert await admit(store.b, run_record("r2", request="other"), per_user=1) == (
        run_record("r2", request="other"), False)
    assert (await admit(store.b, run_record("r3", request="q")))[0].run_id == "r1"

    async def expired() -> bool:
        return await store.b.record("r1") is None and await store.b.read("r1", 0) == (0, [])

    await poll(expired)


async def test_restore_leaves_a_run_the_store_has_alone(store: Store) -> None:
    record = run_record("r1", request="q")
    await admit(store.a, record)
    await store.a.append("r1", events(1, 2, 3))
    ended = attrs.evolve(record, ended=True, open_tools={"c": "t"})
    assert not await store.b.restore(ended, events(1), trimmed=0, dedup_ttl_s=60,
                                     retention_s=60)
    assert await store.b.record("r1") == record
    assert await store.b.read("r1", 0) == (0, events(1, 2, 3))


async def test_restore_replaces_a_log_written_after_the_loss(store: Store) -> None:
    """Events appended to the empty store before the node noticed the loss are rewritten
    with the ones before them, in order."""
    await store.a.append("r1", events(5, 6))
    assert await store.a.restore(run_record("r1"), events(4, 5, 6), trimmed=3,
                                 dedup_ttl_s=60, retention_s=60)
    assert await store.b.read("r1", 0) == (3, events(4, 5, 6))


async def test_node_runs_are_the_active_runs_it_owns(store: Store) -> None:
    await admit(store.a, run_record("r1", node="n1"))
    await admit(store.a, run_record("r2", node="n1"))
    await admit(store.b, run_record("r3", node="n2"))
    assert await store.b.node_runs("n1") == ["r1", "r2"]
    assert await store.a.node_runs("n2") == ["r3"]
    await store.a.finish("r1", retention_s=60)
    assert await store.b.node_runs("n1") == ["r2"]
    assert await store.b.node_runs("n9") == []


async def test_forget_node_removes_its_connections_and_run_set(store: Store) -> None:
    await store.a.heartbeat("n1", lease_s=0.2)
    await admit(store.a, run_record("r1", node="n1"))
    assert await store.a.connect("alice", "c1", "n1", 2)
    assert await store.a.connect("alice", "c2", "n1", 2)
    assert await store.a.connect("bob", "c3", "n1", 1)
    assert await store.b.connect("carol", "c4", "n2", 1)

    async def n1_dead() -> bool:
        return await store.b.dead_nodes() == ["n1"]

    await poll(n1_dead)
    assert await store.b.claim("n1", by="n2")
    await store.b.finish("r1", retention_s=60)
    await store.b.forget_node("n1")
    assert await store.b.node_runs("n1") == []
    assert await store.b.dead_nodes() == []
    assert await store.b.connect("alice", "c5", "n2", 2)
    assert await store.b.connect("alice", "c6", "n2", 2)
    assert await store.b.connect("bob", "c7", "n2", 1)
    assert not await store.b.connect("carol", "c8", "n2", 1)  # n2's own stays
    await store.b.forget_node("n1")
    await store.a.heartbeat("n1", lease_s=0.2)  # the same id, restarted: its claim is gone
    await poll(n1_dead)


# -------------------------------------------------------------------- mailbox
async def test_a_mailbox_receives_what_is_sent_to_its_node(store: Store) -> None:
    with trio.fail_after(5):
        async with store.a.mailbox("n1") as inbox, store.b.mailbox("n2") as other:
            await store.b.send("n1", b"cancel r1")
            await store.a.send("n1", b"cancel r2")
            await store.a.send("n2", b"\x00\xff")
            await store.a.send("n3", b"nobody listens")
            assert [await inbox.__anext__(), await inbox.__anext__()] == [
                b"cancel r1", b"cancel r2"]
            assert await other.__anext__() == b"\x00\xff"
        await store.a.send("n1", b"after close")


async def test_followers_are_the_nodes_that_said_so_recently_with_their_progress(
    store: Store,
) -> None:
    assert await store.a.followers("r1") == {}
    await store.a.follow("r1", "n1", 0.3, 4)
    await store.b.follow("r1", "n2", 60, 2)
    await store.b.follow("r1", "n2", 60, 7)  # a later word replaces the earlier one
    assert await store.b.followers("r1") == {"n1": 4, "n2": 7}
    assert await store.a.followers("r2") == {}

    async def n1_expired() -> bool:
        return await store.a.followers("r1") == {"n2": 7}

    await poll(n1_expired)


async def test_append_many_appends_each_run_s_events_as_append_does(store: Store) -> None:
    for run in ("r1", "r2"):
        await admit(store.a, run_record(run, request=f"q-{run}"))
    await store.a.append("r1", events(1, 1))
    await store.a.append_many({"r1": events(1, 3), "r2": events(1, 2)})
    assert await store.b.read("r1", 0) == (0, events(1, 3))
    assert await store.b.read("r2", 0) == (0, events(1, 2))


async def test_append_many_records_open_tools_with_the_events(store: Store) -> None:
    for run in ("r1", "r2"):
        await admit(store.a, run_record(run, request=f"q-{run}"))
    await store.a.append_many({"r1": events(1, 2)}, {"r1": {"c1": "search"}, "r2": {},
                                                     "gone": {"c": "t"}})
    record = await store.b.record("r1")
    assert record is not None and record.open_tools == {"c1": "search"}
    await store.a.append_many({}, {"r1": {}})
    record = await store.b.record("r1")
    assert record is not None and record.open_tools == {}
    assert await store.b.record("gone") is None  # a run that is gone stays gone
    assert await store.b.read("r1", 0) == (0, events(1, 2))


async def test_apply_writes_events_tools_ends_disconnects_and_drops_in_one_step(
    store: Store,
) -> None:
    for run in ("r1", "r2", "r3"):
        await admit(store.a, run_record(run, request=f"q-{run}"))
    assert await store.a.connect("alice", "c1", "n1", 1)
    batch = Batch(logs={"r1": events(1, 2), "r2": events(1)}, open_tools={"r2": {"c": "t"}},
                  finished={"r1": 60.0}, disconnected=[("alice", "c1")], dropped=["r3"])
    for _ in range(2):  # applied twice (a retry) it changes nothing more
        await store.a.apply(batch)
        first = await store.b.record("r1")
        assert first is not None and first.ended
        assert await store.b.read("r1", 0) == (0, events(1, 2))
        second = await store.b.record("r2")
        assert second is not None and second.open_tools == {"c": "t"} and not second.ended
        assert await store.b.record("r3") is None
        assert await store.b.node_runs("n1") == ["r2"]
        assert await store.b.connect("alice", "c2", "n2", 1)  # c1 no longer counts
        await store.b.disconnect("alice", "c2")
    await store.a.apply(Batch())  # nothing to write


async def test_an_acked_trim_spares_what_followers_on_other_nodes_still_need(
    store: Store,
) -> None:
    for run in ("r1", "r2"):
        await admit(store.a, run_record(run, request=f"q-{run}"))
    await store.a.append_many({"r1": events(*range(1, 11)), "r2": events(1, 2, 3)})
    await store.b.follow("r1", "n2", 60, 4)  # sockets on n2 have been sent up to 4
    await store.a.follow("r1", "n1", 60, 2)  # the acking node's own word does not hold it
    await store.b.follow("r1", "n3", 0.2, 1)  # a word about to expire
    await store.a.apply(Batch(acked={"r1": (8, "n1"), "r2": (2, "n1"), "gone": (5, "n1")}))
    assert (await store.b.read("r1", 0))[0] == 1  # n3 still follows (for 0.2 s)
    assert await store.b.read("r2", 0) == (2, events(3))  # nobody follows r2
    assert await store.b.record("gone") is None  # a run that is gone stays gone

    async def n3_expired() -> bool:
        return await store.a.followers("r1") == {"n1": 2, "n2": 4}

    await poll(n3_expired)
    await store.a.apply(Batch(acked={"r1": (8, "n1")}))
    assert await store.b.read("r1", 0) == (4, events(*range(5, 11)))
    await store.b.follow("r1", "n2", 60, 9)
    await store.a.apply(Batch(acked={"r1": (8, "n1")}))
    assert await store.b.read("r1", 0) == (8, events(9, 10))
    await store.a.apply(Batch(acked={"r1": (3, "n1")}))  # never back
    assert await store.b.read("r1", 0) == (8, events(9, 10))


async def test_ping(store: Store) -> None:
    await store.a.ping()
    await store.b.ping()


# ------------------------------------------------------------------- outages
CALLS: list[tuple[str, Callable[[SharedState], Awaitable[Any]]]] = [
    ("admit", lambda s: admit(s, run_record("x"))),
    ("follow", lambda s: s.follow("r1", "n1", 1, 0)),
    ("append_many", lambda s: s.append_many({"r1": events(1, 1)})),
    ("followers", lambda s: s.followers("r1")),
    ("set_open_tools", lambda s: s.set_open_tools("r1", {})),
    ("finish", lambda s: s.finish("r1", retention_s=1)),
    ("drop", lambda s: s.drop("r1")),
    ("record", lambda s: s.record("r1")),
    ("append", lambda s: s.append("r1", events(9))),
    ("read", lambda s: s.read("r1", 0)),
    ("tail", lambda s: s.tail("r1", 1, wait_s=0.1)),
    ("trim", lambda s: s.trim("r1", 1)),
    ("connect", lambda s: s.connect("alice", "c1", "n1", 5)),
    ("disconnect", lambda s: s.disconnect("alice", "c1")),
    ("heartbeat", lambda s: s.heartbeat("n1", 10)),
    ("dead_nodes", lambda s: s.dead_nodes()),
    ("claim", lambda s: s.claim("n9", "n1")),
    ("node_runs", lambda s: s.node_runs("n1")),
    ("forget_node", lambda s: s.forget_node("n9")),
    ("send", lambda s: s.send("n1", b"m")),
    ("ping", lambda s: s.ping()),
]


async def _open_mailbox(state: SharedState) -> None:
    async with state.mailbox("n1"):
        pass


async def _all_raise_unavailable(state: SharedState) -> None:
    for name, call in [*CALLS, ("mailbox", _open_mailbox)]:
        with trio.fail_after(OUTAGE_S):
            try:
                await call(state)
            except SharedStateUnavailable:
                continue
        pytest.fail(f"{name} did not raise SharedStateUnavailable")


async def _all_work(state: SharedState) -> None:
    await admit(state, run_record("r1"))
    for _, call in CALLS:
        with trio.fail_after(OUTAGE_S):
            await call(state)
    await _open_mailbox(state)


async def test_memory_marked_unavailable_raises_everywhere() -> None:
    state = MemorySharedState()
    state.unavailable = True
    await _all_raise_unavailable(state)
    state.unavailable = False
    await _all_work(state)


async def test_a_stopped_redis_raises_everywhere_and_is_used_again_once_back(
    own_redis_server: RedisServer,
) -> None:
    async with open_redis_state(own_redis_server.url, timeout_s=2) as state:
        await _all_work(state)
        async with state.mailbox("n1") as inbox:
            own_redis_server.stop()
            await _all_raise_unavailable(state)
            own_redis_server.start()
            await _all_work(state)
            await _receive_once_resubscribed(state, inbox)


async def _receive_once_resubscribed(state: SharedState, inbox: Any) -> None:
    """The open mailbox resubscribes by itself: sends reach it again within a while."""
    with trio.fail_after(POLL_S):
        while True:
            await state.send("n1", b"again")
            with trio.move_on_after(0.1):
                while await inbox.__anext__() != b"again":  # or what _all_work sent
                    pass
                return


async def test_a_redis_that_hangs_times_out_and_is_used_again_once_it_answers(
    own_redis_server: RedisServer,
) -> None:
    async with open_redis_state(own_redis_server.url, timeout_s=0.3) as state:
        await _all_work(state)
        assert own_redis_server.process is not None
        own_redis_server.process.send_signal(signal.SIGSTOP)
        try:
            for call in (state.ping(), admit(state, run_record("r2")), state.tail("r1", 1, 0.1),
                         state.append("r1", events(10))):
                with trio.fail_after(OUTAGE_S), pytest.raises(SharedStateUnavailable):
                    await call
        finally:
            own_redis_server.process.send_signal(signal.SIGCONT)
        await _all_work(state)
        await state.append("r1", events(10))  # whether or not the timed-out append went in
        assert (await state.read("r1", 9))[1] == events(10)


async def test_a_tail_in_progress_raises_when_redis_goes_away(
    own_redis_server: RedisServer,
) -> None:
    async with open_redis_state(own_redis_server.url, timeout_s=2) as state:
        raw = coredis.Redis.from_url(own_redis_server.url)
        async with raw, anyio.create_task_group() as tg:

            async def tail() -> None:
                with trio.fail_after(OUTAGE_S), pytest.raises(SharedStateUnavailable):
                    await state.tail("r1", 0, wait_s=30)

            tg.start_soon(tail)
            await poll(lambda: _blocked_clients(raw, 1))
            own_redis_server.stop()


async def test_a_state_opens_while_redis_is_down(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, _free_port())
    async with open_redis_state(server.url, timeout_s=2) as state:
        with pytest.raises(SharedStateUnavailable):
            await state.ping()
        server.start()
        try:
            await state.ping()
        finally:
            server.stop()


def test_the_redis_state_runs_under_asyncio(redis_server: RedisServer) -> None:
    async def main() -> None:
        with anyio.fail_after(10):
            prefix = f"asyncio-{uuid.uuid4().hex[:12]}:"
            async with open_redis_state(redis_server.url, key_prefix=prefix) as state:
                await admit(state, run_record("r1"))
                async with anyio.create_task_group() as tg:
                    got: list[list[tuple[int, bytes]]] = []

                    async def tail() -> None:
                        got.append(await state.tail("r1", 0, wait_s=5))

                    tg.start_soon(tail)
                    await state.append("r1", events(1))
                assert got == [events(1)]
                async with state.mailbox("n1") as inbox:
                    await state.send("n1", b"m")
                    assert await inbox.__anext__() == b"m"

    anyio.run(main, backend="asyncio")


def test_keys_are_what_the_module_docstring_says(redis_server: RedisServer) -> None:
    async def main() -> None:
        prefix = f"layout-{uuid.uuid4().hex[:12]}:"
        async with open_redis_state(redis_server.url, key_prefix=prefix) as state, \
                coredis.Redis.from_url(redis_server.url) as raw:
            await admit(state, run_record("r1"))
            await state.append("r1", events(1, 2))
            await state.connect("alice", "c1", "n1", 5)
            await state.heartbeat("n1", 60)
            keys = {key.decode()[len(prefix):] for key in await raw.keys(prefix + "*")}
            alice, request = _h("alice"), _h("req-r1")
            assert keys == {
                "active:all", f"active:user:{alice}", f"conns:{alice}",
                f"dedup:{alice}:{request}", "lease:n1", "log:r1", "nodeconns:n1", "nodes",
                "noderuns:n1", "run:r1"}
            entries = await raw.xrange(prefix + "log:r1")
            assert [(e.identifier, dict(e.field_values)) for e in entries] == [
                (f"0-{seq}".encode(), {b"f": data}) for seq, data in events(1, 2)]

    anyio.run(main, backend="trio")



def _h(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


async def test_a_batch_is_applied_whole_after_redis_forgot_its_scripts(
    own_redis_server: RedisServer,
) -> None:
    """A batch calls its script by SHA (no SCRIPT EXISTS per batch); a Redis that lost it
    (restarted, SCRIPT FLUSH) answers NOSCRIPT, and the batch is applied again with it."""
    async with open_redis_state(own_redis_server.url) as state, \
            coredis.Redis.from_url(own_redis_server.url) as raw:
        await admit(state, run_record("r1"))
        await raw.script_flush()
        await state.apply(Batch(logs={"r1": events(1, 2)}, open_tools={"r1": {"c": "t"}},
                                finished={"r1": 60.0}))
        record = await state.record("r1")
        assert record is not None and record.ended and record.open_tools == {"c": "t"}
        assert await state.read("r1", 0) == (0, events(1, 2))


async def _script_calls(raw: coredis.Redis[bytes]) -> int:
    stats: Any = await raw.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in ("evalsha", "eval"))


async def test_admissions_at_one_moment_share_one_command_and_a_batch_is_one(
    own_redis_server: RedisServer,
) -> None:
    """Ten runs started together cost Redis one script call, not ten; one at a time, one
    each. A batch of several runs' events, tools, ends and trims is one call too."""
    async with open_redis_state(own_redis_server.url) as state, \
            coredis.Redis.from_url(own_redis_server.url) as raw:
        await admit(state, run_record("warm", user="w"))  # loads both scripts
        await state.apply(Batch(logs={"warm": events(1)}))
        before = await _script_calls(raw)
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(admit, state, run_record(f"r{i}", user=f"u{i}"))
        assert await _script_calls(raw) - before == 1
        for i in range(3):
            await admit(state, run_record(f"s{i}", user=f"v{i}"))
        assert await _script_calls(raw) - before == 4
        await state.apply(Batch(logs={f"r{i}": events(1, 2) for i in range(10)},
                                open_tools={"r1": {"c": "t"}}, acked={"r2": (1, "n1")},
                                finished={f"r{i}": 60.0 for i in range(5)}))
        assert await _script_calls(raw) - before == 5
        assert [(await state.record(f"r{i}")).ended for i in range(10)] == [  # type: ignore[union-attr]
            True] * 5 + [False] * 5
        assert await state.read("r2", 0) == (1, events(2))
