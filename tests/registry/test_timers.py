"""DeadlineQueue and TimerHeap: one task serves any number of timers, each at its deadline."""

from __future__ import annotations

import trio
import trio.testing

from registry._timers import DeadlineQueue, TimerHeap


async def test_a_deadline_queue_hands_each_item_delay_after_its_push(
    autojump_clock: trio.testing.MockClock,
) -> None:
    due: list[tuple[str, float]] = []
    queue = DeadlineQueue[str](10.0, lambda item: due.append((item, trio.current_time())))
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.serve)
        t0 = trio.current_time()
        queue.push("a")
        await trio.sleep(3)
        queue.push("b", now=t0 + 2)  # the time the caller saw it happen
        queue.push("c")
        assert len(queue) == 3
        await trio.sleep(100)
        assert [(item, at - t0) for item, at in due] == [("a", 10), ("b", 12), ("c", 13)]
        assert len(queue) == 0
        nursery.cancel_scope.cancel()


async def test_a_timer_heap_hands_items_in_deadline_order_and_an_earlier_push_wakes_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    due: list[tuple[str, float]] = []
    heap = TimerHeap[str](lambda item: due.append((item, trio.current_time())))
    async with trio.open_nursery() as nursery:
        await nursery.start(heap.serve)
        t0 = trio.current_time()
        heap.push(t0 + 50, "late")
        heap.push(t0 + 20, "middle")
        await trio.sleep(5)
        heap.push(t0 + 10, "early")  # earlier than every other: the service wakes for it
        heap.push(t0 - 1, "overdue")
        assert len(heap) == 4
        await trio.sleep(100)
        assert [(item, at - t0) for item, at in due] == [
            ("overdue", 5), ("early", 10), ("middle", 20), ("late", 50)]
        assert len(heap) == 0
        nursery.cancel_scope.cancel()
