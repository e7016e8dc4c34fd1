"""Races of the multi-node detach timer (PROTOCOL v2 "Multi-node", guarantee 5), in mock time."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from tests.registry._cluster_support import Socket, open_cluster
from tests.registry._support import USER


async def test_a_resume_while_the_detach_check_asks_the_other_nodes_keeps_the_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The detach timer of a run nobody follows asks the shared state whether a socket on
    another node follows it (one round trip). A socket that resumes the run here during that
    round trip keeps it alive: the answer "nobody" is stale and must not cancel the run."""
    timeout, rtt = 3.0, 1.0
    async with open_cluster("AB", rtt=rtt, detached_run_timeout_s=timeout) as cluster:
        first = await Socket(cluster["A"]).connect()
        run_id = await first.start("hang")
        await first.until_seq(run_id, 2)
        run = cluster["A"].get_run(run_id, USER)
        left_at = trio.current_time()
        await first.disconnect()
        second = await Socket(cluster["A"]).connect()  # takes one round trip
        await trio.sleep_until(left_at + timeout + rtt / 2)  # the check is on its way
        await second.resume(run_id, 2)
        await trio.sleep(10 * timeout)
        assert run.is_active
        assert second.events(run_id) == []  # nothing missed, nothing new yet
        await second.disconnect()
        left_again = trio.current_time()
        with trio.fail_after(4 * timeout):
            final = await run.wait_done()
        assert final["status"] == "cancelled"
        assert trio.current_time() - left_again >= timeout


# ========================================================================= acks
async def test_an_ack_is_answered_once_its_trim_is_in_the_shared_log(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An ack's shared trim goes out with the node's next batch, and the ack waits for it:
    when it is answered, every other node already sees the log trimmed."""
    async with open_cluster("AB", rtt=0.25) as cluster:
        socket = await Socket(cluster["A"]).connect()
        run_id = await socket.start("chatty")
        events = await socket.until_completed(run_id)
        began = trio.current_time()
        await cluster["A"].on_ack(run_id, USER, 4)
        assert trio.current_time() - began >= 0.25  # a round trip: the batch's
        assert (await cluster.shared.read(run_id, 0))[0] == 4
        await cluster["A"].on_ack(run_id, USER, len(events))
        assert await cluster.shared.read(run_id, 0) == (len(events), [])


async def test_an_ack_during_an_outage_is_answered_at_once_and_trims_once_it_is_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While the shared state is unreachable an ack does not wait for it (the shared log
    keeps more for a while; nothing is lost); its trim is written when the state is back."""
    async with open_cluster("AB") as cluster:
        socket = await Socket(cluster["A"]).connect()
        run_id = await socket.start("chatty")
        events = await socket.until_completed(run_id)
        await trio.testing.wait_all_tasks_blocked()
        cluster.shared.unavailable = True
        while cluster["A"].shared_reachable:  # the next heartbeat notices
            await trio.sleep(0.5)
        began = trio.current_time()
        await cluster["A"].on_ack(run_id, USER, len(events))
        assert trio.current_time() == began
        cluster.shared.unavailable = False
        while (await cluster.shared.read(run_id, 0))[0] != len(events):
            await trio.sleep(0.5)


# ==================================================================== admission
async def test_a_start_given_up_while_its_admission_is_out_leaves_no_run_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The caller of a start stops waiting (its socket went away) after the shared state
    admitted the run but before the answer came: the run would hold the user's slot and
    request forever. The node drops it with its next batch."""
    async with open_cluster("A", max_active_runs_per_user=1) as cluster:
        link = cluster.nodes["A"].link
        link.hang_after_admit = True
        with trio.move_on_after(1) as gave_up:
            await cluster["A"].on_start_agent(user_id=USER, request_id="q", agent="chatty",
                                              message="hi")
        assert gave_up.cancelled_caught
        link.hang_after_admit = False
        start: dict[str, Any] = {"user_id": USER, "request_id": "q", "agent": "chatty",
                                 "message": "hi"}
        abandoned, duplicate = await cluster["A"].on_start_agent(**start)
        assert duplicate  # (until the drop is written, the request still names that run)
        with trio.fail_after(5):
            while await cluster.shared.record(abandoned.run_id) is not None:
                await trio.sleep(0.1)
        run, duplicate = await cluster["A"].on_start_agent(**start)  # slot and request free
        assert not duplicate and run.run_id != abandoned.run_id
        socket = await Socket(cluster["A"]).connect()
        await socket.resume(run.run_id, 0)
        assert (await socket.until_completed(run.run_id))[-1]["payload"]["status"] == "succeeded"
