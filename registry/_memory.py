"""An in-memory :class:`~registry.Subscriber`: for tests, benchmarks and in-process consumers."""

from __future__ import annotations

from collections import defaultdict
from typing import final

import anyio

from registry._events import Event
from registry._manager import DeliveryError

__all__ = ["MemorySubscriber"]


@final
class MemorySubscriber:
    """Collects the events of the runs it is attached to, per run, in the order it got them.

    Args:
        user_id: The user it connects as.
        fail_times: How many ``send_event`` calls fail with :class:`DeliveryError` before
            the rest succeed (to exercise retries).
    """

    def __init__(self, user_id: str, *, fail_times: int = 0) -> None:
        self._user_id = user_id
        self.fail_times = fail_times
        self.attempts = 0
        self.received: defaultdict[str, list[Event]] = defaultdict(list)
        self.detached: list[str] = []
        self._changed = anyio.Event()

    @property
    def user_id(self) -> str:
        return self._user_id

    def attach(self, run_id: str, after_seq: int, replay: list[Event]) -> None:
        self.received[run_id].extend(replay)
        self._notify()

    async def send_event(self, event: Event) -> None:
        self.attempts += 1
        if self.fail_times > 0:
            self.fail_times -= 1
            raise DeliveryError("injected failure")
        self.received[event.run_id].append(event)
        self._notify()

    def detach(self, run_id: str) -> None:
        self.detached.append(run_id)
        self._notify()

    def delivered_through(self, run_id: str) -> int:
        events = self.received.get(run_id)
        return events[-1].seq if events else 0

    def seqs(self, run_id: str) -> list[int]:
        return [e.seq for e in self.received.get(run_id, ())]

    async def wait_for(self, run_id: str, count: int) -> list[Event]:
        """Blocks until at least ``count`` events of ``run_id`` arrived; returns them."""
        while len(self.received.get(run_id, ())) < count:
            await self._changed.wait()
        return self.received[run_id]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
