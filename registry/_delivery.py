"""Delivery of a run's new events to whoever follows it: in seq order, never into the agent.

Sockets (:class:`~registry.OutboundQueue`) only count the new events: they read them from
the run's log as they drain, so their path has no await, no lock and no copy. Subscribers
that are handed each event get it in order (a lock per run orders concurrent emitters),
with retries; one that fails them all is unsubscribed and can resume.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import final

import anyio

from registry._config import Config
from registry._events import Event
from registry._manager import DeliveryError, Subscriber, WebSocketManager
from registry._outbound import OutboundQueue
from registry._run import Run

__all__ = ["Delivery"]

log = logging.getLogger("registry")


@final
class Delivery:
    """Hands recorded events to the connections following their run.

    A handed subscriber gets ``delivery_retries`` attempts, ``retry_delay_s`` apart, each
    bounded by ``event_delivery_timeout_s``; one that fails them all, crashes, or would miss
    an event because a fan-out was cancelled is unsubscribed from the run (it can resume).

    Args:
        config: The retry, timeout and ``delivery_mode`` settings.
        manager: Who is subscribed to what.
        on_unsubscribed: Called with a run after a connection was dropped from it.
        on_overflow: Called with a socket's queue that went over its bounds (closed 4008).
    """

    def __init__(
        self,
        config: Config,
        manager: WebSocketManager,
        on_unsubscribed: Callable[[Run], None],
        on_overflow: Callable[[OutboundQueue], None],
    ) -> None:
        self.config = config
        self.manager = manager
        self.counts: Counter[str] = Counter()
        self.on_unsubscribed = on_unsubscribed
        self.on_overflow = on_overflow
        self._direct = config.delivery_mode == "direct"

    async def deliver(self, run: Run, events: list[Event]) -> bool:
        """Hands newly recorded ``events`` of ``run`` to everyone following it.

        A socket past half its bounds gets a bounded pause to drain (its transport's).

        Returns:
            False when a handed subscriber failed every attempt.
        """
        self.counts["events_emitted"] += len(events)
        return await self.relay(run, events)

    async def relay(self, run: Run, events: list[Event]) -> bool:
        """Hands events to the run's followers without counting them as emitted here
        (a mirror's events were emitted on another node)."""
        queues = self.manager.queues(run.run_id)
        self._count_into(run, queues, len(events))
        ok = True
        if self.manager.has_handed(run.run_id):
            ok = await self._hand(run, events)
        for queue in queues:
            if queue.pause is not None and queue.above_high_water():
                await queue.pause()
        return ok

    def _count_into(self, run: Run, queues: tuple[OutboundQueue, ...], count: int) -> None:
        run_id, stream = run.run_id, run.stream
        for queue in queues:
            if queue.on_append(run_id, stream.last_seq):
                self.counts["events_delivered"] += count
            else:
                self.on_overflow(queue)
        if self._direct:  # the rollback path: nothing is kept for a resume
            stream.trim_through(stream.last_seq)
        if stream.held_from() <= stream.trimmed_through:
            self.release(run)

    def release(self, run: Run) -> None:
        """Frees the frames of trimmed events that no socket is still reading."""
        floor = run.stream.trimmed_through
        for queue in self.manager.queues(run.run_id):
            floor = min(floor, queue.sent_through(run.run_id))
        run.stream.release_through(floor)

    async def _hand(self, run: Run, events: list[Event]) -> bool:
        """Hands ``events`` to every subscriber, in seq order even when several tasks emit."""
        lock = run._lock
        assert lock is not None, "an ended run emits nothing"
        try:
            if lock.locked():  # another task of this run is delivering (maybe retrying)
                await lock.acquire()
            else:
                lock.acquire_nowait()
        except BaseException as exc:
            self._drop_behind(run, [], events, exc)
            raise
        try:
            return await self._deliver_locked(run, events)
        finally:
            lock.release()

    async def _deliver_locked(self, run: Run, events: list[Event]) -> bool:
        ok = True
        for index, event in enumerate(events):
            targets = self.manager.deliverable(run.run_id, event.seq)
            for position, connection in enumerate(targets):
                if not self.manager.is_live(connection, run.run_id, event.seq):
                    continue  # it left, or resumed (and gets this event as replay) meanwhile
                try:
                    ok = await self._send(run, connection, event) and ok
                except BaseException as exc:  # cancelled while retrying: nobody may see a gap
                    self._drop_behind(run, targets[position:], events[index + 1:], exc)
                    raise
        return ok

    def _drop_behind(
        self, run: Run, missed: list[Subscriber], unsent: list[Event],
        exc: BaseException,
    ) -> None:
        """Unsubscribes every connection that would otherwise miss an event (it can resume)."""
        behind = set(missed)
        for event in unsent:
            behind.update(self.manager.deliverable(run.run_id, event.seq))
        for connection in behind:
            self.give_up(run, connection, exc, failed=False)

    async def _send(self, run: Run, connection: Subscriber, event: Event) -> bool:
        attempts = self.config.delivery_retries
        for attempt in range(1, attempts + 1):
            try:
                await self._attempt(connection, event)
            except (DeliveryError, TimeoutError) as exc:
                if attempt == attempts:
                    return self.give_up(run, connection, exc)
                self.counts["events_retried"] += 1
                await anyio.sleep(self.config.retry_delay_s)
            except Exception as exc:  # a bug in the transport: never retried, never raised
                log.exception("subscriber crashed run_id=%s user_id=%s", run.run_id, run.user_id)
                return self.give_up(run, connection, exc)
            else:
                self.counts["events_delivered"] += 1
                return True
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, connection: Subscriber, event: Event) -> None:
        """One delivery attempt, bounded by ``event_delivery_timeout_s``.

        A subscriber whose ``send_event`` only enqueues (``immediate_delivery = True``, as
        the WebSocket server's) cannot block, so it skips the cost of a cancel scope.
        """
        if getattr(connection, "immediate_delivery", False):
            await connection.send_event(event)
            return
        with anyio.fail_after(self.config.event_delivery_timeout_s):
            await connection.send_event(event)

    def give_up(
        self, run: Run, connection: Subscriber, exc: BaseException,
        *, failed: bool = True,
    ) -> bool:
        """Unsubscribes ``connection`` from the run; it must resume to get more events.

        ``failed`` counts a delivery failure; a cancellation that cut a fan-out short is not one.
        """
        if failed:
            self.counts["events_failed"] += 1
            log.warning("delivery failed run_id=%s user_id=%s: %r", run.run_id, run.user_id, exc)
        self.manager.unsubscribe(connection, run.run_id)
        connection.detach(run.run_id)
        self.on_unsubscribed(run)
        return False
