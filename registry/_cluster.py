"""One node of a service: replication, leases, takeover of dead nodes, mirrors, the mailbox.

A mixin of :class:`~registry.AgentExecutionRegistry`, active only with a shared state
(``redis_url``). The node that runs a run records its events locally, then an outbox and
one replicator task write them to the shared state in order. A socket here that resumes a
run of another node follows a *mirror*: a local :class:`~registry.Run` whose stream a tail
task fills from the shared log, so the sockets' path is the same for every run. Each node
holds a lease; when one lapses, exactly one survivor claims the dead node and ends each of
its runs after the last event recorded: every open tool ``error``, then ``agent_completed``
``failed`` with ``error`` ``node_lost``.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc

from registry._events import encode_event, envelope_prefix
from registry._lifecycle import Trigger
from registry._outbound import CLOSE_OVERFLOW, OutboundQueue
from registry._outbox import Append, Disconnect, Finish, Operation, Outbox, Tools, Trim
from registry._payloads import AgentCompleted, ToolCompleted
from registry._run import Run
from registry._shared import Batch, RunRecord, SharedState, SharedStateUnavailable
from registry._stream import RunStream, StreamError
from registry._vocabulary import EventType

if TYPE_CHECKING:
    from registry._config import Config
    from registry._delivery import Delivery
    from registry._events import Event
    from registry._manager import Connection, WebSocketManager
    from registry._retention import Retention
    from registry._table import RunTable

__all__ = ["ClusterAPI", "closing_frames", "dedup_ttl_s"]

log = logging.getLogger("registry.cluster")

#: The error of a run whose node died, as the contract names it.
NODE_LOST: Final = "node_lost"
#: How long one tail waits for events before it asks again.
_TAIL_WAIT_S: Final = 5.0
#: The shortest life of a "sockets here follow the run" record (renewed every third of
#: ``detached_run_timeout_s``): with a timeout of a second, a loaded node's renewal that
#: comes a little late would otherwise let the run's node end a run that is still followed.
_FOLLOW_TTL_MIN_S: Final = 2.0
_RETRY_S: Final = (0.05, 2.0)  # first and longest pause before retrying the shared state
#: A lease lasts this share of node_lease_s, so that a survivor that checks every eighth
#: of it ends a dead node's runs within node_lease_s.
_LEASE_SHARE: Final = 0.5


def dedup_ttl_s(config: Config) -> float:
    """How long a shared dedup key of an active run lives: past any run's end (which then
    sets it to ``retention_s``), so it outlives the run even if its node dies."""
    return config.agent_timeout_s + config.retention_s + 60


def closing_frames(record: RunRecord, last_seq: int, ts: float) -> list[tuple[int, bytes]]:
    """The events that end a dead node's run after its ``last_seq``: open tools, then the end."""
    prefix = envelope_prefix(record.run_id, record.thread_id)
    payloads: list[tuple[EventType, Mapping[str, Any]]] = [
        (EventType.TOOL_COMPLETED, ToolCompleted(
            tool, call_id, "error", error="the node running the run was lost").to_dict())
        for call_id, tool in record.open_tools.items()]
    payloads.append((EventType.AGENT_COMPLETED, AgentCompleted("failed", error=NODE_LOST)
                     .to_dict()))
    return [(last_seq + i, encode_event(prefix, kind, last_seq + i, ts, payload))
            for i, (kind, payload) in enumerate(payloads, start=1)]


class ClusterAPI(abc.ABC):
    """Replication, leases, takeover, mirrors and the mailbox of one node."""

    config: Config
    manager: WebSocketManager
    node_id: str
    _shared: SharedState | None
    _table: RunTable
    _delivery: Delivery
    _retention: Retention
    _tg: anyio.abc.TaskGroup

    @abc.abstractmethod
    def cancel(self, run_id: str, user_id: str) -> bool: ...

    disconnect: Callable[[Connection], None]

    @abc.abstractmethod
    def _end(self, run: Run, trigger: Trigger, payload: Mapping[str, Any] | None = None, *,
             from_inside: bool = False) -> bool: ...

    def _init_cluster(self, shared: SharedState | None) -> None:
        self._shared = shared
        budget = max(int(self.config.max_retained_mib * 1024 * 1024) // 4, 1 << 20)
        self._outbox = Outbox(max_operations=100_000, max_bytes=budget)
        self._outbox_filled = anyio.Event()
        self._progress = anyio.Event()  # set (and replaced) after each batch written
        self._write_lock = anyio.Lock()  # batches are written one at a time, in order
        self._pushed = self._written = 0  # operations ever queued / written
        self._unreachable_since: float | None = None
        self._trusted_since = anyio.current_time()
        self._mirror_moved: dict[str, anyio.Event] = {}
        self._beaten = False  # the shared state has heard from this node
        self._lost_state = False  # it lost this node's runs: write them again

    @property
    def shared_reachable(self) -> bool:
        """False while the shared state cannot be reached (readiness is degraded)."""
        return self._unreachable_since is None

    def _unreachable(self) -> None:
        if self._unreachable_since is None:
            log.warning("shared state unreachable: degraded until it answers again")
            self._unreachable_since = anyio.current_time()

    async def start_cluster(self) -> None:
        """Starts the replicator, the heartbeat, the takeover watch and the mailbox."""
        if self._shared is None:
            return
        for service in (self._replicator, self._heartbeat, self._takeover, self._mailbox):
            await self._tg.start(service)

    # ========================================================== replication
    def _owe(self, operation: Operation) -> bool:
        """Queues an operation for the shared state; False once the outbox is past its bound."""
        self._pushed += 1
        self._outbox_filled.set()
        return self._outbox.push(operation)

    def _replicate(self, run: Run, events: list[Event]) -> int:
        """Queues a local run's new events (tool changes, its end) for the shared state.

        Returns:
            The number of the last operation queued (0 without a shared state).
        """
        if self._shared is None or run._mirror:
            return 0
        fits = self._owe(Append(run.run_id, tuple(
            (e.seq, run.stream.frame(e.seq)) for e in events)))
        if any(e.type in (EventType.TOOL_EXECUTING, EventType.TOOL_COMPLETED) for e in events):
            fits = self._owe(Tools(run.run_id, run.stream.open_tools)) and fits
        if run.stream.ended:
            self._owe(Finish(run.run_id, self.config.retention_s))
        if not fits:
            self._end(run, Trigger.FAIL, {
                "status": "failed", "error": "the shared state is unreachable and this "
                "node's buffer for it is full: the run was stopped"})
        return self._pushed

    async def trim_shared(self, run_id: str, seq: int) -> None:
        """Queues a trim of the shared log through ``seq`` (an ack) and waits until it is
        written with the next batch: one round trip shared with the other operations, and
        the ack is answered as before, once the other nodes see it. Best effort: skipped
        while the outbox is full, not waited for while the shared state is unreachable."""
        if self._outbox.full:
            return
        self._owe(Trim(run_id, seq))
        if self.shared_reachable:
            await self._confirm(self._pushed)

    async def _confirm(self, number: int) -> None:
        """Waits (briefly: an outage does not hold a run's end) until operation ``number``
        is written, so that a run's slot is free across nodes before its client learns
        that it ended."""
        if not number:
            return
        with anyio.move_on_after(min(1.0, self.config.node_lease_s / 4)):
            while self._written < number:
                await self._progress.wait()

    async def _replicator(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        pause = _RETRY_S[0]
        while True:
            if not len(self._outbox):
                self._outbox_filled = anyio.Event()
                await self._outbox_filled.wait()
            try:
                await self._write_some()
            except SharedStateUnavailable:
                self._unreachable()
                await anyio.sleep(pause)
                pause = min(pause * 2, _RETRY_S[1])
            else:
                pause = _RETRY_S[0]

    async def _write_some(self) -> None:
        """Writes the oldest batch; on failure (or cancellation) it goes back in front.

        If the shared state lost this node's runs, they are written again first."""
        async with self._write_lock:
            if self._lost_state:
                await self._restore_state()
            batch = self._outbox.take()
            try:
                await self._write(batch)
            except BaseException:
                self._outbox.give_back(batch)
                raise
            self._written += len(batch)
            self._progress.set()
            self._progress = anyio.Event()

    async def _write(self, operations: list[Operation]) -> None:
        """Writes operations in one step: every run's events and latest open tools, then
        the ends, closed connections and abandoned admissions (a run's events before its
        end)."""
        assert self._shared is not None
        logs: dict[str, list[tuple[int, bytes]]] = {}
        tools: dict[str, Mapping[str, str]] = {}
        acked: dict[str, tuple[int, str]] = {}
        finished: dict[str, float] = {}
        disconnected: list[tuple[str, str]] = []
        dropped: list[str] = []
        for op in operations:
            if isinstance(op, Append):
                logs.setdefault(op.run_id, []).extend(op.entries)
            elif isinstance(op, Tools):
                tools[op.run_id] = op.open_tools
            elif isinstance(op, Trim):
                seq = max(op.seq, acked.get(op.run_id, (0, ""))[0])
                acked[op.run_id] = (seq, self.node_id)
            elif isinstance(op, Finish):
                finished[op.run_id] = op.retention_s
            elif isinstance(op, Disconnect):
                disconnected.append((op.user_id, op.conn_id))
            else:
                dropped.append(op.run_id)
        await self._shared.apply(Batch(logs=logs, open_tools=tools, acked=acked, finished=finished,
                                       disconnected=disconnected, dropped=dropped))

    async def _restore_state(self) -> None:
        """Writes again what the shared state lost of this node: every run it runs or
        retains (record, retained log, dedup key, slot) and its connections."""
        assert self._shared is not None
        for run in self._table.own():
            stream = run.stream
            record = RunRecord(
                run_id=run.run_id, user_id=run.user_id, request_id=run.request_id,
                thread_id=run.thread_id, agent=run.agent, node_id=self.node_id,
                ended=stream.ended, open_tools=stream.open_tools)
            entries = [(seq, stream.frame(seq))
                       for seq in range(stream.trimmed_through + 1, stream.last_seq + 1)]
            await self._shared.restore(
                record, entries, trimmed=stream.trimmed_through,
                dedup_ttl_s=dedup_ttl_s(self.config),
                retention_s=self.config.retention_s)
        for connection in self.manager.all_connections():
            if isinstance(connection, OutboundQueue):
                await self._shared.connect(connection.user_id, connection.conn_id,
                                           self.node_id, self.config.max_connections_per_user)
        self._lost_state = False

    async def shared_written(self) -> None:
        """Waits until everything queued for the shared state so far has been written."""
        target = self._pushed
        while self._written < target and self._shared is not None:
            await self._progress.wait()

    async def drain_outbox(self) -> None:
        """Writes everything this node owes the shared state (itself: the replicator may be
        gone at exit). Raises SharedStateUnavailable when it cannot."""
        while len(self._outbox) and self._shared is not None:
            await self._write_some()

    # ====================================================== leases, takeover
    async def _heartbeat(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await self._beat()
            await anyio.sleep(self.config.node_lease_s * _LEASE_SHARE / 3)

    async def _beat(self) -> None:
        assert self._shared is not None
        try:
            known = await self._shared.heartbeat(self.node_id,
                                                 self.config.node_lease_s * _LEASE_SHARE)
        except SharedStateUnavailable:
            self._unreachable()
            return
        if not known and self._beaten:
            log.warning("the shared state lost this node's runs (restarted empty?): "
                        "writing them again")
            self._lost_state = True
            self._outbox_filled.set()  # the replicator restores them before writing more
        self._beaten = True
        if self._unreachable_since is not None:
            log.warning("shared state reachable again")
            self._unreachable_since = None
            self._trusted_since = anyio.current_time()

    async def _takeover(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Ends the runs of nodes whose lease lapsed (after a lease of being reachable)."""
        task_status.started()
        while True:
            await anyio.sleep(self.config.node_lease_s / 8)
            settled = anyio.current_time() - self._trusted_since >= self.config.node_lease_s
            if self.shared_reachable and settled:
                try:
                    await self._take_over_dead_nodes()
                except SharedStateUnavailable:
                    continue

    async def _take_over_dead_nodes(self) -> None:
        assert self._shared is not None
        for node in await self._shared.dead_nodes():
            if node != self.node_id and await self._shared.claim(node, self.node_id):
                log.warning("node %s is lost: ending its runs", node)
                for run_id in await self._shared.node_runs(node):
                    await self._end_orphan(run_id)
                await self._shared.forget_node(node)

    async def _end_orphan(self, run_id: str) -> None:
        """Appends the closing events of a lost node's run after its last recorded one."""
        assert self._shared is not None
        record = await self._shared.record(run_id)
        if record is None or record.ended:
            return
        trimmed, entries = await self._shared.read(run_id, 0)
        last_seq = entries[-1][0] if entries else trimmed
        await self._shared.append(run_id, closing_frames(record, last_seq, time.time()))
        await self._shared.finish(run_id, retention_s=self.config.retention_s)

    async def leave_cluster(self) -> None:
        """A clean exit: what this node owes is written, then it is forgotten.

        Bounded by ``shutdown_grace_s``; if the shared state cannot be reached, the node is
        simply gone, and a survivor ends what it left as for any lost node.
        """
        if self._shared is None:
            return
        with anyio.move_on_after(self.config.shutdown_grace_s, shield=True):
            try:
                await self.drain_outbox()
                await self._shared.forget_node(self.node_id)
            except SharedStateUnavailable:
                log.warning("left without writing to the unreachable shared state")

    # ================================================================ mailbox
    async def _mailbox(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Runs the commands other nodes route here (a cancel of a run this node runs)."""
        assert self._shared is not None
        while True:
            try:
                async with self._shared.mailbox(self.node_id) as messages:
                    task_status.started()
                    task_status = anyio.TASK_STATUS_IGNORED
                    async for message in messages:
                        self._command(message)
            except SharedStateUnavailable:
                task_status.started()
                task_status = anyio.TASK_STATUS_IGNORED
                await anyio.sleep(_RETRY_S[1])

    def _command(self, message: bytes) -> None:
        try:
            command = json.loads(message)
            if command.get("type") == "cancel":
                self.cancel(str(command["run_id"]), str(command["user_id"]))
        except Exception:  # a bad message must not stop the mailbox
            log.warning("bad mailbox message %r", message[:200], exc_info=True)

    async def route_cancel(self, record: RunRecord) -> None:
        """Asks the node that runs ``record`` to cancel it."""
        assert self._shared is not None
        message = {"type": "cancel", "run_id": record.run_id, "user_id": record.user_id}
        await self._shared.send(record.node_id, json.dumps(message).encode())

    # ================================================================ mirrors
    async def mirror(self, record: RunRecord) -> Run:
        """A local mirror of another node's run, filled from the shared log while followed."""
        assert self._shared is not None
        trimmed, entries = await self._shared.read(record.run_id, 0)
        existing = self._table.lookup(record.run_id)
        if existing is not None:  # another resume made it meanwhile
            return existing
        stream = RunStream(record.run_id, record.thread_id, record.agent,
                           self.config.max_retained_events_per_run, self._retention.held)
        stream.start_after(trimmed)
        stream.extend(entries)
        run = Run(run_id=record.run_id, user_id=record.user_id, agent=record.agent,
                  request_id=record.request_id, thread_id=record.thread_id, stream=stream,
                  created_at=anyio.current_time(), scope=anyio.CancelScope(), mirror=True)
        self._table.add_mirror(run)
        if not stream.ended:
            self._tg.start_soon(self._tail, run, name=f"mirror {run.run_id}")
        return run

    async def followed_elsewhere(self, run: Run) -> bool:
        """Whether a socket on another node follows ``run`` (unknown: assume it does)."""
        assert self._shared is not None
        try:
            return bool(await self._shared.followers(run.run_id))
        except SharedStateUnavailable:
            return True

    async def _tail(self, run: Run) -> None:
        """Appends the shared log's new events to a mirror until it ends or is dropped."""
        assert run._scope is not None
        with run._scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._say_followed, run)
                await self._tail_events(run)
                tg.cancel_scope.cancel()

    async def _say_followed(self, run: Run) -> None:
        """Tells the run's node, while this mirror lives, that a socket here follows it."""
        assert self._shared is not None
        every = min(self.config.detached_run_timeout_s / 3, _TAIL_WAIT_S)
        ttl = max(3 * every, _FOLLOW_TTL_MIN_S)
        while True:
            through = min((q.sent_through(run.run_id) for q in self.manager.queues(run.run_id)),
                          default=run.stream.trimmed_through)
            with contextlib.suppress(SharedStateUnavailable):
                await self._shared.follow(run.run_id, self.node_id, ttl, through)
            await anyio.sleep(every)

    async def _tail_events(self, run: Run) -> None:
        assert self._shared is not None
        while not run.stream.ended:
            try:
                entries = await self._shared.tail(run.run_id, run.last_seq, _TAIL_WAIT_S)
            except SharedStateUnavailable:
                await anyio.sleep(_RETRY_S[1])
                continue
            for chunk in self._chunks(entries):
                try:
                    events = run.stream.extend(chunk)
                except StreamError:
                    self._fell_behind(run)
                    return
                self._mirror_moved.pop(run.run_id, anyio.Event()).set()
                if events:  # a socket past half its bounds may drain before the next chunk
                    await self._delivery.relay(run, events)

    def _chunks(self, entries: list[tuple[int, bytes]]) -> list[list[tuple[int, bytes]]]:
        """A tail's events in chunks of at most half a socket's bounds: the shared log hands
        over hundreds at once, which a socket reading at full speed takes only in turns
        (as it takes the events of a run of its own node, one emit at a time)."""
        most = max(1, self.config.max_queued_messages // 2)
        most_bytes = max(1, int(self.config.max_queued_mib * 1024 * 1024) // 2)
        chunks: list[list[tuple[int, bytes]]] = [[]]
        size = 0
        for entry in entries:
            if chunks[-1] and (len(chunks[-1]) >= most or size + len(entry[1]) > most_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(entry)
            size += len(entry[1])
        return chunks

    def _fell_behind(self, run: Run) -> None:
        """The shared log was trimmed past this mirror (an ack elsewhere): its sockets are
        closed like slow readers (4008; a resume tells them what is still there)."""
        for queue in self.manager.queues(run.run_id):
            queue.close(CLOSE_OVERFLOW, "fell behind the retained events; resume")
            self.disconnect(queue)
        self.drop_mirror(run)

    async def caught_up(self, run: Run, seq: int) -> None:
        """Waits until a mirror holds ``seq``: another node's socket may hold events still
        on their way to the shared state. At most ``node_lease_s``: while the run's node
        lives they come, and a node that died has its runs ended within a lease."""
        with anyio.move_on_after(self.config.node_lease_s):
            while run._mirror and run.last_seq < seq and not run.stream.ended:
                await self._mirror_moved.setdefault(run.run_id, anyio.Event()).wait()

    def drop_mirror(self, run: Run) -> None:
        """Forgets a mirror nobody here follows any more (a later resume reads it again)."""
        self._mirror_moved.pop(run.run_id, anyio.Event()).set()
        if run._scope is not None:
            run._scope.cancel()
        self._table.drop_mirror(run)
        self._retention.held.bytes -= run.stream.held_bytes
