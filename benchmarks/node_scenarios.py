"""The scenarios of a service on more than one process: ``nodes`` and ``delivery``.

* ``nodes``: one local ``redis-server``, then for N in 1, 2, 3 a service of N registry nodes
  (``python -m harness serve --port 0 --redis-url ...``, otherwise the settings of the
  ``active`` scenario: the defaults), and before them one node without Redis (the in-memory
  baseline). Each service gets the lean generator with its sockets spread round robin over
  the nodes: first a fixed offered load (the ``active`` shape: every socket with a run in
  flight, a window of two run lengths, so that every socket starts and ends about two runs in
  it), then the sweep's load at rising rates up to the first step whose p99 passes 50 ms or
  that saturates (the sweep's rule, :func:`benchmarks.session.sustained`; a falling step is
  measured a second time) -> max sustained events/s. Per service: events/s, latency, the
  nodes' CPU per event (summed), Redis's CPU, and Redis's commands and socket reads per event
  (``INFO`` at the window's edges, and around the whole trial: :mod:`benchmarks.redisinfo`).
  Without ``redis-server`` only the in-memory node is measured and the result says why.
* ``delivery``: the ``drops`` scenario's load (every run drops its socket mid-run, reconnects
  100 ms later and resumes) against one node with ``--delivery-mode registry`` and one with
  ``--delivery-mode direct`` (the legacy path, the rollback flag) -> events lost, runs whose
  end never reached the client, latency, side by side.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import attrs

from benchmarks import redisinfo
from benchmarks.session import (
    Bench,
    Load,
    ScenarioError,
    attempt,
    code_version,
    max_sustained,
    say,
    sustained,
    sweep_load,
)
from loadtests.cluster import REDIS_BINARY, RedisProcess, start_redis
from loadtests.serverproc import ServerProcess, ServerStartError

MEMORY = "memory"
REDIS = "redis"
DELIVERY_MODES = ("registry", "direct")
NO_REDIS = (
    "redis-server is not installed (apt-get install redis-server): the services on Redis were "
    "not measured, only the single node in memory"
)


def service_key(kind: str, count: int) -> str:
    """Return the name of a service in the results: ``memory-1``, ``redis-2``..."""
    return f"{kind}-{count}"


def nodes(bench: Bench) -> dict[str, Any]:
    """Scenario ``nodes``: the in-memory node, then 1, 2, 3 nodes on one Redis."""
    scale = bench.scale.nodes
    out: dict[str, Any] = {
        "load": attrs.asdict(scale.load),
        "rates": list(scale.rates),
        "step_s": scale.step_s,
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "redis_version": None,
        "skipped": {},
        "services": {},
    }
    binary = shutil.which(REDIS_BINARY)
    redis: RedisProcess | None = None
    reason = NO_REDIS
    if binary is not None:
        out["redis_version"] = redis_version(binary)
        try:
            redis = start_redis(bench.logs / "redis-nodes.log")
        except ServerStartError as exc:
            reason = f"redis-server did not start: {exc}"
    try:
        configs = [(MEMORY, 1), *((REDIS, count) for count in scale.counts)]
        for kind, count in configs:
            key = service_key(kind, count)
            if kind == REDIS and redis is None:
                out["skipped"][key] = reason
                say(f"  {key:10} nodes: skipped, {reason}")
                continue
            measure = functools.partial(
                measure_service, count=count, redis=redis if kind == REDIS else None
            )
            result = attempt(bench, "nodes", measure, key)
            if result is not None:
                out["services"][key] = result
    finally:
        if redis is not None:
            redis.stop()
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def redis_version(binary: str) -> str | None:
    """Return ``redis-server --version``'s ``v=`` field (None when it says nothing usable)."""
    try:
        shown = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for part in shown.stdout.split():
        if part.startswith("v="):
            return part[2:]
    return None


def measure_service(
    bench: Bench, key: str, *, count: int, redis: RedisProcess | None
) -> dict[str, Any]:
    """Start ``count`` nodes (on ``redis`` when given), measure the fixed load, then ramp."""
    scale = bench.scale.nodes
    extra = ("--redis-url", redis.url) if redis is not None else ()
    address = f"127.0.0.1:{redis.port}" if redis is not None else None
    started = {"load_average": [round(x, 2) for x in os.getloadavg()], "code": code_version()}
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(bench.server("registry", f"nodes-{key}-{index}", *extra))
            for index in range(count)
        ]
        fixed = trial(bench, servers, scale.load, address)
        say(f"  {key:10} fixed load: {digest(fixed)}")
        steps = ramp(bench, key, servers, address)
    return {
        "nodes": count,
        "redis": redis is not None,
        **started,
        "fixed": fixed,
        "steps": steps,
        "max_sustained_rate": max_sustained(steps),
    }


def trial(
    bench: Bench, servers: Sequence[ServerProcess], load: Load, address: str | None
) -> dict[str, Any]:
    """Run the lean generator once against the nodes; with Redis, add what Redis did over the
    whole trial (connecting and draining included: every run counted from its admission to
    its end, every socket from its connect to its disconnect) as ``redis_trial``."""
    host_port = redisinfo.parse_address(address) if address else None
    before = read_redis(host_port)
    began = time.monotonic()
    result = bench.leangen(servers, load, redis=address)
    after = read_redis(host_port)
    if before is not None and after is not None:
        seconds = time.monotonic() - began
        result["redis_trial"] = redisinfo.delta(before, after, result["events_received"], seconds)
    return result


def read_redis(address: tuple[str, int] | None) -> redisinfo.Snapshot | None:
    """Read Redis's counters (None without Redis).

    Raises:
        ScenarioError: Redis does not answer.
    """
    if address is None:
        return None
    try:
        return redisinfo.read_info(*address)
    except (OSError, ValueError, KeyError) as exc:
        raise ScenarioError(f"INFO from redis at {address}: {exc!r}") from exc


def ramp(
    bench: Bench, key: str, servers: Sequence[ServerProcess], address: str | None
) -> list[dict[str, Any]]:
    """The sweep's load at each rate of the scale, until a step is not sustained (measured a
    second time first: on a shared machine another process may have taken the cores)."""
    scale = bench.scale.nodes
    steps: list[dict[str, Any]] = []
    for rate in scale.rates:
        load = sweep_load(rate, scale.warmup_s, scale.step_s)
        step = trial(bench, servers, load, address)
        if not sustained(step, steps):
            again = trial(bench, servers, load, address)
            step = again if sustained(again, steps) else step
        steps.append(step)
        say(f"  {key:10} {rate:6} ev/s offered: {digest(step)}")
        if not sustained(step, steps):
            break
    return steps


def digest(result: dict[str, Any]) -> str:
    """Return a one-line digest of a trial: rate, latency, CPU, Redis per event."""
    window, lat = result.get("window") or {}, result["latency_ms"]
    redis = window.get("redis") or {}
    ends = result.get("agent_completed_latency_ms") or {}
    text = (
        f"{result['achieved_rate']} ev/s p50 {lat['p50']} p99 {lat['p99']} (agent_completed "
        f"{ends.get('p99')}) ms, nodes "
        f"{window.get('cpu_us_per_event')} us/event ({window.get('server_cpu_percent')} %)"
    )
    if redis:
        text += (
            f", redis {redis.get('cpu_us_per_event')} us/event ({redis.get('cpu_percent')} %) "
            f"{redis.get('commands_per_event')} commands, {redis.get('reads_per_event')} reads"
            " per event"
        )
    violations = result["tally"]["violations"]
    return text + f", violations {violations or 'none'}, errors {result['errors'] or 'none'}"


def delivery(bench: Bench) -> dict[str, Any]:
    """Scenario ``delivery``: the drops load on ``--delivery-mode registry`` and ``direct``."""
    scale = bench.scale
    modes = {}
    for mode in DELIVERY_MODES:
        result = attempt(bench, "delivery", delivery_trial, mode)
        if result is not None:
            modes[mode] = result
    load = {"rate": scale.drops_rate, "window_s": scale.drops_s, "delay_ms": 10, "tools": 2,
            "tokens": 40, "offline_ms": 100, "warmup_s": 0.5}
    return {"load": load, "modes": modes}


def delivery_trial(bench: Bench, mode: str) -> dict[str, Any]:
    """Run the drops load once against a fresh node in delivery mode ``mode``."""
    code = code_version()
    with bench.server("registry", f"delivery-{mode}", "--delivery-mode", mode) as server:
        result = bench.drops(server, "native")
    result["code"] = code
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    counts, lat = result["tally"]["counts"], result["latency_ms"]
    say(
        f"  {mode:10} delivery: {counts['runs_started']} runs, {counts['drops']} drops, "
        f"{counts['events_expected'] - counts['events_delivered']} events lost, "
        f"{counts['runs_started'] - counts['runs_completed']} runs never ended, p99 "
        f"{lat['p99']} ms, violations {result['tally']['violations'] or 'none'}"
    )
    return result
