"""Run every benchmark side by side in one go: ``python -m benchmarks.run [--smoke] [--out DIR]``.

For each server (the registry's ``python -m harness serve``, the bare trio baseline, the
``websockets`` peer and the python-socketio peer) it starts the server as a subprocess and drives
it with :mod:`benchmarks.loadgen` in another subprocess, sampling the server with psutil:

1. ``sweep``: latency p50/p95/p99 vs offered event rate, servers side by side at each rate, up
   to the first rate whose p99 passes 50 ms (or that saturates the server) -> max sustained rate;
2. ``fanout``: 1,000 sockets with 200 concurrent runs at >= 2,000 events/s -> p95/p99;
3. ``idle``: 1k / 5k / 10k idle sockets -> server RSS per socket (registry and baseline);
4. ``overhead``: registry vs baseline (ratios of max sustained rate and of p99), from 1 and 2;
5. ``drops``: every run drops its socket mid-run and resumes -> which guarantees each kept.

Results: ``<out>/*.json``, ``<out>/*.png`` and ``REPORT.md`` (full run: ``benchmarks/results/``
and ``benchmarks/REPORT.md``; ``--smoke``: ``benchmarks/results/smoke/`` with its REPORT.md).
``--smoke`` runs every scenario at small scale in about two minutes. Exit status 1 when a
scenario could not run or the registry broke a delivery guarantee; the latency goals are
reported, not enforced (the machine is shared and noisy).

This process imports neither trio nor locust.
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
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import attrs

from benchmarks import reporting
from loadtests.serverproc import (
    ServerProcess,
    ServerStartError,
    rss_of,
    running_server,
    sampling,
)

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
P99_LIMIT_MS = 50.0
SATURATED = 0.8
"""A step whose achieved/offered ratio is below this fraction of the server's ratio at the
lowest rate is saturated."""

SERVERS: dict[str, tuple[list[str], str]] = {
    "registry": (["-m", "harness", "serve"], "native"),
    "baseline": (["-m", "benchmarks.baseline_trio"], "native"),
    "websockets": (["-m", "benchmarks.peer_websockets"], "native"),
    "socketio": (["-m", "benchmarks.peer_socketio"], "socketio"),
}
IDLE_SERVERS = ("registry", "baseline")
REPEATED = ("registry", "baseline")
"""Servers whose sweep steps are repeated (their ratio is a headline figure)."""


@attrs.frozen
class Scale:
    """How big each scenario is."""

    rates: tuple[int, ...]
    step_s: float
    warmup_s: float
    fanout: tuple[int, int, int]
    fanout_s: float
    idle_levels: tuple[int, ...]
    drops_rate: int
    drops_s: float
    repeats: int = 1


FULL = Scale(
    rates=(500, 1000, 2000, 3000, 4000, 6000, 8000, 10000, 12000, 15000, 20000),
    step_s=5.0,
    warmup_s=1.0,
    fanout=(1000, 200, 80),
    fanout_s=10.0,
    idle_levels=(1000, 5000, 10000),
    drops_rate=1000,
    drops_s=6.0,
    repeats=3,
)
SMOKE = Scale(
    rates=(500, 2000),
    step_s=1.5,
    warmup_s=0.5,
    fanout=(100, 20, 80),
    fanout_s=2.0,
    idle_levels=(50, 100, 200),
    drops_rate=300,
    drops_s=2.0,
)


class ScenarioError(RuntimeError):
    """A load generator failed or timed out."""


@attrs.define(eq=False)
class Bench:
    """One benchmark session: scale, output folder, secret and the processes' environment."""

    scale: Scale
    out: Path
    logs: Path
    env: dict[str, str]
    failures: list[str] = attrs.field(factory=list)

    def server(self, name: str, tag: str) -> AbstractContextManager[ServerProcess]:
        """Run server ``name`` (``--port 0``) for a ``with`` block, logging to
        ``<out>/logs/<name>-<tag>.log``; it is stopped with SIGINT at the end."""
        cmd = [sys.executable, *SERVERS[name][0], "--port", "0"]
        return running_server(cmd, self.env, self.logs / f"{name}-{tag}.log")

    def loadgen(self, server: ServerProcess, flavor: str, mode: str, *extra: str) -> dict[str, Any]:
        """Run one load generator against ``server``; returns its JSON plus server CPU/RSS.

        Raises:
            ScenarioError: when the generator fails; subprocess.TimeoutExpired after 300 s.
        """
        result_path = self.logs / f"loadgen-{secrets.token_hex(4)}.json"
        cmd = [sys.executable, "-m", "benchmarks.loadgen", mode, "--url", server.url]
        cmd += ["--flavor", flavor, "--out", str(result_path), *extra]
        with sampling(server.proc.pid, 0.5) as sampler:
            done = subprocess.run(
                cmd,
                env=self.env,
                cwd=REPO,
                timeout=300,
                check=False,
                capture_output=True,
                text=True,
            )
        if done.returncode != 0 or not result_path.exists():
            raise ScenarioError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-800:]}")
        data: dict[str, Any] = json.loads(result_path.read_text())
        data["server_cpu_percent"] = round(sampler.mean_cpu, 1)
        data["server_peak_rss_mib"] = round(sampler.peak_rss / 2**20, 1)
        return data


def say(text: str) -> None:
    """Print one progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def sweep(bench: Bench) -> dict[str, dict[str, Any]]:
    """Scenario 1, all servers side by side: at each offered rate, one step per server still
    sustaining (registry and baseline: ``repeats`` interleaved trials, the median p99 kept),
    until its p99 passes 50 ms or it saturates."""
    steps: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        servers = start_all(bench, stack, "sweep")
        steps = {name: [] for name in servers}
        for rate in bench.scale.rates:
            active = [n for n in servers if all(sustained(s, steps[n]) for s in steps[n])]
            for name, trials in measure_rate(bench, servers, active, rate).items():
                if trials:
                    steps[name].append(median_trial(trials))
                else:
                    del servers[name]
    return {n: {"steps": s, "max_sustained_rate": max_sustained(s)} for n, s in steps.items()}


def start_all(bench: Bench, stack: contextlib.ExitStack, tag: str) -> dict[str, ServerProcess]:
    """Start every server at once (stopped when ``stack`` closes); skip those that fail."""
    servers = {}
    for name in SERVERS:
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


def median_trial(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the trial with the median p99, recording every trial's p99 in it."""
    ranked = sorted(trials, key=lambda t: float(t["latency_ms"]["p99"]))
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["trials_p99_ms"] = [t["latency_ms"]["p99"] for t in trials]
    return chosen


def sweep_step(bench: Bench, name: str, *, server: ServerProcess, rate: int) -> dict[str, Any]:
    """Measure one server at one offered rate."""
    scale = bench.scale
    step = bench.loadgen(
        server,
        SERVERS[name][1],
        "rate",
        "--rate",
        str(rate),
        "--delay-ms",
        "10",
        "--tokens",
        "40",
        "--duration",
        str(scale.step_s),
        "--warmup",
        str(scale.warmup_s),
    )
    say(
        f"  {name:10} {rate:6} ev/s offered: achieved {step['achieved_rate']:8.1f}  "
        f"p99 {step['latency_ms']['p99']:8.2f} ms  server cpu "
        f"{step['server_cpu_percent']:5.1f}%  loadgen cpu {step['loadgen_cpu_percent']}%"
    )
    return step


def sustained(step: dict[str, Any], steps: list[dict[str, Any]]) -> bool:
    """Return True when a sweep step kept p99 <= 50 ms and was not saturated.

    Saturated: its achieved/offered ratio fell below 80 % of the server's ratio at the first
    (lowest) rate; normalising so removes each server's fixed pacing overhead (closed loop:
    sleep overshoot, the gap between two runs) from the verdict.
    """

    def ratio(s: dict[str, Any]) -> float:
        return float(s["achieved_rate"]) / max(float(s["offered_rate"]), 1e-9)

    first = steps[0] if steps else step
    fast = float(step["latency_ms"]["p99"]) <= P99_LIMIT_MS
    return fast and ratio(step) >= SATURATED * ratio(first)


def max_sustained(steps: list[dict[str, Any]]) -> float:
    """Return the highest achieved rate among the sustained steps (0 when none)."""
    return max((float(s["achieved_rate"]) for s in steps if sustained(s, steps)), default=0.0)


def fanout(bench: Bench, name: str) -> dict[str, Any]:
    """Scenario 2: many sockets open, a share of them running runs; p95/p99."""
    sockets, runs, delay = bench.scale.fanout
    with bench.server(name, "fanout") as server:
        result = bench.loadgen(
            server,
            SERVERS[name][1],
            "fanout",
            "--sockets",
            str(sockets),
            "--runs",
            str(runs),
            "--delay-ms",
            str(delay),
            "--duration",
            str(bench.scale.fanout_s),
            "--warmup",
            "1",
        )
    lat = result["latency_ms"]
    say(
        f"  {name:10} fanout {sockets} sockets / {runs} runs: {result['achieved_rate']} ev/s "
        f"p95 {lat['p95']} ms p99 {lat['p99']} ms"
    )
    return result


def drops(bench: Bench, name: str) -> dict[str, Any]:
    """Scenario 5: every run drops its socket mid-run and resumes; what was kept."""
    scale = bench.scale
    with bench.server(name, "drops") as server:
        result = bench.loadgen(
            server,
            SERVERS[name][1],
            "drops",
            "--rate",
            str(scale.drops_rate),
            "--delay-ms",
            "10",
            "--tokens",
            "40",
            "--duration",
            str(scale.drops_s),
            "--warmup",
            "0.5",
        )
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


def attempt(bench: Bench, label: str, fn: Callable[[Bench, str], T], name: str) -> T | None:
    """Run one scenario for one server; a failure is recorded and the session goes on."""
    try:
        return fn(bench, name)
    except (ScenarioError, ServerStartError, subprocess.TimeoutExpired) as exc:
        bench.failures.append(f"{label} {name}: {exc}"[:1000])
        say(f"  {name:10} {label} FAILED: {str(exc)[:300]}")
        return None


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


def run_all(bench: Bench) -> dict[str, Any]:
    """Run every scenario on every server; returns the results by scenario and server."""
    say("scenario sweep (servers side by side at each rate)")
    results: dict[str, dict[str, Any]] = {"sweep": sweep(bench)}
    say("scenario fanout")
    results["fanout"] = interleaved(bench, "fanout", fanout, tuple(SERVERS))
    for label, fn in (("drops", drops), ("idle", idle)):
        say(f"scenario {label}")
        results[label] = {}
        for name in IDLE_SERVERS if label == "idle" else tuple(SERVERS):
            outcome = attempt(bench, label, fn, name)
            if outcome is not None:
                results[label][name] = outcome
    return results


def machine(smoke: bool, started: float) -> dict[str, Any]:
    """Describe the run: machine, versions, limits, duration."""
    return {
        "smoke": smoke,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="every scenario, small scale")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="server logs and raw generator output (default: a temp folder)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: redraw the plots and REPORT.md from <out>/*.json",
    )
    return parser.parse_args(argv)


def rerender(out: Path, report_path: Path) -> list[str]:
    """Rewrite plots and report from the JSON of a previous run; returns its problems."""
    results = {
        name: json.loads((out / f"{name}.json").read_text())
        for name in ("sweep", "fanout", "idle", "drops")
    }
    run = json.loads((out / "run.json").read_text())
    return reporting.write_all(results, run, run.get("failures", []), out, report_path)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = parse_args(argv)
    out = args.out or (HERE / "results" / "smoke" if args.smoke else HERE / "results")
    report_path = out / "REPORT.md" if args.smoke or args.out else HERE / "REPORT.md"
    if args.report_only:
        return 1 if rerender(out, report_path) else 0
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench-logs-"))
    started = time.time()
    bench = Bench(SMOKE if args.smoke else FULL, out, logs, prepare(out, logs))
    results = run_all(bench)
    problems = reporting.write_all(
        results, machine(args.smoke, started), bench.failures, out, report_path
    )
    say(f"results in {out}, report {report_path}, logs in {logs}")
    for problem in problems:
        say(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
