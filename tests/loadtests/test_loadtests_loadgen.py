"""The trio load generator against the in-process trio baseline: clean runs, drops, faults."""

from __future__ import annotations

import trio
from trio_websocket import serve_websocket

from benchmarks.baseline_trio import Baseline
from benchmarks.loadgen import Meter, RunPlan, Target, Worker
from loadtests import wire

SECRET = "k" * 32


async def start_baseline(nursery: trio.Nursery, fault_every: int = 0, fault: int = 1) -> str:
    """Serve the baseline in ``nursery`` and return its URL."""
    state = Baseline(nursery, SECRET, 0.5, fault_every=fault_every, fault=fault)
    server = await nursery.start(serve_websocket, state.handle, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}/ws"


async def drive(url: str, plan: RunPlan, runs: int) -> Meter:
    """Run ``runs`` runs one after the other on one worker and return its meter."""
    meter = Meter()
    async with trio.open_nursery() as nursery:
        worker = Worker(Target(url, "native", SECRET), "tester", plan, meter, nursery)
        worker.conn = await worker._connect()
        for _ in range(runs):
            await worker.one_run()
        assert worker.conn is not None
        await worker.conn.close()
        nursery.cancel_scope.cancel()
    return meter


async def test_clean_runs_have_no_violation(nursery: trio.Nursery) -> None:
    url = await start_baseline(nursery)
    meter = await drive(url, RunPlan(wire.scripted_context(2, 5, 0)), runs=5)
    counts = meter.tally.to_dict()["counts"]
    assert meter.tally.violations == {}
    assert counts["runs_completed"] == 5
    assert counts["events_delivered"] == counts["events_expected"] == 5 * (3 + 2 * 2 + 5)


async def test_drops_with_resume_deliver_every_event_once(nursery: trio.Nursery) -> None:
    url = await start_baseline(nursery)
    plan = RunPlan(wire.scripted_context(2, 8, 1), drop=True, offline_s=0.0)
    meter = await drive(url, plan, runs=5)
    counts = meter.tally.to_dict()["counts"]
    assert meter.tally.violations == {}
    assert counts["drops"] == 5
    assert counts["events_delivered"] == counts["events_expected"]


async def test_a_server_losing_events_is_caught(nursery: trio.Nursery) -> None:
    url = await start_baseline(nursery, fault_every=4, fault=0)
    meter = await drive(url, RunPlan(wire.scripted_context(1, 6, 0), run_timeout_s=2), runs=3)
    assert meter.tally.violations["lost"] > 0


async def test_a_server_duplicating_events_is_caught(nursery: trio.Nursery) -> None:
    url = await start_baseline(nursery, fault_every=4, fault=2)
    meter = await drive(url, RunPlan(wire.scripted_context(1, 6, 0)), runs=3)
    assert meter.tally.violations["duplicate"] > 0
