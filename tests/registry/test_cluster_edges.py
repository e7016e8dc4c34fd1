"""Races of the multi-node detach timer (PROTOCOL v2 "Multi-node", guarantee 5), in mock time."""

from __future__ import annotations

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
