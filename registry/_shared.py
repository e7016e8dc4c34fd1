"""State that several server processes (nodes) share: the narrow interface, and what it holds.

Without ``redis_url`` a registry keeps everything in its own memory and uses none of this.
With it, each node still runs its runs and drives its sockets from local state, and
mirrors into a :class:`SharedState` what the other nodes need:

* **admission**: the dedup table of (user, request_id) and the active-run counters, checked
  and updated in one atomic step, so limits and dedup hold across nodes;
* **the event log** of each run, appended by the node that runs it in seq order (an append
  of a seq already there is a no-op), read and tailed by nodes whose sockets resume it,
  trimmed by acks and bounds, expired ``retention_s`` after the run ended;
* **connections** per user, counted across nodes;
* **nodes**: leases that say a node is alive, the runs each node owns, a claim that lets
  exactly one survivor end a dead node's runs, and a mailbox per node (a cancel is
  routed to the node that runs the run).

Two implementations share one contract test suite: :class:`MemorySharedState` (several
registries in one process, for tests) and ``RedisSharedState`` (``registry/_redis.py``).
Every method may raise :class:`SharedStateUnavailable` when the store cannot be reached.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, final

import attrs

__all__ = ["Batch", "RunRecord", "SharedState", "SharedStateUnavailable"]


class SharedStateUnavailable(Exception):
    """The shared store cannot be reached now (the node degrades; it retries later)."""


@final
@attrs.frozen(kw_only=True)
class RunRecord:
    """What every node knows of a run.

    Attributes:
        run_id, user_id, request_id, thread_id, agent: As the run was started.
        node_id: The node that runs it (and owns its cancel scope).
        ended: Whether its terminal event has been appended.
        open_tools: Tool calls opened and not yet completed (call_id -> tool), kept by the
            owner so that a survivor can close them if the owner dies.
    """

    run_id: str
    user_id: str
    request_id: str
    thread_id: str
    agent: str
    node_id: str
    ended: bool = False
    open_tools: Mapping[str, str] = attrs.field(factory=dict)


@final
@attrs.frozen(kw_only=True)
class Batch:
    """What a node writes in one step, applied in this order (a run's events before its end).

    Attributes:
        logs: Events to append per run: (seq, wire bytes), in seq order.
        open_tools: The runs' open tool calls now (call_id -> tool).
        acked: Runs acknowledged: run_id -> (seq, node_id). The run's log is trimmed through
            ``seq``, but never past what sockets on another node than ``node_id`` still need
            (their :meth:`SharedState.follow` word, if not expired), as :meth:`trim` does.
        finished: Runs that ended, with their ``retention_s``.
        disconnected: Connections (user_id, conn_id) that closed.
        dropped: Runs to forget at once (an admission whose answer was lost).
    """

    logs: Mapping[str, Sequence[tuple[int, bytes]]] = attrs.field(factory=dict)
    open_tools: Mapping[str, Mapping[str, str]] = attrs.field(factory=dict)
    acked: Mapping[str, tuple[int, str]] = attrs.field(factory=dict)
    finished: Mapping[str, float] = attrs.field(factory=dict)
    disconnected: Sequence[tuple[str, str]] = ()
    dropped: Sequence[str] = ()

    @property
    def empty(self) -> bool:
        return not (any(self.logs.values()) or self.open_tools or self.acked or self.finished
                    or self.disconnected or self.dropped)


class SharedState(Protocol):
    """The narrow interface a registry uses to be one node of a service."""

    # ------------------------------------------------------------ admission
    async def admit(
        self, record: RunRecord, *, max_active_runs_per_user: int, max_active_runs: int,
        dedup_ttl_s: float,
    ) -> tuple[RunRecord, bool]:
        """Registers ``record`` as an active run, or finds the run of its (user, request_id).

        Atomic across nodes: the dedup check, both limits and the registration are one step.

        Returns:
            The run registered for (user, request_id), and whether it already existed
            (a duplicate: nothing was changed).

        Raises:
            RateLimited: the user has ``max_active_runs_per_user`` active runs (all nodes).
            Overloaded: the service has ``max_active_runs`` active runs.
        """
        ...

    async def set_open_tools(self, run_id: str, open_tools: Mapping[str, str]) -> None:
        """Records the run's open tool calls (the owner calls it when they change)."""
        ...

    async def finish(self, run_id: str, *, retention_s: float) -> None:
        """The run has ended (its terminal event appended): frees its active slot; its log,
        record and dedup key expire ``retention_s`` from now. Idempotent."""
        ...

    async def drop(self, run_id: str) -> None:
        """Forgets an ended run at once (a retention bound): record, log and dedup key."""
        ...

    async def record(self, run_id: str) -> RunRecord | None:
        """The run's record, or None when it does not exist or is no longer retained."""
        ...

    # ------------------------------------------------------------ event log
    async def append(self, run_id: str, entries: Sequence[tuple[int, bytes]]) -> None:
        """Appends events (seq, wire bytes) in seq order; a seq already there is skipped."""
        ...

    async def append_many(
        self, logs: Mapping[str, Sequence[tuple[int, bytes]]],
        open_tools: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """:meth:`append` for several runs, and :meth:`set_open_tools` for several runs, in
        one atomic step: no reader ever sees a ``tool_executing`` whose open tool is not
        recorded yet (a survivor would end the run without closing the tool)."""
        ...

    async def apply(self, batch: Batch) -> None:
        """Writes a node's :class:`Batch` in one atomic step (one round trip for Redis):
        :meth:`append_many`, then the acked trims, then :meth:`finish`, :meth:`disconnect`
        and :meth:`drop` of each. Safe to apply twice."""
        ...

    async def read(self, run_id: str, after_seq: int) -> tuple[int, list[tuple[int, bytes]]]:
        """Every retained event with seq > ``after_seq``.

        Returns:
            ``trimmed_through`` (the highest seq no longer retained, 0 if none) and the
            events, in order.
        """
        ...

    async def tail(
        self, run_id: str, after_seq: int, wait_s: float
    ) -> list[tuple[int, bytes]]:
        """Events with seq > ``after_seq``, waiting up to ``wait_s`` for the first one."""
        ...

    async def trim(self, run_id: str, through_seq: int) -> None:
        """Drops retained events with seq <= ``through_seq`` (acks, retention bounds)."""
        ...

    async def follow(self, run_id: str, node_id: str, ttl_s: float, through: int) -> None:
        """Says sockets on ``node_id`` follow the run for the next ``ttl_s`` seconds, and
        have been sent every event up to ``through`` (so the node that runs it does not end
        it as detached, and an ack elsewhere does not trim what they still need)."""
        ...

    async def followers(self, run_id: str) -> dict[str, int]:
        """The nodes whose sockets follow the run (not expired): node_id -> ``through``."""
        ...

    # ---------------------------------------------------------- connections
    async def connect(self, user_id: str, conn_id: str, node_id: str, limit: int) -> bool:
        """Counts a connection of ``user_id`` across nodes; False when at ``limit``."""
        ...

    async def disconnect(self, user_id: str, conn_id: str) -> None:
        """Forgets a connection (idempotent)."""
        ...

    # ---------------------------------------------------------------- nodes
    async def heartbeat(self, node_id: str, lease_s: float) -> bool:
        """Says ``node_id`` is alive for the next ``lease_s`` seconds.

        Returns:
            Whether the store knew the node already: False at its first beat, and after the
            store lost its data (a Redis restarted empty), when the node must
            :meth:`restore` its runs.
        """
        ...

    async def restore(
        self, record: RunRecord, entries: Sequence[tuple[int, bytes]], *, trimmed: int,
        dedup_ttl_s: float, retention_s: float,
    ) -> bool:
        """Writes again a run the store lost, from its node's copy: the record, the retained
        log (``entries`` after ``trimmed``), its dedup key (unless taken), and its active slot
        (or, ended, its expiry ``retention_s`` from now). A run the store has is left alone.

        Returns:
            Whether the run was written.
        """
        ...

    async def dead_nodes(self) -> list[str]:
        """Nodes whose lease ran out and whose runs have not been claimed yet."""
        ...

    async def claim(self, node_id: str, by: str) -> bool:
        """Takes over a dead node's leftovers; True for exactly one caller."""
        ...

    async def node_runs(self, node_id: str) -> list[str]:
        """The active runs ``node_id`` owns."""
        ...

    async def forget_node(self, node_id: str) -> None:
        """Removes a (claimed, cleaned-up) node: its connections and its run set."""
        ...

    # ------------------------------------------------------------- mailbox
    async def send(self, node_id: str, message: bytes) -> None:
        """Delivers ``message`` to ``node_id``'s mailbox (at most once, best effort)."""
        ...

    def mailbox(self, node_id: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Opens ``node_id``'s mailbox: an iterator of the messages sent to it."""
        ...

    async def ping(self) -> None:
        """Checks that the store answers (raises SharedStateUnavailable otherwise)."""
        ...
