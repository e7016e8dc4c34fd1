"""DeadlineQueue, TimerHeap and Pacer: one task serves any number of timers, each at its
deadline (the pacer's sleepers at most one tick late, long ones sharing coarse ticks)."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from registry._timers import DeadlineQueue, Pacer, TimerHeap


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


@pytest.mark.parametrize(("shortest", "longest", "tick"), [(0.001, 0.4, 0.002),
                                                          (0.5, 3.0, 0.016)])
async def test_pacer_sleepers_wake_no_earlier_and_at_most_one_tick_later_on_shared_ticks(
    autojump_clock: trio.testing.MockClock, shortest: float, longest: float, tick: float,
) -> None:
    """Sleeps shorter than half a second end on 2 ms ticks, longer ones on 16 ms ticks: 300
    sleepers of random lengths wake in at most one task switch per tick, whatever their
    number, and no sleeper is woken early or more than one tick late."""
    pacer = Pacer()
    chosen = random.Random(7)
    woken: list[tuple[float, float, float]] = []  # (asked, start, end)

    async def sleeper(seconds: float) -> None:
        start = trio.current_time()
        await pacer.sleep(seconds)
        woken.append((seconds, start, trio.current_time()))

    async with trio.open_nursery() as nursery:
        await nursery.start(pacer.serve)
        async with trio.open_nursery() as sleepers:
            for _ in range(300):
                sleepers.start_soon(sleeper, chosen.uniform(shortest, longest))
                await trio.sleep(chosen.uniform(0, 0.01))
        nursery.cancel_scope.cancel()
    assert len(woken) == 300
    for asked, start, end in woken:
        assert asked - 1e-9 <= end - start <= asked + tick + 1e-9
        assert end / tick == pytest.approx(round(end / tick), abs=1e-6)  # on the tick's grid
    assert len({end for _, _, end in woken}) <= (longest + 3) / tick  # so they share wakes


async def test_a_pacer_sleep_is_a_cancellation_point(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pacer = Pacer()
    async with trio.open_nursery() as nursery:
        await nursery.start(pacer.serve)
        with trio.move_on_after(1) as scope:
            await pacer.sleep(5)
        assert scope.cancelled_caught
        assert trio.current_time() == pytest.approx(1)
        await pacer.sleep(0.5)  # the cancelled sleeper left its lot; the pacer serves on
        nursery.cancel_scope.cancel()
