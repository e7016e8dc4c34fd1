"""Several registries ("nodes") of one service in one trio run, and sockets to drive them.

Every node gets its own :class:`Link` to one :class:`MemorySharedState`: a pass-through that
can add a round-trip time to each call (like a real Redis), hold a node's ``tail`` calls (a
slow link), or *freeze* (the node's process is gone: nothing it does reaches the shared state
any more, and nothing it asked there ever answers).

There is no in-process way to stop a registry without its graceful exit: ``open_registry``
always runs ``aclose_runs`` and ``leave_cluster`` in a shielded ``finally``. So
:meth:`Node.crash` freezes the link first and then lets the node exit: whatever the registry
does on its way out stays local, and for the other nodes it died without a shutdown.

Nodes are never stopped by cancellation, only by asking (each serves in a shielded scope):
a registry whose block is cancelled busy-waits in ``drain_outbox`` (see test_cluster), which
under an autojump clock never ends. A failing test must fail, not hang.

A :class:`Socket` is an :class:`~registry.OutboundQueue` as a transport would drive it: it
wakes on ``on_ready`` and decodes what ``take`` gives.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, final

import attrs
import trio

from registry import AgentContext, AgentExecutionRegistry, OutboundQueue, open_registry
from registry._shared import Batch, RunRecord, SharedStateUnavailable
from registry._shared_memory import MemorySharedState
from registry._util import unwrapping_groups
from tests.registry._support import USER, chatty, config, echo, hang, in_tool, make_agents

#: Bound (mock seconds) of every wait for frames; far above what any scenario needs.
WAIT_S: Final = 120.0
#: Seconds between a ticker's events.
TICK_S: Final = 1.0


async def ticker(ctx: AgentContext) -> Any:
    """agent_started, agent_thinking, then ``ticks`` (option, default 5) partial results
    ``TICK_S`` apart, then agent_completed: 3 + ticks events, live for ticks seconds."""
    await ctx.think("counting")
    for i in range(int(ctx.options.get("ticks", 5))):
        await ctx.sleep(TICK_S)
        await ctx.partial(str(i))
    return "done"


async def flood(ctx: AgentContext) -> Any:
    """``count`` (option, default 400) partial results of 8 KiB, a millisecond apart."""
    for _ in range(int(ctx.options.get("count", 400))):
        await ctx.partial("x" * 8192)
        await ctx.sleep(0.001)
    return "flooded"


AGENTS: Final = {"echo": echo, "chatty": chatty, "hang": hang, "in_tool": in_tool,
                 "ticker": ticker, "flood": flood}


# ====================================================================== the link
@final
@attrs.define(eq=False)
class Link:
    """One node's connection to the shared state (a :class:`~registry._shared.SharedState`).

    Attributes:
        target: The state every node shares.
        rtt: Mock seconds each call takes before it reaches ``target``.
        frozen: Every call from now on blocks forever (the node is gone).
        tail_gate: While set and not yet set()/released, ``tail`` calls wait for it first.
        lose_admit_replies: An ``admit`` is done in the store, but its answer never comes
            back: the node sees SharedStateUnavailable (a timeout).
        hang_after_admit: An ``admit`` is done in the store, and its answer takes forever.
    """

    target: MemorySharedState
    rtt: float = 0.0
    frozen: bool = False
    tail_gate: trio.Event | None = None
    lose_admit_replies: bool = False
    hang_after_admit: bool = False

    async def _enter(self) -> None:
        if self.frozen:
            await trio.sleep_forever()
        if self.rtt:
            await trio.sleep(self.rtt)
        if self.frozen:  # died while the request was on its way
            await trio.sleep_forever()

    async def admit(
        self, record: RunRecord, *, max_active_runs_per_user: int, max_active_runs: int,
        dedup_ttl_s: float,
    ) -> tuple[RunRecord, bool]:
        await self._enter()
        answer = await self.target.admit(
            record, max_active_runs_per_user=max_active_runs_per_user,
            max_active_runs=max_active_runs, dedup_ttl_s=dedup_ttl_s)
        if self.lose_admit_replies:
            raise SharedStateUnavailable("the admit timed out (it was done in the store)")
        if self.hang_after_admit:
            await trio.sleep_forever()
        return answer

    async def set_open_tools(self, run_id: str, open_tools: Mapping[str, str]) -> None:
        await self._enter()
        await self.target.set_open_tools(run_id, open_tools)

    async def finish(self, run_id: str, *, retention_s: float) -> None:
        await self._enter()
        await self.target.finish(run_id, retention_s=retention_s)

    async def drop(self, run_id: str) -> None:
        await self._enter()
        await self.target.drop(run_id)

    async def record(self, run_id: str) -> RunRecord | None:
        await self._enter()
        return await self.target.record(run_id)

    async def append(self, run_id: str, entries: Sequence[tuple[int, bytes]]) -> None:
        await self._enter()
        await self.target.append(run_id, entries)

    async def append_many(
        self, logs: Mapping[str, Sequence[tuple[int, bytes]]],
        open_tools: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        await self._enter()
        await self.target.append_many(logs, open_tools)

    async def apply(self, batch: Batch) -> None:
        await self._enter()
        await self.target.apply(batch)

    async def read(self, run_id: str, after_seq: int) -> tuple[int, list[tuple[int, bytes]]]:
        await self._enter()
        return await self.target.read(run_id, after_seq)

    async def tail(
        self, run_id: str, after_seq: int, wait_s: float
    ) -> list[tuple[int, bytes]]:
        if self.tail_gate is not None:
            await self.tail_gate.wait()
        await self._enter()
        return await self.target.tail(run_id, after_seq, wait_s)

    async def trim(self, run_id: str, through_seq: int) -> None:
        await self._enter()
        await self.target.trim(run_id, through_seq)

    async def follow(self, run_id: str, node_id: str, ttl_s: float, through: int) -> None:
        await self._enter()
        await self.target.follow(run_id, node_id, ttl_s, through)

    async def followers(self, run_id: str) -> dict[str, int]:
        await self._enter()
        return await self.target.followers(run_id)

    async def connect(self, user_id: str, conn_id: str, node_id: str, limit: int) -> bool:
        await self._enter()
        return await self.target.connect(user_id, conn_id, node_id, limit)

    async def disconnect(self, user_id: str, conn_id: str) -> None:
        await self._enter()
        await self.target.disconnect(user_id, conn_id)

    async def heartbeat(self, node_id: str, lease_s: float) -> bool:
        await self._enter()
        return await self.target.heartbeat(node_id, lease_s)

    async def restore(
        self, record: RunRecord, entries: Sequence[tuple[int, bytes]], *, trimmed: int,
        dedup_ttl_s: float, retention_s: float,
    ) -> bool:
        await self._enter()
        return await self.target.restore(record, entries, trimmed=trimmed,
                                         dedup_ttl_s=dedup_ttl_s, retention_s=retention_s)

    async def dead_nodes(self) -> list[str]:
        await self._enter()
        return await self.target.dead_nodes()

    async def claim(self, node_id: str, by: str) -> bool:
        await self._enter()
        return await self.target.claim(node_id, by)

    async def node_runs(self, node_id: str) -> list[str]:
        await self._enter()
        return await self.target.node_runs(node_id)

    async def forget_node(self, node_id: str) -> None:
        await self._enter()
        await self.target.forget_node(node_id)

    async def send(self, node_id: str, message: bytes) -> None:
        await self._enter()
        await self.target.send(node_id, message)

    def mailbox(self, node_id: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._mailbox(node_id)

    @asynccontextmanager
    async def _mailbox(self, node_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        await self._enter()
        async with self.target.mailbox(node_id) as messages:
            yield messages

    async def ping(self) -> None:
        await self._enter()
        await self.target.ping()


# ===================================================================== the nodes
@final
@attrs.define(eq=False)
class Node:
    """One registry of the service, served by a task of the cluster's nursery."""

    name: str
    link: Link
    settings: Mapping[str, Any]
    _reg: AgentExecutionRegistry | None = None
    _stop: trio.Event = attrs.Factory(trio.Event)
    exited: trio.Event = attrs.Factory(trio.Event)

    @property
    def reg(self) -> AgentExecutionRegistry:
        assert self._reg is not None, f"node {self.name} is not open"
        return self._reg

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        try:
            with trio.CancelScope(shield=True):
                async with open_registry(config(**self.settings),
                                         agents=make_agents(**AGENTS), shared=self.link) as reg:
                    self._reg = reg
                    task_status.started()
                    await self._stop.wait()
        finally:
            self.exited.set()

    async def stop(self) -> None:
        """A graceful exit (SIGTERM): the registry's own shutdown, then it leaves."""
        self._stop.set()
        await self.exited.wait()

    async def crash(self) -> None:
        """Dies without a shutdown: from now on nothing it does reaches the shared state
        (its local exit, bounded by ``shutdown_grace_s``, is seen by nobody)."""
        self.link.frozen = True
        await self.stop()


@final
@attrs.define(eq=False)
class Cluster:
    """The shared state and the nodes sharing it (``cluster["A"]``)."""

    shared: MemorySharedState
    nodes: dict[str, Node]

    def __getitem__(self, name: str) -> AgentExecutionRegistry:
        return self.nodes[name].reg


@asynccontextmanager
async def open_cluster(
    names: str = "ABC", *, rtt: float = 0.0, shared: MemorySharedState | None = None,
    **settings: Any,
) -> AsyncIterator[Cluster]:
    """Opens one node per letter of ``names``, all on one shared state, with ``settings``.

    On exit each node still running stops gracefully.
    """
    cluster = Cluster(shared if shared is not None else MemorySharedState(), {})
    async with unwrapping_groups(), trio.open_nursery() as nursery:
        for name in names:
            node = Node(name, Link(cluster.shared, rtt), settings)
            await nursery.start(node.serve)
            cluster.nodes[name] = node
        try:
            yield cluster
        finally:
            for node in cluster.nodes.values():
                node._stop.set()  # the nursery waits for each to exit


# ==================================================================== the socket
@final
class Socket:
    """A user's socket on one node: an OutboundQueue drained into decoded frames."""

    def __init__(self, reg: AgentExecutionRegistry, user: str = USER, *,
                 max_messages: int = 1000, max_bytes: int = 8 << 20) -> None:
        self.reg = reg
        self.queue = OutboundQueue(user, max_messages=max_messages, max_bytes=max_bytes,
                                   on_ready=self._wake)
        self.frames: list[dict[str, Any]] = []
        self._ready = trio.Event()

    @property
    def user(self) -> str:
        return self.queue.user_id

    def _wake(self) -> None:
        self._ready.set()

    async def connect(self) -> Socket:
        await self.reg.on_connect(self.queue)
        return self

    async def disconnect(self) -> None:
        """Closes the socket; returns once the other nodes no longer count it."""
        self.reg.on_disconnect(self.queue)
        await self.reg.shared_written()

    async def start(self, agent: str, request_id: str = "req-1", **kw: Any) -> str:
        """``start_agent`` from this socket (it follows the new run); the run_id."""
        ids, _ = await self.reg.on_start_agent(
            user_id=self.user, request_id=request_id, agent=agent, message="hello",
            subscriber=self.queue, **kw)
        return ids.run_id

    async def resume(self, run_id: str, after_seq: int = 0) -> None:
        await self.reg.on_resume(run_id, self.user, after_seq, self.queue)

    def drain(self) -> None:
        """Takes every frame the queue has now, as a transport writing them would."""
        while self.queue.has_frames():
            frames, _ = self.queue.take(1 << 16)
            self.frames.extend(json.loads(frame) for frame in frames)

    def events(self, run_id: str) -> list[dict[str, Any]]:
        """The events of ``run_id`` this socket got, in order."""
        self.drain()
        return [f for f in self.frames if f.get("run_id") == run_id and "seq" in f]

    def seqs(self, run_id: str) -> list[int]:
        return [f["seq"] for f in self.events(run_id)]

    async def wait_until(self, done: Callable[[], bool], timeout: float = WAIT_S) -> None:
        """Blocks (at most ``timeout`` mock seconds) until ``done()`` after draining."""
        with trio.fail_after(timeout):
            while True:
                self.drain()
                if done():
                    return
                self._ready = trio.Event()
                if not self.queue.has_frames():
                    await self._ready.wait()

    async def until_seq(self, run_id: str, seq: int) -> list[dict[str, Any]]:
        """The run's events once this socket got one numbered ``seq`` or more."""
        await self.wait_until(lambda: any(e["seq"] >= seq for e in self.events(run_id)))
        return self.events(run_id)

    async def until_completed(self, run_id: str, timeout: float = WAIT_S
                              ) -> list[dict[str, Any]]:
        """The run's events once this socket got its ``agent_completed``."""
        def completed() -> bool:
            return any(e["type"] == "agent_completed" for e in self.events(run_id))

        await self.wait_until(completed, timeout)
        return self.events(run_id)
