"""Run every benchmark side by side in one go: ``python -m benchmarks.run [--smoke] [--out DIR]``.

Each server runs as a subprocess (the registry's ``python -m harness serve``, the FastAPI port
``--server fastapi`` when it exists, the bare trio baseline, the ``websockets`` peer and the
python-socketio peer), driven by a load generator in another subprocess:

1. ``sweep``: latency p50/p95/p99 vs offered event rate, servers side by side at each rate, up
   to the first rate whose p99 passes 50 ms (or that saturates the server) -> max sustained rate;
2. ``fanout``: 1,000 sockets with 200 concurrent runs at >= 2,000 events/s -> p95/p99;
3. ``idle``: 1k / 5k / 10k idle sockets -> server RSS per socket (registry and baseline);
4. ``overhead``: registry vs baseline (ratios of max sustained rate and of p99), from 1 and 2;
5. ``drops``: every run drops its socket mid-run and resumes -> which guarantees each kept;
6. ``active``: 1,000 sockets each with one run in flight (~2,000 events/s), 30 s window, the
   registry, FastAPI, ``websockets`` and the baseline in interleaved rounds -> latency, server
   CPU per event (/proc), garbage-collector pauses (/metrics) (:mod:`benchmarks.lean_scenarios`);
7. ``nodes``: a local Redis, then 1, 2 and 3 registry nodes on it (and one node without Redis)
   at a fixed load and up a ramp -> events/s, latency, CPU per event of the nodes and of
   Redis, Redis commands and round trips per event (:mod:`benchmarks.node_scenarios`);
8. ``delivery``: the drops load against ``--delivery-mode registry`` and ``direct`` -> events
   lost, runs never ended, latency;
9. ``soak`` (``--soak`` only): the registry at ~1,500 events/s for 15 minutes, a record every
   10 s -> RSS, CPU per event and collector-pause curves and a verdict; ``retained``: RSS per
   retained event.

Scenarios 1, 2, 3, 5 and 8 use the trio generator (:mod:`benchmarks.loadgen`), 6, 7 and 9 the
lean asyncio one (:mod:`benchmarks.leangen`). ``--only active`` (or any comma-separated list) runs
just those; the report is always redrawn from every ``<out>/*.json`` there is. Results:
``<out>/*.json``, ``<out>/*.png`` and ``REPORT.md`` (full run: ``benchmarks/results/`` and
``benchmarks/REPORT.md``; ``--smoke``: ``benchmarks/results/smoke/`` with its REPORT.md).
``--smoke`` runs every scenario (soak included) at small scale in three to four minutes. Exit
status 1 when a scenario could not run, the registry broke a delivery guarantee, or any server
of ``active`` did; the latency goals are reported, not enforced (the machine is shared).

This process imports neither trio nor asyncio nor locust.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from benchmarks import lean_scenarios, node_scenarios, reporting
from benchmarks.session import (
    FULL,
    HERE,
    REPO,
    SERVERS,
    SMOKE,
    Bench,
    Load,
    attempt,
    code_version,
    max_sustained,
    say,
    sustained,
    sweep_load,
)
from loadtests.serverproc import ServerProcess, rss_of

CLASSIC_SERVERS = ("registry", "baseline", "websockets", "socketio")
"""The servers of the sweep, fan-out and drops scenarios."""
IDLE_SERVERS = ("registry", "baseline")
REPEATED = ("registry", "baseline")
"""Servers whose sweep steps are repeated (their ratio is a headline figure)."""
DEFAULT = ("sweep", "fanout", "drops", "idle", "active", "nodes", "delivery")
SOAK = ("soak", "retained")
SCENARIOS = (*DEFAULT, *SOAK)


def sweep(bench: Bench) -> dict[str, dict[str, Any]]:
    """Scenario 1, all servers side by side: at each offered rate, one step per server still
    sustaining (registry and baseline: ``repeats`` interleaved trials, the median p99 kept;
    the others: one trial, and a second one to confirm a fall), until its p99 passes 50 ms or
    it saturates."""
    steps: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        servers = start_all(bench, stack, "sweep")
        steps = {name: [] for name in servers}
        for rate in bench.scale.rates:
            active = [n for n in servers if all(sustained(s, steps[n]) for s in steps[n])]
            for name, trials in measure_rate(bench, servers, active, rate).items():
                if not trials:
                    del servers[name]
                    continue
                if name not in REPEATED and not sustained(trials[0], steps[name]):
                    trials = confirmed(bench, servers[name], name, rate, trials, steps[name])
                steps[name].append(median_trial(trials))
    return {n: {"steps": s, "max_sustained_rate": max_sustained(s)} for n, s in steps.items()}


def start_all(bench: Bench, stack: contextlib.ExitStack, tag: str) -> dict[str, ServerProcess]:
    """Start every server at once (stopped when ``stack`` closes); skip those that fail."""
    servers = {}
    for name in bench.servers_of(CLASSIC_SERVERS):
        server = attempt(bench, tag, lambda b, n: stack.enter_context(b.server(n, tag)), name)
        if server is not None:
            servers[name] = server
    return servers


def measure_rate(
    bench: Bench, servers: dict[str, ServerProcess], active: list[str], rate: int
) -> dict[str, list[dict[str, Any]]]:
    """Measure the ``active`` servers at ``rate``, interleaved, repeating the registry and the
    baseline ``bench.scale.repeats`` times; returns the trials per server."""
    trials: dict[str, list[dict[str, Any]]] = {name: [] for name in active}
    for round_index in range(bench.scale.repeats):
        for name in active:
            if round_index and name not in REPEATED:
                continue
            step = attempt(
                bench, "sweep", functools.partial(sweep_step, server=servers[name], rate=rate), name
            )
            if step is not None:
                trials[name].append(step)
    return trials


def confirmed(
    bench: Bench,
    server: ServerProcess,
    name: str,
    rate: int,
    trials: list[dict[str, Any]],
    steps: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Measure a server measured once again when its trial fell out of the sweep (on a shared
    machine another process may have stolen its core); return the sustained trial if either
    is, else both."""
    again = attempt(bench, "sweep", functools.partial(sweep_step, server=server, rate=rate), name)
    both = [*trials, *([again] if again is not None else [])]
    held = [trial for trial in both if sustained(trial, steps)]
    return held[:1] or both


def median_trial(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the trial with the median p99, recording every trial's p99 in it."""
    ranked = sorted(trials, key=lambda t: float(t["latency_ms"]["p99"]))
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["trials_p99_ms"] = [t["latency_ms"]["p99"] for t in trials]
    return chosen


def sweep_step(bench: Bench, name: str, *, server: ServerProcess, rate: int) -> dict[str, Any]:
    """Measure one server at one offered rate."""
    load = sweep_load(rate, bench.scale.warmup_s, bench.scale.step_s)
    step = bench.leangen(server, load, SERVERS[name][1])
    say(
        f"  {name:10} {rate:6} ev/s offered: achieved {step['achieved_rate']:8.1f}  "
        f"p99 {step['latency_ms']['p99']:8.2f} ms  server cpu "
        f"{step['server_cpu_percent']}%  loadgen cpu {step['loadgen_cpu_percent']}%"
    )
    return step


def fanout(bench: Bench, name: str) -> dict[str, Any]:
    """Scenario 2: many sockets open, a share of them running runs; p95/p99."""
    sockets, runs, delay = bench.scale.fanout
    window_s, idle = bench.scale.fanout_s, sockets - runs
    load = Load(runs, delay, 2, 20, warmup_s=1.0, window_s=window_s, idle=idle)
    with bench.server(name, "fanout") as server:
        result = bench.leangen(server, load, SERVERS[name][1])
    lat = result["latency_ms"]
    say(
        f"  {name:10} fanout {sockets} sockets / {runs} runs: {result['achieved_rate']} ev/s "
        f"p95 {lat['p95']} ms p99 {lat['p99']} ms"
    )
    return result


def drops(bench: Bench, name: str) -> dict[str, Any]:
    """Scenario 5: every run drops its socket mid-run and resumes; what was kept."""
    with bench.server(name, "drops") as server:
        result = bench.drops(server, SERVERS[name][1])
    say(
        f"  {name:10} drops: {result['tally']['counts']['drops']} drops, "
        f"violations {result['tally']['violations'] or 'none'}"
    )
    return result


def idle(bench: Bench, name: str) -> dict[str, Any]:
    """Scenario 3: hold idle sockets at each level and read the server's RSS per socket."""
    levels = ",".join(str(level) for level in bench.scale.idle_levels)
    with bench.server(name, "idle") as server:
        base_rss = rss_of(server.proc.pid)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.loadgen",
            "idle",
            "--url",
            server.url,
            "--levels",
            levels,
            "--out",
            str(bench.logs / f"idle-{name}.json"),
        ]
        rows = _hold_levels(cmd, bench.env, lambda: rss_of(server.proc.pid), base_rss)
    for row in rows:
        say(
            f"  {name:10} idle {row['level']:6}: alive {row['alive']}  server RSS "
            f"{row['rss_mib']} MiB = {row['kib_per_socket']} KiB/socket"
        )
    return {"base_rss_mib": round(base_rss / 2**20, 1), "levels": rows}


def _hold_levels(
    cmd: list[str], env: dict[str, str], rss: Callable[[], int], base_rss: int
) -> list[dict[str, Any]]:
    """Drive the idle generator level by level over its stdin/stdout; read RSS at each."""
    rows = []
    with subprocess.Popen(
        cmd, env=env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("HELD"):
                break
            _, level, alive, errors = line.split()
            now = rss()
            held = int(alive)
            rows.append(
                {
                    "level": int(level),
                    "alive": held,
                    "connect_errors": int(errors),
                    "rss_mib": round(now / 2**20, 1),
                    "kib_per_socket": round((now - base_rss) / 1024 / max(held, 1), 2),
                }
            )
            proc.stdin.write("next\n")
            proc.stdin.flush()
        proc.wait(timeout=120)
    return rows


def interleaved(
    bench: Bench, label: str, fn: Callable[[Bench, str], dict[str, Any]], names: tuple[str, ...]
) -> dict[str, Any]:
    """Run ``fn`` for each server, round by round; the REPEATED servers get
    ``bench.scale.repeats`` rounds and keep their median-p99 trial."""
    trials: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_index in range(bench.scale.repeats):
        for name in names:
            if round_index and name not in REPEATED:
                continue
            outcome = attempt(bench, label, fn, name)
            if outcome is not None:
                trials[name].append(outcome)
    return {name: median_trial(got) for name, got in trials.items() if got}


def run_scenarios(
    bench: Bench, chosen: tuple[str, ...], soak_minutes: float | None
) -> dict[str, Any]:
    """Run the ``chosen`` scenarios on every server; returns the results by scenario."""

    def each(label: str, fn: Callable[[Bench, str], Any], names: tuple[str, ...]) -> Any:
        found = {name: attempt(bench, label, fn, name) for name in names}
        return {name: outcome for name, outcome in found.items() if outcome is not None}

    def single(label: str, fn: Callable[[Bench], dict[str, Any]]) -> dict[str, Any]:
        return attempt(bench, label, lambda b, _: fn(b), "registry") or {}

    runners: dict[str, Callable[[], Any]] = {
        "sweep": lambda: sweep(bench),
        "fanout": lambda: interleaved(bench, "fanout", fanout, bench.servers_of(CLASSIC_SERVERS)),
        "drops": lambda: each("drops", drops, bench.servers_of(CLASSIC_SERVERS)),
        "idle": lambda: each("idle", idle, bench.servers_of(IDLE_SERVERS)),
        "active": lambda: lean_scenarios.active(bench),
        "nodes": lambda: node_scenarios.nodes(bench),
        "delivery": lambda: node_scenarios.delivery(bench),
        "soak": lambda: single(
            "soak", functools.partial(lean_scenarios.soak, minutes=soak_minutes)
        ),
        "retained": lambda: single("retained", lean_scenarios.retained),
    }
    results = {}
    for name in chosen:
        side_by_side = " (servers side by side at each rate)" if name == "sweep" else ""
        say(f"scenario {name}{side_by_side}")
        results[name] = runners[name]()
    return results


def machine(smoke: bool, started: float, chosen: tuple[str, ...], out: Path) -> dict[str, Any]:
    """Describe the run (machine, versions, limits, duration) and when each scenario of the
    results folder was last measured."""
    previous = out / "run.json"
    measured = json.loads(previous.read_text()).get("measured", {}) if previous.exists() else {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started))
    code = code_version()
    measured.update({name: f"{stamp} ({code})" for name in chosen})
    return {
        "smoke": smoke,
        "started_at": stamp,
        "duration_s": round(time.time() - started, 1),
        "scenarios": list(chosen),
        "measured": measured,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def prepare(out: Path, logs: Path) -> dict[str, str]:
    """Create the output folders, raise the fd limit (inherited by every child process) and
    return the children's environment with a fresh random JWT secret."""
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "REGISTRY_AUTH_SECRET": secrets.token_urlsafe(32), "PYTHONPATH": path}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--smoke", action="store_true", help="every scenario (soak included), small scale")
    add("--soak", action="store_true", help="run the soak and retained-memory scenarios only")
    add("--soak-minutes", type=float, default=None, help="soak window (default 15)")
    add("--only", default=None, help=f"comma-separated scenarios among {', '.join(SCENARIOS)}")
    add("--rounds", type=int, default=None, help="rounds of the active scenario (default 2)")
    add("--servers", default=None,
        help=f"comma-separated servers to measure among {', '.join(SERVERS)} (default: all)")
    add("--out", type=Path, default=None, help="results folder")
    add("--logs", type=Path, default=None,
        help="server logs and raw generator output (default: a temp folder)")
    add("--report-only", action="store_true",
        help="measure nothing: redraw the plots and REPORT.md from <out>/*.json")
    return parser.parse_args(argv)


def chosen_scenarios(args: argparse.Namespace) -> tuple[str, ...]:
    """Return the scenarios to run, in order.

    Raises:
        SystemExit: an unknown scenario name.
    """
    if args.only:
        names = tuple(name.strip() for name in args.only.split(",") if name.strip())
        unknown = [name for name in names if name not in SCENARIOS]
        if unknown:
            raise SystemExit(f"unknown scenario(s) {unknown}; choose among {SCENARIOS}")
        return names
    if args.smoke:
        return SCENARIOS
    return SOAK if args.soak else DEFAULT


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = parse_args(argv)
    out = args.out or (HERE / "results" / "smoke" if args.smoke else HERE / "results")
    report_path = out / "REPORT.md" if args.smoke or args.out else HERE / "REPORT.md"
    before = None if args.smoke else HERE / "results" / "before"
    if args.report_only:
        results = reporting.load_results(out)
        run = json.loads((out / "run.json").read_text())
        reporting.write_all(results, run, run.get("failures", []), out, report_path, before)
        return 0
    chosen = chosen_scenarios(args)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench-logs-"))
    started = time.time()
    scale = SMOKE if args.smoke else FULL
    if args.rounds:
        scale = attrs.evolve(scale, active_rounds=args.rounds)
    only = tuple(n.strip() for n in args.servers.split(",")) if args.servers else None
    if only and set(only) - SERVERS.keys():
        raise SystemExit(f"unknown server(s) {sorted(set(only) - SERVERS.keys())}")
    bench = Bench(scale, out, logs, prepare(out, logs), only=only)
    fresh = run_scenarios(bench, chosen, args.soak_minutes)
    for name, data in fresh.items():
        reporting.write_json(out, name, data)
    problems = reporting.problems(fresh, bench.failures)
    run = machine(args.smoke, started, chosen, out)
    reporting.write_all(reporting.load_results(out), run, bench.failures, out, report_path, before)
    say(f"results in {out}, report {report_path}, logs in {logs}")
    for problem in problems:
        say(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
