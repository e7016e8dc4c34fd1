"""Single-run latency from agent emit to client receive, over the real server on loopback.

``python -m benchmarks.bench_latency [--events 2000] [--out benchmarks/results/latency.json]``

Starts ``python -m harness serve`` as a subprocess, runs one ``scripted`` chat whose events
are spaced ``--delay-ms`` apart, and measures, per event, the client's receive time minus
the event's ``ts`` (the server's wall clock when the agent emitted it; same machine).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from harness._auth import mint_token
from harness.client import open_chat


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def measure(url: str, token: str, events: int, delay_ms: float) -> list[float]:
    latencies = []
    context = {"tools": 0, "tokens": events - 3, "delay_ms": delay_ms}
    async with open_chat(url, token, ack_every=64) as chat:
        async for event in chat.run("scripted", "latency", context=context):
            latencies.append((time.time() - event["ts"]) * 1000)
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--delay-ms", type=float, default=1.0)
    parser.add_argument("--out", default="benchmarks/results/latency.json")
    args = parser.parse_args(argv)
    secret = secrets.token_urlsafe(32)
    server = subprocess.Popen([sys.executable, "-m", "harness", "serve", "--port", "0"],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "REGISTRY_AUTH_SECRET": secret})
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip().removeprefix("listening on ")
        latencies = trio.run(measure, url, mint_token(secret, "bench"), args.events,
                             args.delay_ms)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    summary: dict[str, Any] = {
        "benchmark": "single_run_latency", "events": len(latencies), "delay_ms": args.delay_ms,
        "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99), "max_ms": max(latencies),
        "mean_ms": statistics.fmean(latencies),
    }
    print(f"{summary['events']} events, emit -> client receive: p50 {summary['p50_ms']:.3f} ms, "
          f"p95 {summary['p95_ms']:.3f} ms, p99 {summary['p99_ms']:.3f} ms, "
          f"max {summary['max_ms']:.3f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
