"""Events per second through the registry, in memory (no network).

``python -m benchmarks.bench_core [--events N] [--out benchmarks/results/core.json]``

Runs an agent that emits ``partial_result`` events as fast as it can, with one in-memory
subscriber per run, for 1 and for 1,000 concurrent runs. As a baseline measured in the same
process, the same number of events goes through a bare trio memory channel (what any
trio fan-out costs at least), so the ratio says what the registry's guarantees cost.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import trio

from registry import AgentContext, AgentRegistry, Config, Event, open_registry


class CountingSubscriber:
    """A subscriber that only counts what it gets (no storage, no wake-ups)."""

    immediate_delivery = True

    def __init__(self, user_id: str) -> None:
        self._user_id = user_id
        self.count = 0
        self.last_seq: dict[str, int] = {}

    @property
    def user_id(self) -> str:
        return self._user_id

    def attach(self, run_id: str, after_seq: int, replay: list[Event]) -> None:
        self.count += len(replay)

    async def send_event(self, event: Event) -> None:
        if event.seq != self.last_seq.get(event.run_id, 0) + 1:
            raise AssertionError(f"out of order: {event.seq}")
        self.last_seq[event.run_id] = event.seq
        self.count += 1

    def detach(self, run_id: str) -> None:
        pass

    def delivered_through(self, run_id: str) -> int:
        return self.last_seq.get(run_id, 0)


async def _emitter(ctx: AgentContext) -> Any:
    for i in range(int(ctx.options["events"])):
        await ctx.partial("t")
        del i
    return None


async def registry_rate(runs: int, events_per_run: int) -> dict[str, float]:
    agents = AgentRegistry()
    agents.register("emit", _emitter)
    config = Config(max_active_runs=max(runs, 1), max_active_runs_per_user=max(runs, 1),
                    max_retained_events_per_run=1000)
    async with open_registry(config, agents=agents) as reg:
        sub = CountingSubscriber("bench")
        reg.connect(sub)
        start = time.perf_counter()
        handles = [
            reg.start_run(user_id="bench", request_id=str(i), agent="emit", message="",
                          context={"events": events_per_run}, subscriber=sub)[0]
            for i in range(runs)
        ]
        for run in handles:
            await run.wait_done()
        elapsed = time.perf_counter() - start
    total = sub.count
    return {"runs": runs, "events": total, "seconds": elapsed, "events_per_s": total / elapsed}


async def channel_rate(runs: int, events_per_run: int) -> dict[str, float]:
    """Baseline: the same events through bare trio memory channels, one consumer each."""
    received = 0

    async def consume(receive: trio.MemoryReceiveChannel[int]) -> None:
        nonlocal received
        async for _ in receive:
            received += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(runs):
            send, receive = trio.open_memory_channel[int](math.inf)
            nursery.start_soon(consume, receive)
            nursery.start_soon(_produce, send, events_per_run)
    elapsed = time.perf_counter() - start
    return {"runs": runs, "events": received, "seconds": elapsed,
            "events_per_s": received / elapsed}


async def _produce(send: trio.MemorySendChannel[int], count: int) -> None:
    async with send:
        for i in range(count):
            await send.send(i)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per scenario")
    parser.add_argument("--out", default="benchmarks/results/core.json")
    args = parser.parse_args(argv)
    results = []
    for runs in (1, 1000):
        per_run = max(args.events // runs, 1)
        ours = trio.run(registry_rate, runs, per_run)
        base = trio.run(channel_rate, runs, per_run)
        ratio = ours["events_per_s"] / base["events_per_s"]
        results.append({"runs": runs, "registry": ours, "trio_channel_baseline": base,
                        "ratio_vs_baseline": ratio})
        print(f"{runs:>5} concurrent runs: {ours['events_per_s']:>10,.0f} events/s through the "
              f"registry, {base['events_per_s']:>10,.0f} through bare channels "
              f"(ratio {ratio:.2f})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "core", "python": platform.python_version(),
                               "machine": platform.machine(), "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
