"""Timers served by one task each: a FIFO of one fixed delay, and a heap of any deadlines."""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar, final

import anyio
import anyio.abc
import sniffio
import trio

__all__ = ["DeadlineQueue", "Pacer", "TimerHeap"]

T = TypeVar("T")


@final
class DeadlineQueue(Generic[T]):
    """Items due at ``push`` time + ``delay``; :meth:`serve` hands each to ``on_due`` when due.

    With one delay for every item, deadlines arrive in order, so a FIFO is a timer heap:
    pushing and serving are O(1) and one task serves any number of timers.
    """

    def __init__(self, delay: float, on_due: Callable[[T], object]) -> None:
        self.delay = delay
        self.on_due = on_due
        self._items: deque[tuple[float, T]] = deque()
        self._wake = anyio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: T, now: float | None = None) -> None:
        """Schedules ``item`` for ``now`` (default: the current time) + ``delay``."""
        start = anyio.current_time() if now is None else now
        self._items.append((start + self.delay, item))
        self._wake.set()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Runs until cancelled, calling ``on_due`` for each item at its deadline."""
        task_status.started()
        while True:
            if not self._items:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            await anyio.sleep_until(self._items[0][0])
            self.on_due(self._items.popleft()[1])  # no reference kept while sleeping


@final
class TimerHeap(Generic[T]):
    """Items each due at its own deadline (the registry's clock); one task serves them all.

    :meth:`serve` hands each item to ``on_due`` once its deadline has passed. Pushing is
    O(log n); an item pushed with a deadline earlier than every other wakes the service.
    """

    def __init__(self, on_due: Callable[[T], object]) -> None:
        self.on_due = on_due
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()
        self._wake = anyio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, deadline: float, item: T) -> None:
        """Schedules ``item`` for ``deadline`` (``anyio.current_time()`` scale)."""
        heapq.heappush(self._heap, (deadline, next(self._order), item))
        if self._heap[0][2] is item:
            self._wake.set()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Runs until cancelled, calling ``on_due`` for each item at its deadline."""
        task_status.started()
        while True:
            self._wake = anyio.Event()
            delay = self._heap[0][0] - anyio.current_time() if self._heap else math.inf
            if delay > 0:
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                continue
            self.on_due(heapq.heappop(self._heap)[2])


@final
class Pacer:
    """Many tasks' sleeps for the price of one timer: what agents pace their events with.

    A ``trio.sleep`` arms a cancel scope with a deadline for every call, and expiring it
    re-computes cancel status; with thousands of runs each sleeping between events, that
    is most of the server's CPU. Here a sleeping task parks in the lot of its deadline,
    rounded up to a tick, and one service task wakes each lot when it is due: a sleep costs
    a park and an unpark, and the service pays one expiring deadline per tick, however many
    sleepers it wakes. A tick is ``resolution`` long, or ``coarse`` for a sleep of at least
    ``coarse_after`` (its deadline then moves at most ``coarse / coarse_after`` of it
    later), so many runs pacing long sleeps share few ticks. It is a cancellation point
    like any sleep. Under a backend other than trio it is ``anyio.sleep``.

    Args:
        resolution: Deadlines are rounded up to a multiple of this (seconds).
        coarse: The tick of long sleeps, a multiple of ``resolution``.
        coarse_after: The shortest sleep given the coarse tick.
    """

    def __init__(self, resolution: float = 0.002, coarse: float = 0.016,
                 coarse_after: float = 0.5) -> None:
        self.resolution = resolution
        self._coarse = max(1, round(coarse / resolution))  # in resolutions
        self._coarse_after = coarse_after
        self._lots: dict[int, trio.lowlevel.ParkingLot] = {}
        self._ticks: list[int] = []
        self._idle = trio.lowlevel.ParkingLot()  # the service, waiting for an earlier tick
        self._serving = False

    async def sleep(self, seconds: float) -> None:
        """Waits at least ``seconds`` (at most one tick more)."""
        if not self._serving or seconds <= 0:
            await anyio.sleep(seconds)
            return
        tick = math.ceil((trio.current_time() + seconds) / self.resolution)
        if seconds >= self._coarse_after:
            tick = -(-tick // self._coarse) * self._coarse
        lot = self._lots.get(tick)
        if lot is None:
            lot = self._lots[tick] = trio.lowlevel.ParkingLot()
            heapq.heappush(self._ticks, tick)
            if self._ticks[0] == tick:
                self._idle.unpark_all()
        await lot.park()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Wakes each lot when its tick is due (under trio; otherwise it only waits).

        Nothing else runs between reading the earliest tick and parking, so a sleeper that
        pushes an earlier one always finds the service parked (or about to read again).
        """
        self._serving = sniffio.current_async_library() == "trio"
        task_status.started()
        if not self._serving:
            await anyio.sleep_forever()
        while True:
            if not self._ticks:
                await self._idle.park()
                continue
            due = self._ticks[0] * self.resolution
            if due > trio.current_time():
                with trio.move_on_at(due):
                    await self._idle.park()
                continue
            self._lots.pop(heapq.heappop(self._ticks)).unpark_all()
