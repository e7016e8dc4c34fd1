"""Who is connected, and which connection is subscribed to which run (bookkeeping, no I/O)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Protocol, final, runtime_checkable

from registry._errors import TooManyConnections
from registry._events import Event
from registry._outbound import OutboundQueue

__all__ = ["Connection", "DeliveryError", "Subscriber", "WebSocketManager"]


class DeliveryError(Exception):
    """A subscriber could not take an event this time; the registry retries per its config."""


@runtime_checkable
class Subscriber(Protocol):
    """The transport-neutral face of one client connection (a WebSocket, a test sink, ...).

    The registry drives it; a transport implements it. All calls come from the registry's
    event loop.
    """

    @property
    def user_id(self) -> str:
        """The authenticated user this connection belongs to."""
        ...

    def attach(self, run_id: str, after_seq: int, replay: list[Event]) -> None:
        """Starts (or restarts) this connection's copy of a run's stream after ``after_seq``.

        ``replay`` holds the retained events with seq > ``after_seq``; the
        connection sends them, then every event later given to :meth:`send_event`. It must
        not block: a transport may send the replay lazily as the socket drains.
        """
        ...

    async def send_event(self, event: Event) -> None:
        """Delivers one live event of an attached run, in seq order.

        A subscriber whose ``send_event`` never blocks (it only enqueues) may set a class
        attribute ``immediate_delivery = True``; the registry then skips the per-attempt
        timeout scope.

        Raises:
            DeliveryError: a transient failure; the registry retries, then gives up on this
                connection for that run (it calls :meth:`detach`; the client can resume).
        """
        ...

    def detach(self, run_id: str) -> None:
        """The registry will send no more events of ``run_id`` to this connection."""
        ...

    def delivered_through(self, run_id: str) -> int:
        """The highest seq of ``run_id`` this connection has sent on (0 when none)."""
        ...


#: What the registry can hold as a connection: a socket's queue or a handed-events subscriber.
Connection = OutboundQueue | Subscriber


@final
class WebSocketManager:
    """Per-user connection registry and the subscriptions of connections to runs.

    A connection is either an :class:`~registry.OutboundQueue` (a socket: it reads each
    run's log through its own cursor and never blocks) or any other :class:`Subscriber`
    (handed each event, with retries). They are kept apart so the sockets' path stays cheap.

    Args:
        max_connections_per_user: Limit enforced by :meth:`connect`.
    """

    def __init__(self, max_connections_per_user: int) -> None:
        self.max_connections_per_user = max_connections_per_user
        self._by_user: defaultdict[str, set[Connection]] = defaultdict(set)
        # run_id -> {subscriber: the first seq it gets live (earlier ones came as replay)}
        self._subscribers: defaultdict[str, dict[Subscriber, int]] = defaultdict(dict)
        # run_id -> the queues following it (each keeps its own cursor)
        self._queues: defaultdict[str, dict[OutboundQueue, None]] = defaultdict(dict)
        self._runs: defaultdict[Connection, set[str]] = defaultdict(set)

    def connect(self, connection: Connection) -> None:
        """Registers an open connection.

        Raises:
            TooManyConnections: the user already has ``max_connections_per_user`` open.
        """
        mine = self._by_user[connection.user_id]
        if connection not in mine and len(mine) >= self.max_connections_per_user:
            limit = self.max_connections_per_user
            raise TooManyConnections(f"user already has {len(mine)} open connections (max {limit})")
        mine.add(connection)

    def disconnect(self, connection: Connection) -> list[str]:
        """Forgets a connection; returns the run ids it was subscribed to (now unsubscribed)."""
        mine = self._by_user.get(connection.user_id)
        if mine is not None:
            mine.discard(connection)
            if not mine:
                del self._by_user[connection.user_id]
        run_ids = list(self._runs.pop(connection, ()))
        for run_id in run_ids:
            self._drop(run_id, connection)
        return run_ids

    def connections(self, user_id: str) -> tuple[Connection, ...]:
        """The open connections of ``user_id``."""
        return tuple(self._by_user.get(user_id, ()))

    async def send_message(self, user_id: str, message: Mapping[str, Any]) -> bool:
        """Writes one frame straight to every open connection of ``user_id``.

        The legacy path of the migration plan (and of ``delivery_mode = direct``): no
        numbering, no retention, no retries. A run event (a dict with ``seq``) is handed to
        subscribers as an :class:`Event`; sockets get the JSON as it is.

        Returns:
            Whether at least one connection took it.
        """
        frame = json.dumps(message, separators=(",", ":"), default=str).encode()
        took = False
        for connection in self.connections(user_id):
            if isinstance(connection, OutboundQueue):
                took = connection.push_control(frame) or took
            elif "seq" in message:
                took = await _hand_once(connection, Event.from_dict(message)) or took
        return took

    def all_connections(self) -> list[Connection]:
        """Every open connection."""
        return [c for mine in self._by_user.values() for c in mine]

    def connection_count(self) -> int:
        return sum(len(c) for c in self._by_user.values())

    def subscribe(self, connection: Connection, run_id: str, live_from: int) -> None:
        """Subscribes (or re-subscribes) ``connection``; live events from seq ``live_from`` on."""
        if isinstance(connection, OutboundQueue):
            self._queues[run_id][connection] = None
        else:
            self._subscribers[run_id][connection] = live_from
        self._runs[connection].add(run_id)

    def unsubscribe(self, connection: Connection, run_id: str) -> None:
        runs = self._runs.get(connection)
        if runs is not None:
            runs.discard(run_id)
            if not runs:
                del self._runs[connection]
        self._drop(run_id, connection)

    def subscribers(self, run_id: str) -> tuple[Connection, ...]:
        """The connections subscribed to ``run_id``, in no particular order."""
        return (*self._queues.get(run_id, ()), *self._subscribers.get(run_id, ()))

    def has_subscribers(self, run_id: str) -> bool:
        return run_id in self._queues or run_id in self._subscribers

    def queues(self, run_id: str) -> tuple[OutboundQueue, ...]:
        """The sockets following ``run_id``."""
        queues = self._queues.get(run_id)
        return tuple(queues) if queues else ()

    def has_handed(self, run_id: str) -> bool:
        """Whether ``run_id`` has subscribers that are handed each event (not queues)."""
        return run_id in self._subscribers

    def deliverable(self, run_id: str, seq: int) -> list[Subscriber]:
        """The connections that get event ``seq`` of ``run_id`` live (not through a replay)."""
        subs = self._subscribers.get(run_id)
        if not subs:
            return []
        return [c for c, live_from in subs.items() if live_from <= seq]

    def is_live(self, connection: Subscriber, run_id: str, seq: int) -> bool:
        """Whether ``connection`` is subscribed and gets event ``seq`` live (not as replay)."""
        subs = self._subscribers.get(run_id)
        live_from = subs.get(connection) if subs else None
        return live_from is not None and live_from <= seq

    def forget_run(self, run_id: str) -> tuple[Connection, ...]:
        """Unsubscribes everyone from ``run_id``; returns who was subscribed."""
        subs = (*self._queues.pop(run_id, ()), *self._subscribers.pop(run_id, ()))
        for connection in subs:
            runs = self._runs.get(connection)
            if runs is not None:
                runs.discard(run_id)
                if not runs:
                    del self._runs[connection]
        return subs

    def _drop(self, run_id: str, connection: Connection) -> None:
        table: dict[str, dict[Any, Any]] = (
            self._queues if isinstance(connection, OutboundQueue) else self._subscribers)
        subs = table.get(run_id)
        if subs is not None:
            subs.pop(connection, None)
            if not subs:
                del table[run_id]


async def _hand_once(subscriber: Subscriber, event: Event) -> bool:
    try:
        await subscriber.send_event(event)
    except DeliveryError:
        return False
    return True
