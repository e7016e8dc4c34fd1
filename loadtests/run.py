"""Run the Locust load test end to end: server(s), Locust, sampling, report, verdict.

``python -m loadtests.run [--users 200] [--duration 60] [--spawn-rate R] [--processes N]
[--out reports] [--server-cmd "python -m harness serve"] [--p95-ms 500] [--p99-ms 1000]
[--drop-fraction 0.1] [--agent-mix scripted:3,research:1] [--delivery-mode registry|direct]
[--nodes N] [--metrics-token T] [--compare-delivery-modes]``

It starts the server as a subprocess (``--port 0``, ``--delivery-mode``,
``REGISTRY_AUTH_SECRET`` = a fresh random secret) and waits for its ``listening on`` line,
prints the live dashboard's URL, runs Locust headless as a second subprocess, samples the
server's CPU and RSS with psutil and its ``/metrics`` now and then, stops the server with SIGINT
and writes ``<out>/<timestamp>/``: Locust's CSV files and HTML report, ``locust.log``,
``server.log``, ``raw/events-<pid>.json``, ``summary.json``, ``summary.md`` and PNG plots. It
prints the summary and exits 1 when an SLO failed (any violation, delivery below 100 %, p95/p99
above threshold, Locust or the server failing), 2 when the test could not run.

``--nodes N`` starts a throw-away ``redis-server`` and N server nodes with ``--redis-url``
(``node<i>.log``, ``redis.log``): users are spread over the nodes and every dropped user resumes
on another node; the report has a column per node and one for the whole service; everything is
stopped with SIGTERM (the nodes, then Redis). ``--compare-delivery-modes`` runs the same load
twice, ``registry`` then ``direct`` (in ``registry/`` and ``direct/``), and writes the two side
by side (``summary.md``, ``delivery_modes.png``).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtests import compare, metrics, report
from loadtests.cluster import Service, start_service
from loadtests.metrics import Snapshot
from loadtests.nodes import node_label
from loadtests.serverproc import ResourceSampler, ServerStartError
from loadtests.tally import NODE_COUNTERS

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
DEFAULT_SERVER_CMD = f"{sys.executable} -m harness serve"
DEFAULTS = {"drop_fraction": 0.1, "agent_mix": "scripted:3,research:1"}
"""Defaults of the options a comparison changes when they are not given."""
COMPARE_DEFAULTS = {"drop_fraction": 0.3, "agent_mix": "scripted:1"}
"""A comparison's defaults: more droppers, and scripted runs only, whose length the client
knows, so every event a cut run loses is counted exactly."""
METRICS_EVERY_S = 5.0
"""How often the runner reads every node's /metrics during the test (for peaks and progress)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the runner's command line."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--users", type=int, default=200, help="concurrent Locust users (default 200)")
    add("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    add("--spawn-rate", type=float, default=None, help="users started per second")
    add("--processes", type=int, default=1, help="Locust processes (>1: distributed)")
    add("--out", type=Path, default=Path("reports"), help="reports folder (default reports)")
    add("--server-cmd", default=None,
        help=f"server command (default {DEFAULT_SERVER_CMD!r}); --port 0 is appended")
    add("--p95-ms", type=float, default=500.0)
    add("--p99-ms", type=float, default=1000.0)
    add("--drop-fraction", type=float, default=None,
        help="fraction of users dropping their socket mid-run (0.1; 0.3 when comparing)")
    add("--agent-mix", default=None,
        help="agent weights (scripted:3,research:1; scripted:1 when comparing)")
    add("--stop-timeout", type=float, default=20.0,
        help="seconds users get to finish their run at the end (single process only)")
    add("--think-min-s", type=float, default=1.0)
    add("--think-max-s", type=float, default=4.0)
    add("--delivery-mode", choices=compare.MODES, default=None,
        help="the server's delivery_mode (default registry); direct = the legacy path")
    add("--compare-delivery-modes", action="store_true",
        help="run the same load with socket drops in registry, then direct mode; compare them")
    add("--nodes", type=int, default=None,
        help="start a local redis-server and N server nodes sharing it (--redis-url)")
    add("--seed", type=int, default=None,
        help="seed of the users' choices (droppers, agents, plans); a comparison picks one")
    add("--metrics-token", default=None,
        help="the servers' metrics_token (default: REGISTRY_METRICS_TOKEN, if set)")
    args = parser.parse_args(argv)
    problem = check_args(args)
    if problem:
        parser.error(problem)
    return resolve_defaults(args)


def check_args(args: argparse.Namespace) -> str | None:
    """Why the options do not go together (None when they do)."""
    if args.compare_delivery_modes and args.delivery_mode is not None:
        return "--compare-delivery-modes runs both modes: leave out --delivery-mode"
    if args.nodes is not None and args.nodes < 1:
        return "--nodes must be at least 1"
    return None


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left out: a comparison has its own drop fraction and agent mix, and a
    random seed so that both modes get the same users' choices (-1 otherwise: unseeded).

    Records which were explicit (``explicit_server_cmd``, ``explicit_delivery_mode``).
    """
    defaults = COMPARE_DEFAULTS if args.compare_delivery_modes else DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.explicit_server_cmd = args.server_cmd is not None
    args.explicit_delivery_mode = args.delivery_mode is not None
    if args.seed is None:
        args.seed = secrets.randbelow(2**31) if args.compare_delivery_modes else -1
    args.server_cmd = args.server_cmd or DEFAULT_SERVER_CMD
    args.delivery_mode = args.delivery_mode or "registry"
    return args


def server_command(args: argparse.Namespace) -> list[str]:
    """The server's command line without the port: ``--delivery-mode`` is added for the
    project's server, and for another server only when asked for explicitly (or comparing)."""
    cmd = shlex.split(args.server_cmd)
    wanted = (not args.explicit_server_cmd or args.explicit_delivery_mode
              or args.compare_delivery_modes)
    return [*cmd, "--delivery-mode", args.delivery_mode] if wanted else cmd


PASSED_THROUGH = (
    "p95_ms",
    "p99_ms",
    "drop_fraction",
    "agent_mix",
    "think_min_s",
    "think_max_s",
    "delivery_mode",
    "seed",
)
"""Runner options handed to the locustfile's options of the same name."""


def locust_cmd(args: argparse.Namespace, urls: Sequence[str] | str, out: Path) -> list[str]:
    """Return the Locust command line for a headless run writing into ``out``.

    With several node URLs (``--nodes``), the first is Locust's host and all go to
    ``--node-urls``.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    spawn_rate = args.spawn_rate or max(1.0, args.users / 10)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary"]
    cmd += ["-u", str(args.users), "-r", str(spawn_rate), "-t", f"{int(args.duration)}s"]
    cmd += ["--host", urls[0], "--csv", str(out / "locust"), "--html", str(out / "locust.html")]
    cmd += ["--events-out", str(out / "raw")]
    for name in PASSED_THROUGH:
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if getattr(args, "nodes", None):
        cmd += ["--node-urls", ",".join(urls)]
    if args.processes > 1:
        return [*cmd, "--processes", str(args.processes)]
    return [*cmd, "--stop-timeout", str(int(args.stop_timeout))]


def child_env(secret: str, metrics_token: str | None = None) -> dict[str, str]:
    """Return the environment of the servers and Locust: the secret, the metrics token when
    set, and the repo on the path."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "REGISTRY_AUTH_SECRET": secret, "PYTHONPATH": path}
    if metrics_token:
        env["REGISTRY_METRICS_TOKEN"] = metrics_token
    return env


def dashboard_banner(urls: Sequence[str], token: str | None, mode: str, out: Path) -> str:
    """The lines printed at the start: where to watch the run live."""
    links = [metrics.dashboard_url(url, token) for url in urls]
    rule = "=" * max(64, *(len(link) + 26 for link in links))
    lines = [rule]
    if len(links) == 1:
        lines.append(f"  LIVE DASHBOARD:  {links[0]}")
    else:
        lines.append("  LIVE DASHBOARDS (one per node):")
        lines += [f"    {node_label(i, urls)}:  {link}" for i, link in enumerate(links)]
    lines += [
        "  open it in a browser to watch the run "
        f"(delivery_mode {mode}; report: {out})",
        rule,
    ]
    return "\n".join(lines) + "\n"


def progress_line(
    out: Path,
    began: float,
    duration: float,
    samplers: ResourceSampler | Sequence[ResourceSampler],
    connections: Sequence[int] = (),
) -> str:
    """Return one progress line from Locust's stats history, the latest server samples (summed
    over the nodes) and, with several nodes, each node's open connections."""
    last = _last_history_row(out / "locust_stats_history.csv")
    users = last.get("User Count", "0")
    rate = float(last.get("Requests/s", 0) or 0)
    fails = last.get("Total Failure Count", "0")
    group = [samplers] if isinstance(samplers, ResourceSampler) else list(samplers)
    latest = [sampler.samples[-1] for sampler in group if sampler.samples]
    server = (
        f"cpu {sum(s.cpu_percent for s in latest):5.1f}% "
        f"rss {sum(s.rss_bytes for s in latest) / report.MIB:6.1f} MiB"
        if latest
        else "starting"
    )
    if len(connections) > 1:
        server += "  connections " + "/".join(str(c) for c in connections)
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


def scrape_all(urls: Sequence[str], token: str | None, dashboard: bool = True) -> list[Snapshot]:
    """Read every node's /metrics (and dashboard data) now."""
    return [metrics.scrape(url, token, time.time(), dashboard) for url in urls]


def run_locust(
    args: argparse.Namespace,
    service: Service,
    out: Path,
    env: dict[str, str],
    samplers: Sequence[ResourceSampler],
    token: str | None = None,
    during: list[list[Snapshot]] | None = None,
    observed: Observed | None = None,
) -> int:
    """Run Locust to completion, printing progress every few seconds and reading every node's
    /metrics into ``during`` (one list per node), and sampling Locust's own CPU and RSS into
    ``observed``; returns Locust's exit code."""
    log = (out / "locust.log").open("w")
    proc = subprocess.Popen(
        locust_cmd(args, service.urls, out),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    if observed is not None:
        observed.locust_sampler = ResourceSampler(proc.pid, 1.0)
        observed.locust_sampler.start()
    began = time.time()
    limit = began + args.duration + args.stop_timeout + 120
    while proc.poll() is None and time.time() < limit:
        try:
            proc.wait(timeout=METRICS_EVERY_S)
        except subprocess.TimeoutExpired:
            connections: list[int] = []
            if during is not None:
                for index, snap in enumerate(scrape_all(service.urls, token, dashboard=False)):
                    during[index].append(snap)
                    connections.append(int(snap.get("registry_connections_active")))
            print(progress_line(out, began, args.duration, samplers, connections), flush=True)
        if service.dead():
            print(f"server node(s) {service.dead()} exited during the test", flush=True)
            break
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)
    if observed is not None and observed.locust_sampler is not None:
        observed.locust_sampler.stop()
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
    "delivery_mode",
    "nodes",
    "seed",
)
RUN_COUNTS = {
    "started": "runs_started",
    "completed": "runs_completed",
    "failed_to_start": "runs_failed_to_start",
    "abandoned": "runs_abandoned",
    "drops": "drops",
    "unexpected_closes": "unexpected_closes",
    "cut": "runs_cut",
    "resumes": "resumes",
    "resumes_other_node": "resumes_other_node",
    "resumes_same_node": "resumes_same_node",
}


class Observed:
    """What the runner saw of the service during one test: samplers, scrapes, exit codes."""

    def __init__(self, service: Service) -> None:
        self.urls = service.urls
        self.pids = [node.proc.pid for node in service.nodes]
        self.samplers = [ResourceSampler(pid, 1.0) for pid in self.pids]
        self.redis_url = service.redis.url if service.redis else None
        self.redis_sampler = ResourceSampler(service.redis.proc.pid, 1.0) if service.redis else None
        self.before: list[Snapshot] = []
        self.after: list[Snapshot] = []
        self.during: list[list[Snapshot]] = [[] for _ in self.urls]
        self.node_exits: list[int] = []
        self.redis_exit: int | None = None
        self.locust_exit: int | None = None
        self.locust_sampler: ResourceSampler | None = None

    @property
    def all_samplers(self) -> list[ResourceSampler]:
        """The nodes' samplers, then Redis's."""
        extra = [self.redis_sampler] if self.redis_sampler else []
        return [*self.samplers, *extra]


def node_entries(
    observed: Observed, client: Mapping[int, Mapping[str, int]]
) -> list[dict[str, Any]]:
    """One report entry per node: label, URL, resources, exit code, the client's counts and
    the server's /metrics figures."""
    entries = []
    for index, url in enumerate(observed.urls):
        sampler = observed.samplers[index]
        exit_code = observed.node_exits[index] if index < len(observed.node_exits) else None
        entry: dict[str, Any] = {"label": f"node{index}", "url": url, "pid": observed.pids[index]}
        entry.update(report.server_figures(sampler.samples, exit_code))
        entry["client"] = {name: client.get(index, {}).get(name, 0) for name in NODE_COUNTERS}
        entry["metrics"] = metrics.node_figures(
            observed.before[index], observed.after[index], observed.during[index]
        )
        entries.append(entry)
    return entries


def service_entry(nodes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The whole service: the nodes' client counts and /metrics figures summed, CPU summed,
    peak RSS summed (an upper bound)."""
    return {
        "client": {name: sum(int(n["client"][name]) for n in nodes) for name in NODE_COUNTERS},
        "metrics": metrics.service_figures(n["metrics"] for n in nodes),
        "cpu_mean_percent": round(sum(n["cpu_mean_percent"] for n in nodes), 1),
        "cpu_max_percent": round(sum(n["cpu_max_percent"] for n in nodes), 1),
        "peak_rss_mib": round(sum(n["peak_rss_mib"] for n in nodes), 1),
    }


def _load_generator(sampler: ResourceSampler | None) -> dict[str, Any]:
    """Locust's own CPU and RSS (all its processes): a saturated load generator skews latency."""
    if sampler is None:
        return {}
    figures = report.server_figures(sampler.samples, None)
    return {key: figures[key] for key in ("cpu_mean_percent", "cpu_max_percent", "peak_rss_mib")}


def build_summary(
    args: argparse.Namespace, out: Path, started_at: str, observed: Observed
) -> dict[str, Any]:
    """Assemble ``summary.json`` from the raw files, the samplers, the scrapes, the exit codes."""
    tally, samples = report.load_raw(out / "raw")
    config = {key: getattr(args, key, None) for key in CONFIG_KEYS}
    config["duration_s"] = config.pop("duration")
    nodes = node_entries(observed, tally.by_node())
    service = service_entry(nodes)
    failed_exit = next((n["exit_code"] for n in nodes if n["exit_code"] != 0), 0)
    server = nodes[0] if len(nodes) == 1 else {**service, "exit_code": failed_exit}
    unreadable = all(node["metrics"]["scrape_errors"] for node in nodes)
    summary: dict[str, Any] = {
        "started_at": started_at,
        "config": config,
        "runs": {name: tally.counts[key] for name, key in RUN_COUNTS.items()},
        "events": report.event_counts(tally, samples),
        "latency_ms": report.latency_table(samples),
        "latency_ms_by_node_path": report.latency_by_node_path(out / "raw") if args.nodes else None,
        "server": {key: server[key] for key in
                   ("cpu_mean_percent", "cpu_max_percent", "peak_rss_mib", "exit_code")},
        "gc": None if unreadable else service["metrics"]["gc"],
        "locust": {
            "exit_code": observed.locust_exit,
            **_load_generator(observed.locust_sampler),
        },
        "dashboard_urls": [metrics.dashboard_url(url, None) for url in observed.urls],
        "nodes": nodes,
        "service": service,
        "redis": None,
    }
    if observed.redis_sampler is not None:
        summary["redis"] = {
            "url": observed.redis_url,
            **report.server_figures(observed.redis_sampler.samples, observed.redis_exit),
        }
    problems = report.slo_problems(summary, args.p95_ms, args.p99_ms)
    summary["slo"] = {
        "p95_ms": args.p95_ms,
        "p99_ms": args.p99_ms,
        "passed": not problems,
        "problems": problems,
    }
    write_outputs(summary, samples, observed, out)
    return summary


def write_outputs(summary: dict[str, Any], samples: Any, observed: Observed, out: Path) -> None:
    """Write summary.json, summary.md and the PNG plots."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(report.render_markdown(summary))
    report.plot_over_time(samples, out / "latency_over_time.png")
    report.plot_distribution(samples, out / "latency_distribution.png")
    if observed.redis_sampler is None and len(observed.samplers) == 1:
        report.plot_resources(observed.samplers[0].samples, out / "server_resources.png")
    else:
        series = {f"node{i}": s.samples for i, s in enumerate(observed.samplers)}
        if observed.redis_sampler is not None:
            series["redis"] = observed.redis_sampler.samples
        report.plot_resources(series, out / "server_resources.png")


def execute(args: argparse.Namespace, out: Path, started_at: str) -> dict[str, Any]:
    """Start the service, run Locust against it while sampling and scraping, stop it, build
    the summary."""
    token = metrics.metrics_token_of(args.metrics_token, args.server_cmd, os.environ)
    env = child_env(secrets.token_urlsafe(32), token)
    service = start_service(server_command(args), env, out, args.nodes)
    observed = Observed(service)
    for index, node in enumerate(service.nodes):
        print(f"{node_label(index, service.urls)}: pid {node.proc.pid}", flush=True)
    if service.redis is not None:
        print(f"redis-server {service.redis.url} (pid {service.redis.proc.pid})", flush=True)
    print(dashboard_banner(service.urls, token, args.delivery_mode, out), end="", flush=True)
    for sampler in observed.all_samplers:
        sampler.start()
    try:
        observed.before = scrape_all(service.urls, token)
        for index, snap in enumerate(observed.before):
            if snap.error:
                print(f"warning: node{index}'s figures are unreadable: {snap.error}", flush=True)
        observed.locust_exit = run_locust(
            args, service, out, env, observed.samplers, token, observed.during, observed
        )
        observed.after = scrape_all(service.urls, token)
    finally:
        for sampler in observed.all_samplers:
            sampler.stop()
        observed.node_exits, observed.redis_exit = service.stop()
    return build_summary(args, out, started_at, observed)


def run_comparison(args: argparse.Namespace, out: Path, started_at: str) -> dict[str, Any]:
    """Run the same load once per delivery mode, then write the comparison into ``out``."""
    summaries: dict[str, tuple[dict[str, Any], str]] = {}
    for mode in compare.MODES:
        mode_out = out / mode
        (mode_out / "raw").mkdir(parents=True, exist_ok=True)
        args.delivery_mode = mode
        print(f"--- delivery_mode {mode} ---", flush=True)
        summary = execute(args, mode_out, started_at)
        print(report.console_table(summary), end="", flush=True)
        summaries[mode] = (summary, mode)
    config = {key: getattr(args, key, None) for key in CONFIG_KEYS if key != "delivery_mode"}
    config["duration_s"] = config.pop("duration")
    comparison = compare.build(started_at, config, summaries)
    compare.write(comparison, out)
    return comparison


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 (pass), 1 (an SLO failed) or 2 (could not run)."""
    args = parse_args(argv)
    now = datetime.datetime.now(datetime.UTC)
    out = args.out / now.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started_at = now.isoformat(timespec="seconds")
    try:
        if args.compare_delivery_modes:
            comparison = run_comparison(args, out, started_at)
            print((out / "summary.md").read_text(), end="")
            print(f"report: {out}")
            return 0 if comparison["passed"] else 1
        (out / "raw").mkdir(exist_ok=True)
        summary = execute(args, out, started_at)
    except ServerStartError as exc:
        print(f"could not start the server: {exc}", file=sys.stderr)
        return 2
    print(report.console_table(summary), end="")
    print(f"report: {out}")
    return 0 if summary["slo"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
