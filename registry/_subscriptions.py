"""Connections and what they follow: connect, resume, ack, the subscription they make, and
the detach timer of a run that no connection follows any more.

A mixin of :class:`~registry.AgentExecutionRegistry` over the driver's state declared
below. A connection is an :class:`~registry.OutboundQueue` (a socket, reading each run's log
through its own cursor) or any other :class:`~registry.Subscriber` (handed each event).
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio.abc

from registry._errors import InvalidField, ResumeUnavailable, RunNotFound
from registry._lifecycle import Trigger
from registry._outbound import OutboundQueue
from registry._stream import SeqOutOfRange

if TYPE_CHECKING:
    from registry._config import Config
    from registry._delivery import Delivery
    from registry._manager import Connection, WebSocketManager
    from registry._run import Run
    from registry._shared import SharedState
    from registry._table import RunTable
    from registry._timers import DeadlineQueue

__all__ = ["SubscriptionsAPI"]


class SubscriptionsAPI(abc.ABC):
    """The connection methods of :class:`~registry.AgentExecutionRegistry`."""

    config: Config
    manager: WebSocketManager
    _table: RunTable
    _delivery: Delivery

    _shared: SharedState | None
    _tg: anyio.abc.TaskGroup
    _detached: DeadlineQueue[tuple[weakref.ref[Run], int]]

    @abc.abstractmethod
    def _end(self, run: Run, trigger: Trigger, payload: Mapping[str, Any] | None = None, *,
             from_inside: bool = False) -> bool: ...

    @abc.abstractmethod
    async def followed_elsewhere(self, run: Run) -> bool: ...

    @abc.abstractmethod
    def drop_mirror(self, run: Run) -> None: ...

    # ========================================================= connections
    def connect(self, connection: Connection) -> None:
        """Registers an open connection (TooManyConnections at the per-user limit)."""
        self.manager.connect(connection)

    def disconnect(self, connection: Connection) -> None:
        """Forgets a connection and unsubscribes it from every run."""
        for run_id in self.manager.disconnect(connection):
            if isinstance(connection, OutboundQueue):
                connection.unsubscribe(run_id)
            run = self._table.lookup(run_id)
            if run is not None:
                self._delivery.release(run)
                self._maybe_detached(run)

    def resume(self, run_id: str, user_id: str, after_seq: int, connection: Connection) -> None:
        """Subscribes ``connection`` to a run: every retained event after ``after_seq``, then live.

        On a connection already subscribed it restarts that connection's copy of the stream.

        Raises:
            RunNotFound: no such retained run of this user.
            InvalidField: ``after_seq`` is beyond the last event (field ``after_seq``).
            ResumeUnavailable: events after ``after_seq`` were trimmed (or, with
                ``delivery_mode`` direct, never kept).
        """
        run = self._table.get(run_id, user_id)
        if self.config.delivery_mode == "direct":
            raise ResumeUnavailable("delivery_mode is direct: runs are not retained for resume")
        try:
            run.stream.check_resume(after_seq)
        except SeqOutOfRange as exc:
            raise InvalidField("after_seq", str(exc)) from None
        self._subscribe(run, connection, after_seq)

    def ack(self, run_id: str, user_id: str, seq: int) -> None:
        """Records a cumulative ack; trims what every connection following the run has taken.

        Raises:
            RunNotFound: no such retained run of this user.
            InvalidField: ``seq`` is beyond the last event (field ``seq``).
        """
        run = self._table.get(run_id, user_id)
        try:
            run.stream.ack(seq)
        except SeqOutOfRange as exc:
            raise InvalidField("seq", str(exc)) from None
        floor = min((_sent_through(c, run_id) for c in self.manager.subscribers(run_id)),
                    default=run.stream.acked_seq)
        run.stream.trim_through(min(floor, run.stream.acked_seq))
        self._delivery.release(run)

    def _subscribe(self, run: Run, connection: Connection, after_seq: int) -> None:
        """Starts ``connection``'s copy of the run after ``after_seq`` (checked to be held)."""
        if connection.user_id != run.user_id:
            raise RunNotFound(f"no run {run.run_id!r}")
        self.manager.subscribe(connection, run.run_id, run.stream.last_seq + 1)
        run._detach_generation += 1
        if isinstance(connection, OutboundQueue):
            connection.subscribe(run.run_id, run.stream, after_seq)
        else:
            connection.attach(run.run_id, after_seq, list(run.stream.events_after(after_seq)))

    # ============================================================== detach
    def _maybe_detached(self, run: Run) -> None:
        """Starts the detach timer of a run left with no subscribed connection.

        A mirror nobody here follows any more is dropped instead.
        """
        if self.manager.has_subscribers(run.run_id):
            return
        if run._mirror:
            self.drop_mirror(run)
        elif run.is_active:
            self._detached.push((weakref.ref(run), run._detach_generation))

    def _detach_due(self, item: tuple[weakref.ref[Run], int]) -> None:
        """Cancels the run unless it was subscribed again since its timer started.

        The timer holds the run weakly: a run that ended and was dropped meanwhile (by a
        retention bound) is freed at once, not when its timer is due. In a service, a
        socket on another node following the run counts too.
        """
        ref, generation = item
        run = ref()
        if run is None or not run.is_active:
            return
        if run._detach_generation == generation and not self.manager.has_subscribers(run.run_id):
            if self._shared is None:
                self._end(run, Trigger.DETACH)
            else:
                self._tg.start_soon(self._detach_unless_followed, run, generation)

    async def _detach_unless_followed(self, run: Run, generation: int) -> None:
        if await self.followed_elsewhere(run):
            self._detached.push((weakref.ref(run), run._detach_generation))
        elif run._detach_generation == generation:
            self._end(run, Trigger.DETACH)


def _sent_through(connection: Connection, run_id: str) -> int:
    if isinstance(connection, OutboundQueue):
        return connection.sent_through(run_id)
    return connection.delivered_through(run_id)
