"""Run the Locust load test end to end: server, Locust, sampling, report, verdict.

``python -m loadtests.run [--users 200] [--duration 60] [--spawn-rate R] [--processes N]
[--out reports] [--server-cmd "python -m harness serve"] [--p95-ms 500] [--p99-ms 1000]
[--drop-fraction 0.1] [--agent-mix scripted:3,research:1]``

It starts the server as a subprocess (``--port 0``, ``REGISTRY_AUTH_SECRET`` = a fresh random
secret) and waits for its ``listening on`` line, runs Locust headless as a second subprocess,
samples the server's CPU and RSS with psutil, stops the server with SIGINT and writes
``<out>/<timestamp>/``: Locust's CSV files and HTML report, ``locust.log``, ``server.log``,
``raw/events-<pid>.json``, ``summary.json``, ``summary.md`` and PNG plots. It prints the summary
and exits 1 when an SLO failed (any violation, delivery below 100 %, p95/p99 above threshold,
Locust or the server failing), 2 when the test could not run.

This process imports neither locust nor trio; both only ever run in subprocesses.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadtests import report
from loadtests.serverproc import ResourceSampler, ServerProcess, ServerStartError, start_server

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the runner's command line."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__)
    add = parser.add_argument
    add("--users", type=int, default=200, help="concurrent Locust users (default 200)")
    add("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    add("--spawn-rate", type=float, default=None, help="users started per second")
    add("--processes", type=int, default=1, help="Locust processes (>1: distributed)")
    add("--out", type=Path, default=Path("reports"), help="reports folder (default reports)")
    add(
        "--server-cmd",
        default=f"{sys.executable} -m harness serve",
        help="server command; --port 0 is appended",
    )
    add("--p95-ms", type=float, default=500.0)
    add("--p99-ms", type=float, default=1000.0)
    add("--drop-fraction", type=float, default=0.1)
    add("--agent-mix", default="scripted:3,research:1")
    add(
        "--stop-timeout",
        type=float,
        default=20.0,
        help="seconds users get to finish their run at the end (single process only)",
    )
    add("--think-min-s", type=float, default=1.0)
    add("--think-max-s", type=float, default=4.0)
    return parser.parse_args(argv)


PASSED_THROUGH = ("p95_ms", "p99_ms", "drop_fraction", "agent_mix", "think_min_s", "think_max_s")
"""Runner options handed to the locustfile's options of the same name."""


def locust_cmd(args: argparse.Namespace, url: str, out: Path) -> list[str]:
    """Return the Locust command line for a headless run writing into ``out``."""
    spawn_rate = args.spawn_rate or max(1.0, args.users / 10)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary"]
    cmd += ["-u", str(args.users), "-r", str(spawn_rate), "-t", f"{int(args.duration)}s"]
    cmd += ["--host", url, "--csv", str(out / "locust"), "--html", str(out / "locust.html")]
    cmd += ["--events-out", str(out / "raw")]
    for name in PASSED_THROUGH:
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.processes > 1:
        return [*cmd, "--processes", str(args.processes)]
    return [*cmd, "--stop-timeout", str(int(args.stop_timeout))]


def child_env(secret: str) -> dict[str, str]:
    """Return the environment of the server and Locust: the secret and the repo on the path."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "REGISTRY_AUTH_SECRET": secret, "PYTHONPATH": path}


def progress_line(out: Path, began: float, duration: float, sampler: ResourceSampler) -> str:
    """Return one progress line from Locust's stats history and the latest server sample."""
    last = _last_history_row(out / "locust_stats_history.csv")
    users = last.get("User Count", "0")
    rate = float(last.get("Requests/s", 0) or 0)
    fails = last.get("Total Failure Count", "0")
    sample = sampler.samples[-1] if sampler.samples else None
    server = (
        f"cpu {sample.cpu_percent:5.1f}% rss {sample.rss_bytes / report.MIB:6.1f} MiB"
        if sample
        else "starting"
    )
    elapsed = time.time() - began
    return (
        f"[{elapsed:5.0f}/{duration:.0f} s] users {users:>4}  requests/s {rate:7.1f}  "
        f"failures {fails:>4}  server {server}"
    )


def _last_history_row(path: Path) -> dict[str, str]:
    """Return the latest ``Aggregated`` row of Locust's stats history CSV, or {}."""
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("Name") == "Aggregated"]
    return rows[-1] if rows else {}


def run_locust(
    args: argparse.Namespace,
    server: ServerProcess,
    out: Path,
    env: dict[str, str],
    sampler: ResourceSampler,
) -> int:
    """Run Locust to completion, printing progress every few seconds; returns its exit code."""
    log = (out / "locust.log").open("w")
    proc = subprocess.Popen(
        locust_cmd(args, server.url, out),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    began = time.time()
    limit = began + args.duration + args.stop_timeout + 120
    while proc.poll() is None and time.time() < limit:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            print(progress_line(out, began, args.duration, sampler), flush=True)
        if server.proc.poll() is not None:
            print("server exited during the test", flush=True)
            break
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)
    return proc.returncode


CONFIG_KEYS = (
    "users",
    "duration",
    "processes",
    "drop_fraction",
    "agent_mix",
    "server_cmd",
    "p95_ms",
    "p99_ms",
)
RUN_COUNTS = {
    "started": "runs_started",
    "completed": "runs_completed",
    "failed_to_start": "runs_failed_to_start",
    "abandoned": "runs_abandoned",
    "drops": "drops",
    "unexpected_closes": "unexpected_closes",
}


def build_summary(
    args: argparse.Namespace,
    out: Path,
    started_at: str,
    exits: dict[str, int | None],
    sampler: ResourceSampler,
) -> dict[str, Any]:
    """Assemble ``summary.json`` from the raw files, the sampler and the exit codes."""
    tally, samples = report.load_raw(out / "raw")
    config = {key: getattr(args, key) for key in CONFIG_KEYS}
    config["duration_s"] = config.pop("duration")
    summary: dict[str, Any] = {
        "started_at": started_at,
        "config": config,
        "runs": {name: tally.counts[key] for name, key in RUN_COUNTS.items()},
        "events": report.event_counts(tally, samples),
        "latency_ms": report.latency_table(samples),
        "server": report.server_figures(sampler.samples, exits["server"]),
        "locust": {"exit_code": exits["locust"]},
    }
    problems = report.slo_problems(summary, args.p95_ms, args.p99_ms)
    summary["slo"] = {
        "p95_ms": args.p95_ms,
        "p99_ms": args.p99_ms,
        "passed": not problems,
        "problems": problems,
    }
    write_outputs(summary, samples, sampler, out)
    return summary


def write_outputs(
    summary: dict[str, Any], samples: Any, sampler: ResourceSampler, out: Path
) -> None:
    """Write summary.json, summary.md and the PNG plots."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(report.render_markdown(summary))
    report.plot_over_time(samples, out / "latency_over_time.png")
    report.plot_distribution(samples, out / "latency_distribution.png")
    report.plot_resources(sampler.samples, out / "server_resources.png")


def execute(args: argparse.Namespace, out: Path, started_at: str) -> dict[str, Any]:
    """Start the server, run Locust against it while sampling, stop it, build the summary."""
    env = child_env(secrets.token_urlsafe(32))
    cmd = [*shlex.split(args.server_cmd), "--port", "0"]
    server = start_server(cmd, env, out / "server.log")
    print(f"server {server.url} (pid {server.proc.pid}); writing {out}", flush=True)
    sampler = ResourceSampler(server.proc.pid, 1.0)
    sampler.start()
    try:
        locust_code = run_locust(args, server, out, env, sampler)
    finally:
        sampler.stop()
        server_code = server.stop()
    exits: dict[str, int | None] = {"locust": locust_code, "server": server_code}
    return build_summary(args, out, started_at, exits, sampler)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 (pass), 1 (an SLO failed) or 2 (could not run)."""
    args = parse_args(argv)
    now = datetime.datetime.now(datetime.UTC)
    out = args.out / now.strftime("%Y%m%d-%H%M%S")
    (out / "raw").mkdir(parents=True, exist_ok=True)
    try:
        summary = execute(args, out, now.isoformat(timespec="seconds"))
    except ServerStartError as exc:
        print(f"could not start the server: {exc}", file=sys.stderr)
        return 2
    print(report.console_table(summary), end="")
    print(f"report: {out}")
    return 0 if summary["slo"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
