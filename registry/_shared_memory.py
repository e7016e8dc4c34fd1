"""The in-process :class:`~registry._shared.SharedState`: several registries in one process.

One :class:`MemorySharedState` shared by several registries makes them nodes of one service
without a Redis: the contract test suite runs against it and ``RedisSharedState`` alike, and
the multi-node registry tests use it. It follows the Redis implementation's semantics where
the contract leaves room (an append at or below the highest seq ever appended or trimmed is
skipped; a mailbox is pub/sub: a message reaches the mailboxes open when it is sent).

Each method first yields to the scheduler (a checkpoint, like a round trip), then does its
work without awaiting, so that every method is atomic like a Lua script. Set ``unavailable``
to simulate an outage: every method then raises :class:`SharedStateUnavailable`. Expired
entries are purged when next looked up (this is for tests, not for a long-lived service).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final, final

import anyio
import anyio.lowlevel
import attrs
from anyio.streams.memory import MemoryObjectSendStream

from registry._errors import Overloaded, RateLimited
from registry._shared import Batch, RunRecord, SharedStateUnavailable

__all__ = ["MemorySharedState"]

logger = logging.getLogger(__name__)

#: How long a claim on a dead node lasts (its claimer should have forgotten it by then).
CLAIM_TTL_S: Final = 300.0


@attrs.define(eq=False)
class _Run:
    record: RunRecord
    expires_at: float | None = None


@attrs.define(eq=False)
class _Log:
    events: dict[int, bytes] = attrs.field(factory=dict)  # in seq order
    top: int = 0  # the highest seq appended or trimmed through
    trimmed: int = 0
    expires_at: float | None = None


@attrs.frozen
class _Expiring:
    value: str
    expires_at: float | None


@final
@attrs.define(eq=False)
class MemorySharedState:
    """Shared state kept in this process's memory (a :class:`SharedState`).

    Attributes:
        clock: The time in seconds that leases and retention run on (default
            ``anyio.current_time``, so trio's ``MockClock`` drives them).
        unavailable: While True, every method raises :class:`SharedStateUnavailable`.
        mailbox_size: Messages a mailbox holds before further ones are dropped.
        claim_ttl_s: How long a claim on a dead node lasts.
    """

    clock: Callable[[], float] = anyio.current_time
    unavailable: bool = False
    mailbox_size: int = 1024
    claim_ttl_s: float = CLAIM_TTL_S
    _runs: dict[str, _Run] = attrs.field(init=False, factory=dict)
    _logs: dict[str, _Log] = attrs.field(init=False, factory=dict)
    _dedup: dict[tuple[str, str], _Expiring] = attrs.field(init=False, factory=dict)
    _active: set[str] = attrs.field(init=False, factory=set)
    _active_per_user: dict[str, set[str]] = attrs.field(init=False, factory=dict)
    _node_runs: dict[str, set[str]] = attrs.field(init=False, factory=dict)
    _conns: dict[str, dict[str, str]] = attrs.field(init=False, factory=dict)
    _nodes: set[str] = attrs.field(init=False, factory=set)
    _leases: dict[str, float] = attrs.field(init=False, factory=dict)
    _claims: dict[str, _Expiring] = attrs.field(init=False, factory=dict)
    _mailboxes: dict[str, list[MemoryObjectSendStream[bytes]]] = attrs.field(
        init=False, factory=dict
    )
    _wakeups: dict[str, anyio.Event] = attrs.field(init=False, factory=dict)
    _follows: dict[str, dict[str, tuple[int, float]]] = attrs.field(init=False, factory=dict)

    # ------------------------------------------------------------ admission
    async def admit(
        self, record: RunRecord, *, max_active_runs_per_user: int, max_active_runs: int,
        dedup_ttl_s: float,
    ) -> tuple[RunRecord, bool]:
        """See :meth:`SharedState.admit`; a retried admit of the same run_id is not a duplicate."""
        await self._enter()
        key = (record.user_id, record.request_id)
        existing = self._live_dedup(key)
        if existing is not None and (run := self._live_run(existing)) is not None:
            return run.record, run.record.run_id != record.run_id
        user_runs = self._active_per_user.setdefault(record.user_id, set())
        if len(user_runs) >= max_active_runs_per_user:
            raise RateLimited(f"the user already has {max_active_runs_per_user} runs in flight")
        if len(self._active) >= max_active_runs:
            raise Overloaded(f"at max_active_runs ({max_active_runs})")
        self._dedup[key] = _Expiring(record.run_id, self.clock() + dedup_ttl_s)
        user_runs.add(record.run_id)
        self._active.add(record.run_id)
        self._node_runs.setdefault(record.node_id, set()).add(record.run_id)
        self._runs[record.run_id] = _Run(attrs.evolve(record, open_tools=dict(record.open_tools)))
        return record, False

    async def set_open_tools(self, run_id: str, open_tools: Mapping[str, str]) -> None:
        """See :meth:`SharedState.set_open_tools` (a run that is gone is left alone)."""
        await self._enter()
        if (run := self._live_run(run_id)) is not None:
            run.record = attrs.evolve(run.record, open_tools=dict(open_tools))

    async def finish(self, run_id: str, *, retention_s: float) -> None:
        """See :meth:`SharedState.finish`: a second call changes nothing."""
        await self._enter()
        self._finish(run_id, retention_s)

    def _finish(self, run_id: str, retention_s: float) -> None:
        run = self._live_run(run_id)
        if run is None or run.record.ended:
            return
        self._deactivate(run.record)
        expires_at = self.clock() + retention_s
        run.record = attrs.evolve(run.record, ended=True)
        run.expires_at = expires_at
        if (log := self._logs.get(run_id)) is not None:
            log.expires_at = expires_at
        key = (run.record.user_id, run.record.request_id)
        existing = self._live_dedup(key)
        if existing is None or existing == run_id:
            self._dedup[key] = _Expiring(run_id, expires_at)

    async def drop(self, run_id: str) -> None:
        """See :meth:`SharedState.drop`."""
        await self._enter()
        self._forget_run(run_id)

    async def record(self, run_id: str) -> RunRecord | None:
        """See :meth:`SharedState.record`."""
        await self._enter()
        run = self._live_run(run_id)
        return None if run is None else run.record

    # ------------------------------------------------------------ event log
    async def append(self, run_id: str, entries: Sequence[tuple[int, bytes]]) -> None:
        """See :meth:`SharedState.append`: a seq at or below the log's top is skipped."""
        await self._enter()
        self._append(run_id, entries)

    def _append(self, run_id: str, entries: Sequence[tuple[int, bytes]]) -> None:
        log = self._live_log(run_id)
        if log is None:
            log = self._logs[run_id] = _Log()
        for seq, data in entries:
            if seq > log.top:
                log.events[seq] = data
                log.top = seq
        if entries and (wakeup := self._wakeups.pop(run_id, None)) is not None:
            wakeup.set()

    async def append_many(
        self, logs: Mapping[str, Sequence[tuple[int, bytes]]],
        open_tools: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """See :meth:`SharedState.append_many`: one step, like one Redis transaction."""
        await self.apply(Batch(logs=logs, open_tools=open_tools or {}))

    async def apply(self, batch: Batch) -> None:
        """See :meth:`SharedState.apply`: one step, like one Redis transaction."""
        await self._enter()
        for run_id, entries in batch.logs.items():
            self._append(run_id, entries)
        for run_id, tools in batch.open_tools.items():
            if (run := self._live_run(run_id)) is not None:
                run.record = attrs.evolve(run.record, open_tools=dict(tools))
        for run_id, (seq, node_id) in batch.acked.items():
            spared = [t for n, t in self._followers(run_id).items() if n != node_id]
            self._trim(run_id, min([seq, *spared]))
        for run_id, retention_s in batch.finished.items():
            self._finish(run_id, retention_s)
        for user_id, conn_id in batch.disconnected:
            self._disconnect(user_id, conn_id)
        for run_id in batch.dropped:
            self._forget_run(run_id)

    async def read(self, run_id: str, after_seq: int) -> tuple[int, list[tuple[int, bytes]]]:
        """See :meth:`SharedState.read`."""
        await self._enter()
        log = self._live_log(run_id)
        return (0 if log is None else log.trimmed), self._after(log, after_seq)

    async def tail(
        self, run_id: str, after_seq: int, wait_s: float
    ) -> list[tuple[int, bytes]]:
        """See :meth:`SharedState.tail`. Cancel-safe."""
        await self._enter()
        with anyio.move_on_after(wait_s):
            while not (events := self._after(self._live_log(run_id), after_seq)):
                wakeup = self._wakeups.setdefault(run_id, anyio.Event())
                await wakeup.wait()
                self._check()
            return events
        return []

    async def trim(self, run_id: str, through_seq: int) -> None:
        """See :meth:`SharedState.trim`: a later append at or below ``through_seq`` is skipped."""
        await self._enter()
        self._trim(run_id, through_seq)

    def _trim(self, run_id: str, through_seq: int) -> None:
        run = self._live_run(run_id)
        if run is None:
            return
        log = self._live_log(run_id)
        if log is None:
            log = self._logs[run_id] = _Log(expires_at=run.expires_at)
        if through_seq <= log.trimmed:
            return
        log.trimmed = through_seq
        log.top = max(log.top, through_seq)
        for seq in [seq for seq in log.events if seq <= through_seq]:
            del log.events[seq]

    # ---------------------------------------------------------- connections
    async def connect(self, user_id: str, conn_id: str, node_id: str, limit: int) -> bool:
        """See :meth:`SharedState.connect`: a conn_id already counted is True again."""
        await self._enter()
        conns = self._conns.setdefault(user_id, {})
        if conn_id in conns:
            return True
        if len(conns) >= limit:
            return False
        conns[conn_id] = node_id
        return True

    async def disconnect(self, user_id: str, conn_id: str) -> None:
        """See :meth:`SharedState.disconnect`."""
        await self._enter()
        self._disconnect(user_id, conn_id)

    def _disconnect(self, user_id: str, conn_id: str) -> None:
        conns = self._conns.get(user_id, {})
        conns.pop(conn_id, None)
        if not conns:
            self._conns.pop(user_id, None)

    # ---------------------------------------------------------------- nodes
    async def heartbeat(self, node_id: str, lease_s: float) -> bool:
        """See :meth:`SharedState.heartbeat`."""
        await self._enter()
        self._leases[node_id] = self.clock() + lease_s
        known = node_id in self._nodes
        self._nodes.add(node_id)
        return known

    async def restore(
        self, record: RunRecord, entries: Sequence[tuple[int, bytes]], *, trimmed: int,
        dedup_ttl_s: float, retention_s: float,
    ) -> bool:
        """See :meth:`SharedState.restore`."""
        await self._enter()
        if self._live_run(record.run_id) is not None:
            return False
        expires_at = self.clock() + retention_s if record.ended else None
        self._runs[record.run_id] = _Run(attrs.evolve(record, open_tools=dict(record.open_tools)),
                                         expires_at)
        log = self._logs[record.run_id] = _Log(trimmed=trimmed, top=trimmed,
                                               expires_at=expires_at)
        for seq, data in entries:
            log.events[seq] = data
            log.top = seq
        self._index(record, retention_s if record.ended else dedup_ttl_s)
        if (wakeup := self._wakeups.pop(record.run_id, None)) is not None:
            wakeup.set()
        return True

    def _index(self, record: RunRecord, dedup_ttl_s: float) -> None:
        """A restored run's dedup key (unless taken) and, active, its slots."""
        key = (record.user_id, record.request_id)
        if self._live_dedup(key) is None:
            self._dedup[key] = _Expiring(record.run_id, self.clock() + dedup_ttl_s)
        if not record.ended:
            self._active.add(record.run_id)
            self._active_per_user.setdefault(record.user_id, set()).add(record.run_id)
            self._node_runs.setdefault(record.node_id, set()).add(record.run_id)

    def flush(self) -> None:
        """Forgets everything, as a Redis restarted without persistence does (for tests)."""
        for name in ("_runs", "_logs", "_dedup", "_active_per_user", "_node_runs", "_conns",
                     "_leases", "_claims", "_follows"):
            getattr(self, name).clear()
        self._active.clear()
        self._nodes.clear()

    async def dead_nodes(self) -> list[str]:
        """See :meth:`SharedState.dead_nodes` (sorted)."""
        await self._enter()
        return sorted(node for node in self._nodes if self._is_dead(node))

    async def claim(self, node_id: str, by: str) -> bool:
        """See :meth:`SharedState.claim`: False while the node's lease runs; True again for
        the node that holds the claim."""
        await self._enter()
        if self._lease_alive(node_id):
            return False
        claim = self._live_claim(node_id)
        if claim is not None:
            return claim.value == by
        self._claims[node_id] = _Expiring(by, self.clock() + self.claim_ttl_s)
        return True

    async def node_runs(self, node_id: str) -> list[str]:
        """See :meth:`SharedState.node_runs` (sorted)."""
        await self._enter()
        return sorted(self._node_runs.get(node_id, ()))

    async def forget_node(self, node_id: str) -> None:
        """See :meth:`SharedState.forget_node`; its claim goes too (it may die again later)."""
        await self._enter()
        for user_id, conns in list(self._conns.items()):
            for conn_id in [conn for conn, node in conns.items() if node == node_id]:
                del conns[conn_id]
            if not conns:
                del self._conns[user_id]
        self._node_runs.pop(node_id, None)
        self._claims.pop(node_id, None)
        self._nodes.discard(node_id)
        if not self._lease_alive(node_id):
            self._leases.pop(node_id, None)

    # ------------------------------------------------------------- mailbox
    async def send(self, node_id: str, message: bytes) -> None:
        """See :meth:`SharedState.send`: reaches the mailboxes open now; a full one drops it."""
        await self._enter()
        for stream in self._mailboxes.get(node_id, ()):
            try:
                stream.send_nowait(message)
            except anyio.WouldBlock:
                logger.warning("mailbox of node %s is full: a message was dropped", node_id)
            except anyio.BrokenResourceError:
                pass

    def mailbox(self, node_id: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """See :meth:`SharedState.mailbox`."""
        return self._open_mailbox(node_id)

    @asynccontextmanager
    async def _open_mailbox(self, node_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        await self._enter()
        send, receive = anyio.create_memory_object_stream[bytes](self.mailbox_size)
        streams = self._mailboxes.setdefault(node_id, [])
        streams.append(send)
        try:
            async with receive:
                yield receive
        finally:
            streams.remove(send)
            send.close()
            if not streams:
                self._mailboxes.pop(node_id, None)

    async def ping(self) -> None:
        """See :meth:`SharedState.ping`."""
        await self._enter()

    async def follow(self, run_id: str, node_id: str, ttl_s: float, through: int) -> None:
        """See :meth:`SharedState.follow`."""
        await self._enter()
        self._follows.setdefault(run_id, {})[node_id] = (through, self.clock() + ttl_s)

    async def followers(self, run_id: str) -> dict[str, int]:
        """See :meth:`SharedState.followers`."""
        await self._enter()
        return self._followers(run_id)

    def _followers(self, run_id: str) -> dict[str, int]:
        now = self.clock()
        return {node: through for node, (through, until) in self._follows.get(run_id, {}).items()
                if until > now}

    # ------------------------------------------------------------- internals
    async def _enter(self) -> None:
        await anyio.lowlevel.checkpoint()
        self._check()

    def _check(self) -> None:
        if self.unavailable:
            raise SharedStateUnavailable("the in-memory shared state is marked unavailable")

    def _expired(self, expires_at: float | None) -> bool:
        return expires_at is not None and self.clock() >= expires_at

    def _live_run(self, run_id: str) -> _Run | None:
        run = self._runs.get(run_id)
        if run is not None and self._expired(run.expires_at):
            del self._runs[run_id]
            return None
        return run

    def _live_log(self, run_id: str) -> _Log | None:
        log = self._logs.get(run_id)
        if log is not None and self._expired(log.expires_at):
            del self._logs[run_id]
            return None
        return log

    def _live_dedup(self, key: tuple[str, str]) -> str | None:
        entry = self._dedup.get(key)
        if entry is not None and self._expired(entry.expires_at):
            del self._dedup[key]
            return None
        return None if entry is None else entry.value

    def _live_claim(self, node_id: str) -> _Expiring | None:
        claim = self._claims.get(node_id)
        if claim is not None and self._expired(claim.expires_at):
            del self._claims[node_id]
            return None
        return claim

    def _lease_alive(self, node_id: str) -> bool:
        return not self._expired(self._leases.get(node_id, float("-inf")))

    def _is_dead(self, node_id: str) -> bool:
        return not self._lease_alive(node_id) and self._live_claim(node_id) is None

    def _deactivate(self, record: RunRecord) -> None:
        self._active.discard(record.run_id)
        user_runs = self._active_per_user.get(record.user_id, set())
        user_runs.discard(record.run_id)
        if not user_runs:
            self._active_per_user.pop(record.user_id, None)
        self._node_runs.get(record.node_id, set()).discard(record.run_id)

    def _forget_run(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        self._logs.pop(run_id, None)
        if run is None:
            return
        self._deactivate(run.record)
        key = (run.record.user_id, run.record.request_id)
        if self._live_dedup(key) == run_id:
            del self._dedup[key]

    @staticmethod
    def _after(log: _Log | None, after_seq: int) -> list[tuple[int, bytes]]:
        if log is None:
            return []
        return [(seq, data) for seq, data in log.events.items() if seq > after_seq]
