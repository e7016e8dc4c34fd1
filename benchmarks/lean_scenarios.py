"""The scenarios the lean generator drives: ``active``, ``soak`` and ``retained``.

* ``active``: 1,000 sockets, each with one ``scripted`` run in flight (2 tools, 20 tokens,
  ``delay_ms`` 500: about 2,000 events/s), a 30 s window; the registry, the ``websockets``
  peer, the bare trio baseline and (when ``harness serve`` has it) the FastAPI server, one
  after the other in interleaved rounds, each in a fresh process. Per server: latency, the
  checker's verdict, server CPU per event from /proc, the collector's pauses from /metrics.
* ``soak``: the registry (``retention_s`` 120) at about 1,500 events/s for 15 minutes, a
  record every 10 s: RSS, CPU per event, events/s, collector pauses, max latency.
* ``retained``: the registry's resident memory per retained event, from the RSS growth while
  runs of a known size pile up in retention (nothing expires: ``retention_s`` 3600).
"""

from __future__ import annotations

import functools
import itertools
import time
import urllib.request
from typing import Any

import attrs

from benchmarks.genkit import parse_prometheus
from benchmarks.session import Bench, Load, attempt, code_version, missing_server, say
from loadtests.serverproc import ServerProcess, rss_of

ACTIVE_SERVERS = ("registry", "websockets", "baseline", "fastapi")
RETENTION_S = 120
"""The registry's default retention; the baseline is given the same in ``active``."""
PADDED_TOKEN_BYTES = 1000


def active(bench: Bench) -> dict[str, Any]:
    """Scenario ``active``: every server in turn, ``active_rounds`` interleaved rounds."""
    load = bench.scale.active
    names, skipped = [], {}
    for name in bench.servers_of(ACTIVE_SERVERS):
        reason = missing_server(name, bench.env)
        if reason is None:
            names.append(name)
        else:
            skipped[name] = reason
            say(f"  {name:10} active: skipped, {reason}")
    trials: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_index in range(bench.scale.active_rounds):
        for name in names:
            trial = functools.partial(active_trial, round_index=round_index)
            outcome = attempt(bench, "active", trial, name)
            if outcome is not None:
                trials[name].append(outcome)
    return {"load": attrs.asdict(load), "skipped": skipped, "trials": trials}


def active_trial(bench: Bench, name: str, *, round_index: int) -> dict[str, Any]:
    """Measure one server once under the ``active`` load, in a fresh process."""
    extra = ("--retention-s", str(RETENTION_S)) if name == "baseline" else ()
    code = code_version()
    with bench.server(name, f"active{round_index}", *extra) as server:
        result = bench.leangen(server, bench.scale.active)
    result["round"] = round_index
    result["code"] = code
    say(f"  {name:10} active round {round_index + 1}: {summary_line(result)}")
    return result


def summary_line(result: dict[str, Any]) -> str:
    """Return a one-line digest of a lean generator's result."""
    window, lat = result["window"], result["latency_ms"]
    gc = window.get("gc") or {}
    return (
        f"{result['achieved_rate']} ev/s p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} "
        f"max {lat['max']} ms, server {window.get('cpu_us_per_event')} us/event "
        f"({window.get('server_cpu_percent')} %), gc {gc.get('collections')} collections "
        f"longest {gc.get('longest_since_start_ms')} ms, loadgen {result['loadgen_cpu_percent']} %,"
        f" violations {result['tally']['violations'] or 'none'}"
    )


def soak(bench: Bench, minutes: float | None = None) -> dict[str, Any]:
    """Scenario ``soak``: the registry under steady load, a record every ``interval_s``."""
    load = bench.scale.soak
    if minutes is not None:
        load = attrs.evolve(load, window_s=minutes * 60)
    rate = load.sockets * 1000 // load.delay_ms
    say(f"  registry   soak: {load.window_s / 60:.1f} min at ~{rate} events/s, "
        f"retention_s {RETENTION_S}")
    code = code_version()
    with bench.server("registry", "soak", "--retention-s", str(RETENTION_S)) as server:
        result = bench.leangen(server, load)
    result["code"] = code
    say(f"  registry   soak: {summary_line(result)}")
    return {"load": attrs.asdict(load), "retention_s": RETENTION_S, "result": result}


def retained(bench: Bench) -> dict[str, Any]:
    """Scenario ``retained``: RSS per retained event, small events then padded ones.

    A first pass warms the server up (allocator arenas, per-socket state); then each pass adds
    a known number of retained events, and the RSS growth over that pass, divided by its
    events, is the memory one retained event costs.
    """
    load = bench.scale.retained
    args = ("--retention-s", "3600", "--max-retained-mib", "4096")
    with bench.server("registry", "retained", *args) as server:
        passes = [retained_pass(bench, server, load, "warm-up", 0)]
        passes.append(retained_pass(bench, server, load, "small events", 0))
        passes.append(retained_pass(bench, server, load, "padded tokens", PADDED_TOKEN_BYTES))
    for before, after in itertools.pairwise(passes):
        events = max(after["events"], 1)
        after["rss_growth_mib"] = round((after["rss"] - before["rss"]) / 2**20, 2)
        after["bytes_per_event"] = round((after["rss"] - before["rss"]) / events, 1)
        after["overhead_bytes_per_event"] = round(
            after["bytes_per_event"] - (after["event_bytes_mean"] or 0), 1
        )
        say(f"  registry   retained, {after['label']}: {after['events']} events of "
            f"{after['event_bytes_mean']} B -> {after['bytes_per_event']} B of RSS each")
    return {"load": attrs.asdict(load), "passes": passes}


def retained_pass(
    bench: Bench, server: ServerProcess, load: Load, label: str, token_bytes: int
) -> dict[str, Any]:
    """Run one pass of runs that stay retained; return its events and the RSS after it."""
    result = bench.leangen(server, attrs.evolve(load, token_bytes=token_bytes))
    time.sleep(1.0)
    metrics = read_metrics(server.url)
    return {
        "label": label,
        "token_bytes": token_bytes,
        "runs": result["tally"]["counts"]["runs_started"],
        "events": result["events_received"],
        "event_bytes_mean": result["event_bytes_mean"],
        "violations": result["tally"]["violations"],
        "retained_runs": metrics.get("registry_retained_runs"),
        "rss": rss_of(server.proc.pid),
        "rss_mib": round(rss_of(server.proc.pid) / 2**20, 1),
    }


def read_metrics(ws_url: str) -> dict[str, float]:
    """Return the samples of the registry's ``/metrics`` (empty when unreadable)."""
    url = ws_url.replace("ws://", "http://", 1).rsplit("/ws", 1)[0] + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return parse_prometheus(answer.read().decode())
    except OSError:
        return {}

