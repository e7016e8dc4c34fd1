"""The wire protocol's operations, for one node alone or one node of a service.

A mixin of :class:`~registry.AgentExecutionRegistry`. A transport calls these for what a
client sends; without a shared state each is the registry's own synchronous step, with one
it also does what the other nodes need: admission across nodes, resume of a run another node
runs (through a mirror), an ack that trims the shared log, a cancel routed to the run's node,
connections counted across nodes.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from registry._cluster import dedup_ttl_s
from registry._errors import (
    InvalidField,
    Overloaded,
    ResumeUnavailable,
    RunNotFound,
    TooManyConnections,
    quote,
)
from registry._outbound import OutboundQueue
from registry._outbox import Abandon, Disconnect, Operation
from registry._run import Run
from registry._shared import RunRecord, SharedState, SharedStateUnavailable

if TYPE_CHECKING:
    from registry._agents import AgentRegistry
    from registry._config import Config
    from registry._manager import Connection, WebSocketManager
    from registry._table import RunTable

__all__ = ["RunIds", "ServiceAPI"]


class RunIds(Protocol):
    """What a client is told of a run it started: a local run or another node's record."""

    @property
    def run_id(self) -> str: ...

    @property
    def thread_id(self) -> str: ...


class ServiceAPI(abc.ABC):
    """``on_*``: what a transport calls for each client message and connection."""

    config: Config
    manager: WebSocketManager
    agents: AgentRegistry
    node_id: str
    _shared: SharedState | None
    _table: RunTable

    # the registry's own steps
    @abc.abstractmethod
    def start_run(self, *, user_id: str, request_id: str, agent: str, message: str,
                  thread_id: str | None = None, context: Mapping[str, Any] | None = None,
                  subscriber: Connection | None = None) -> tuple[Run, bool]: ...

    @abc.abstractmethod
    def resume(self, run_id: str, user_id: str, after_seq: int,
               connection: Connection) -> None: ...

    @abc.abstractmethod
    def ack(self, run_id: str, user_id: str, seq: int) -> None: ...

    @abc.abstractmethod
    def cancel(self, run_id: str, user_id: str) -> bool: ...

    @abc.abstractmethod
    def connect(self, connection: Connection) -> None: ...

    @abc.abstractmethod
    def disconnect(self, connection: Connection) -> None: ...

    @abc.abstractmethod
    def _admit(self, user_id: str, request_id: str, agent: str, message: str,
               thread_id: str | None, options: Mapping[str, Any] | None,
               run_id: str | None = None) -> Run: ...

    @abc.abstractmethod
    def _launch_agent(self, run: Run, subscriber: Connection | None) -> None: ...

    @abc.abstractmethod
    async def mirror(self, record: RunRecord) -> Run: ...

    @abc.abstractmethod
    async def route_cancel(self, record: RunRecord) -> None: ...

    @abc.abstractmethod
    async def caught_up(self, run: Run, seq: int) -> None: ...

    @abc.abstractmethod
    def drop_mirror(self, run: Run) -> None: ...

    @abc.abstractmethod
    async def trim_shared(self, run_id: str, seq: int) -> None: ...

    @abc.abstractmethod
    def _unreachable(self) -> None: ...

    @abc.abstractmethod
    def _owe(self, operation: Operation) -> bool: ...

    # ================================================================= runs
    async def on_start_agent(
        self, *, user_id: str, request_id: str, agent: str, message: str,
        thread_id: str | None = None, context: Mapping[str, Any] | None = None,
        subscriber: Connection | None = None,
    ) -> tuple[RunIds, bool]:
        """``start_agent``: a new run (its ids), or the one this request already started.

        Raises:
            As :meth:`start_run`; with a shared state that cannot be reached, Overloaded.
        """
        if self._shared is None:
            return self.start_run(user_id=user_id, request_id=request_id, agent=agent,
                                  message=message, thread_id=thread_id, context=context,
                                  subscriber=subscriber)
        existing = self._table.find(user_id, request_id)
        if existing is not None:
            return existing, True
        self.agents.get(agent).validate(dict(context or {}))
        self._table.check_room(user_id)
        record, duplicate = await self._admit_shared(user_id, request_id, agent, thread_id)
        if duplicate:
            return record, True
        run = self._admit(user_id, request_id, agent, message, record.thread_id, context,
                          run_id=record.run_id)
        self._launch_agent(run, subscriber)
        return run, False

    async def _admit_shared(
        self, user_id: str, request_id: str, agent: str, thread_id: str | None,
    ) -> tuple[RunRecord, bool]:
        assert self._shared is not None
        record = RunRecord(
            run_id=secrets.token_hex(16), user_id=user_id, request_id=request_id,
            thread_id=thread_id or "thread_" + secrets.token_hex(8), agent=agent,
            node_id=self.node_id)
        try:
            return await self._shared.admit(
                record, max_active_runs_per_user=self.config.max_active_runs_per_user,
                max_active_runs=self.config.max_active_runs,
                dedup_ttl_s=dedup_ttl_s(self.config))
        except SharedStateUnavailable:
            self._unreachable()
            self._owe(Abandon(record.run_id))  # in case Redis runs it after all
            raise Overloaded("the service's shared state is unreachable") from None
        except anyio.get_cancelled_exc_class():
            self._owe(Abandon(record.run_id))  # it may be admitted all the same
            raise

    async def _find(self, run_id: str, user_id: str) -> Run | RunRecord:
        """The run here (its own or a mirror), else the shared record of another node's run."""
        local = self._table.lookup(run_id)
        if local is not None or self._shared is None:
            return self._table.get(run_id, user_id)
        try:
            record = await self._shared.record(run_id)
        except SharedStateUnavailable:  # maybe a live run: retry later, it is not gone
            self._unreachable()
            raise Overloaded("the service's shared state is unreachable") from None
        if record is None or record.user_id != user_id:
            raise RunNotFound(f"no run {quote(run_id)}")
        return record

    async def on_resume(
        self, run_id: str, user_id: str, after_seq: int, connection: Connection
    ) -> None:
        """``resume``: on any node; a run of another node is followed through a mirror."""
        found = await self._find(run_id, user_id)
        if not isinstance(found, RunRecord):
            self.resume(run_id, user_id, after_seq, connection)
            return
        if self.config.delivery_mode == "direct":
            raise ResumeUnavailable("delivery_mode is direct: runs are not retained")
        try:
            run = await self.mirror(found)
        except SharedStateUnavailable:
            raise Overloaded("the service's shared state is unreachable") from None
        await self.caught_up(run, after_seq)
        try:
            self.resume(run_id, user_id, after_seq, connection)
        finally:
            if run._mirror and not self.manager.has_subscribers(run_id):
                self.drop_mirror(run)

    async def on_ack(self, run_id: str, user_id: str, seq: int) -> None:
        """``ack``: trims here, and the shared log too."""
        found = await self._find(run_id, user_id)
        if not isinstance(found, RunRecord):
            self.ack(run_id, user_id, seq)
        if self._shared is not None:
            await self._trim_shared(run_id, seq, found)

    async def _trim_shared(self, run_id: str, seq: int, found: Run | RunRecord) -> None:
        """Trims the shared log, but never past what a socket on any node still needs (the
        batch's trim spares the other nodes' followers)."""
        assert self._shared is not None
        if isinstance(found, RunRecord):
            try:
                trimmed, entries = await self._shared.read(run_id, max(seq - 1, 0))
            except SharedStateUnavailable:
                return  # the shared log keeps more for a while; nothing is lost
            if seq > max([trimmed, *(s for s, _ in entries)]):
                raise InvalidField("seq", f"seq {quote(seq)} is beyond the last event")
        floor = min(found.stream.trimmed_through, seq) if isinstance(found, Run) else seq
        await self.trim_shared(run_id, floor)

    async def on_cancel(self, run_id: str, user_id: str) -> None:
        """``cancel``: here, or routed to the node that runs it (ended: a no-op)."""
        found = await self._find(run_id, user_id)
        if not isinstance(found, RunRecord) and not found._mirror:
            self.cancel(run_id, user_id)
            return
        record = found if isinstance(found, RunRecord) else await self._record_of(found)
        if record is not None and not record.ended:
            try:
                await self.route_cancel(record)
            except SharedStateUnavailable:
                raise Overloaded("the service's shared state is unreachable") from None

    async def _record_of(self, run: Run) -> RunRecord | None:
        assert self._shared is not None
        try:
            return await self._shared.record(run.run_id)
        except SharedStateUnavailable:
            raise Overloaded("the service's shared state is unreachable") from None

    # ========================================================== connections
    async def on_connect(self, connection: Connection) -> None:
        """A new connection (TooManyConnections beyond ``max_connections_per_user``, all nodes).

        While the shared state cannot be reached only this node's count applies.
        """
        self.connect(connection)
        if self._shared is None or not isinstance(connection, OutboundQueue):
            return
        limit = self.config.max_connections_per_user
        try:
            counted = await self._shared.connect(connection.user_id, connection.conn_id,
                                                 self.node_id, limit)
        except SharedStateUnavailable:
            return
        if not counted:
            self.disconnect(connection)
            raise TooManyConnections("the user has too many connections")

    def on_disconnect(self, connection: Connection) -> None:
        """A closed connection: forgotten here, and (in order, soon) across nodes."""
        self.disconnect(connection)
        if self._shared is not None and isinstance(connection, OutboundQueue):
            self._owe(Disconnect(connection.user_id, connection.conn_id))
