"""The abuse soak (issue 9): normal chat users beside abusive clients, against one server.

``python -m benchmarks.abuse_soak --minutes 10`` (``--minutes 0.5`` for a quick check, about
two minutes in all) writes ``benchmarks/results/abuse.json``, ``abuse.md`` and ``abuse.png``
and prints the figures.

One registry server (``python -m harness serve``) runs with explicit budgets: the memory
ones lowered (``max_retained_mib`` 64, ``max_queued_mib`` 1) and the hardening settings at
their defaults, passed as flags all the same (``handshake_timeout_s`` 5,
``max_pending_handshakes`` 1000, ``max_message_bytes`` 65536, ``max_queued_messages`` 1000...).
Against it, in two phases on the same process:

1. *unabused*, ``--unabused-minutes`` (default the shorter of 3 minutes and ``--minutes``):
   ``--users`` normal chat sockets (the lean generator, :mod:`benchmarks.leangen`: each socket
   has one ``scripted`` run in flight, reads every event, checks every frame with
   :class:`loadtests.checker.ClientChecker` -- seq 1..n without gap, repeat or reorder,
   ``agent_started`` first, tools paired, one ``agent_completed`` last, no foreign run's
   event -- acks the run and starts the next; delivery latency from each event's ``ts``);
2. *abused*, ``--minutes``: the same normal users at the same rate, and the abusive clients
   of :mod:`benchmarks.abusers` in another process, for the whole window.

Measured: the normal users' runs, events, violations and latency in each phase (and p99 every
``--interval-s``), the server's RSS and CPU every ``--sample-s`` over the whole soak (its
curve against a ceiling derived from the budgets: :func:`benchmarks.abuse_report.rss_ceiling`),
what each abuse got for an answer (client side) and the server's close codes and error frames
(``/metrics`` at the phases' edges), the abusers' CPU, and the machine's load: the box is
shared. A server whose RSS passes ``--rss-abort-mib`` has its abusers stopped (recorded).
This process imports neither trio nor asyncio: every client runs in its own subprocess.
Exit status 1 when a check fails (the figures are written all the same).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, final

import attrs

from benchmarks import abuse_report, genkit
from benchmarks.abuse_tally import KINDS
from benchmarks.lean_scenarios import read_metrics
from benchmarks.run import prepare
from benchmarks.session import (
    HERE,
    REPO,
    SMOKE,
    Bench,
    Load,
    ScenarioError,
    code_version,
    say,
)
from loadtests.serverproc import ServerProcess, ServerStartError, sampling

BUDGETS: Final[dict[str, float]] = {
    "max_retained_mib": 64, "max_queued_mib": 1, "max_queued_messages": 1000,
    "max_message_bytes": 65536, "handshake_timeout_s": 5, "max_pending_handshakes": 1000,
    "max_connections_per_user": 5, "max_active_runs_per_user": 10, "close_timeout_s": 10,
}
"""The server's settings the soak passes as flags: the memory budgets lowered, the hardening
ones at their defaults."""


@attrs.frozen
class Settings:
    """The soak's shape, the server's budgets and what the abusers get on their command line."""

    minutes: float
    unabused_minutes: float
    users: int = 200
    delay_ms: int = 200
    tools: int = 2
    tokens: int = 20
    warmup_s: float = 10.0
    abuse_lead_s: float = 4.0
    interval_s: float = 5.0
    sample_s: float = 2.0
    settle_s: float = 5.0
    rss_abort_mib: float = 3072.0
    counts: tuple[str, ...] = ()
    abuser_args: tuple[str, ...] = ()
    budgets: dict[str, float] = attrs.field(factory=lambda: dict(BUDGETS))

    def server_args(self) -> list[str]:
        """Every budget as a ``harness serve`` flag."""
        return [item for name, value in self.budgets.items()
                for item in (f"--{name.replace('_', '-')}", f"{value:g}")]

    def load(self, window_s: float) -> Load:
        """The normal users' load for a window of ``window_s``, a record every interval."""
        return Load(self.users, self.delay_ms, self.tools, self.tokens, warmup_s=self.warmup_s,
                    window_s=window_s, interval_s=self.interval_s)

    def abusers_command(self, url: str, duration_s: float, out: Path) -> list[str]:
        """The abusers' command line (their limits are the server's budgets)."""
        limits = {k: v for k, v in self.budgets.items()
                  if k not in ("max_retained_mib", "max_queued_messages")}
        cmd = [sys.executable, "-m", "benchmarks.abusers", "--url", url,
               "--duration", f"{duration_s:.1f}", "--start-delay", str(self.abuse_lead_s),
               "--limits", json.dumps(limits), "--out", str(out)]
        for pair in self.counts:
            cmd += ["--count", pair]
        return [*cmd, *self.abuser_args]


@final
@attrs.define(eq=False)
class Watch:
    """Every ``every_s`` in a thread: the machine's load average and busy CPU, and a guard
    that calls :attr:`on_over` once when the server's RSS passes ``abort_mib``."""

    pid: int
    every_s: float
    abort_mib: float
    samples: list[list[float]] = attrs.field(factory=list)
    on_over: Callable[[], None] | None = None
    tripped: float | None = None
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Watch:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        busy, at = genkit.machine_busy_ticks(), time.time()
        while not self._stop.wait(self.every_s):
            now_busy, now = genkit.machine_busy_ticks(), time.time()
            cores = os.cpu_count() or 1
            percent = (now_busy - busy) / genkit.CLK_TCK / max(now - at, 1e-9) / cores * 100
            self.samples.append([now, *(round(x, 2) for x in os.getloadavg()), round(percent, 1)])
            busy, at = now_busy, now
            self._guard()

    def _guard(self) -> None:
        try:
            rss_mib = genkit.rss_bytes(self.pid) / 2**20
        except OSError:
            return
        if rss_mib > self.abort_mib and self.tripped is None:
            self.tripped = time.time()
            if self.on_over is not None:
                self.on_over()

    def summary(self, start: list[float], end: list[float]) -> dict[str, Any]:
        """The machine's figures over the soak."""
        busy = [s[4] for s in self.samples]
        return {
            "cpus": os.cpu_count(),
            "load_start": start,
            "load_end": end,
            "load1_max": max((s[1] for s in self.samples), default=None),
            "busy_percent_mean": round(sum(busy) / len(busy), 1) if busy else None,
            "samples": [[round(s[0], 1), s[1], s[4]] for s in self.samples],
            "rss_guard_tripped_at": self.tripped,
        }


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@final
@attrs.define(eq=False)
class Soak:
    """One soak: the bench (folders, environment), its settings, and what it gathered."""

    bench: Bench
    settings: Settings
    metrics: dict[str, dict[str, float]] = attrs.field(factory=dict)
    phases: dict[str, tuple[float, float]] = attrs.field(factory=dict)
    failures: list[str] = attrs.field(factory=list)

    def run(self) -> dict[str, Any]:
        """Start the server, run both phases, stop it; return the summary."""
        s, code, load_start = self.settings, code_version(), load_now()
        with (
            self.bench.server("registry", "abuse", *s.server_args()) as server,
            sampling(server.proc.pid, s.sample_s) as sampler,
            Watch(server.proc.pid, s.sample_s, s.rss_abort_mib) as watch,
        ):
            self.metrics["start"] = read_metrics(server.url)
            unabused = self.unabused(server)
            abused, abusers = self.abused(server, watch)
            time.sleep(s.settle_s)
            self.metrics["settled"] = read_metrics(server.url)
            samples = [(x.t, x.cpu_percent, x.rss_bytes) for x in sampler.samples]
        machine = watch.summary(load_start, load_now())
        return abuse_report.summarize(
            settings=self.described(code), unabused=unabused, abused=abused, abusers=abusers,
            metrics=self.metrics, rss_samples=samples, phases=self.phases, machine=machine,
            server_exit=server.exit_code, failures=self.failures,
        )

    def unabused(self, server: ServerProcess) -> dict[str, Any]:
        s = self.settings
        say(f"unabused: {s.users} users for {s.unabused_minutes * 60:.0f} s")
        began = time.time()
        result = self.bench.leangen(server, s.load(s.unabused_minutes * 60))
        self.phases["unabused"] = (began, time.time())
        self.metrics["unabused_end"] = read_metrics(server.url)
        say(f"unabused: {abuse_report.normal_users(result)['latency_ms']}")
        return result

    def abused(self, server: ServerProcess, watch: Watch) -> tuple[dict[str, Any], dict[str, Any]]:
        """The normal users and, in another process, the abusers, over the same window."""
        s = self.settings
        window_s = s.minutes * 60
        duration_s = s.warmup_s - s.abuse_lead_s + window_s
        out = self.bench.logs / "abusers.json"
        cmd = s.abusers_command(server.url, duration_s, out)
        say(f"abused: {s.users} users and the abusers for {window_s:.0f} s")
        began = time.time()
        with (self.bench.logs / "abusers.log").open("w") as log:
            proc = subprocess.Popen(cmd, env=self.bench.env, cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT)
        watch.on_over = proc.terminate
        try:
            with sampling(proc.pid, s.sample_s) as abuser_cpu:
                result = self.bench.leangen(server, s.load(window_s))
                self.wait(proc, duration_s + s.abuse_lead_s + 120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.phases["abused"] = (began, time.time())
        self.metrics["abused_end"] = read_metrics(server.url)
        abusers: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
        if "started" in abusers:
            self.phases["abuse"] = (abusers["started"], abusers["ended"])
        if not abusers:
            self.failures.append(f"the abusers wrote no result (exit {proc.returncode}); see "
                                 f"{self.bench.logs / 'abusers.log'}")
        abusers["cpu_percent"] = round(abuser_cpu.mean_cpu, 1)
        if watch.tripped is not None:
            self.failures.append(f"server RSS passed {s.rss_abort_mib} MiB: abusers stopped")
        say(f"abused: {abuse_report.normal_users(result)['latency_ms']}")
        return result, abusers

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.failures.append(f"the abusers ran past {timeout:.0f} s: killed")

    def described(self, code: str) -> dict[str, Any]:
        """The settings as the report shows them."""
        s = self.settings
        return {
            **attrs.asdict(s),
            "code": code,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python -m benchmarks.abuse_soak " + " ".join(sys.argv[1:]),
            "server_args": ["python -m harness serve", *s.server_args()],
            "unabused_s": round(s.unabused_minutes * 60, 1),
            "abused_s": round(s.minutes * 60, 1),
            "sockets_per_user": genkit.SOCKETS_PER_USER,
            "context": {"tools": s.tools, "tokens": s.tokens, "delay_ms": s.delay_ms},
            "offered_events_per_s": round(s.users * 1000 / s.delay_ms, 1),
        }


def plot(summary: dict[str, Any], path: Path) -> None:
    """Draw the server's RSS over the soak (with its ceiling) and the normal users' p99 per
    interval (placed after each phase's warm-up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rss, settings = summary["rss"], summary["settings"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.plot([p[0] for p in rss["curve"]], [p[1] for p in rss["curve"]], label="server RSS")
    top.axhline(rss["ceiling_mib"], color="red", linestyle="--", label="ceiling")
    colors = {"unabused": "tab:green", "abused": "tab:orange", "abuse": "tab:red"}
    for name, (start, end) in rss["phases_s"].items():
        color = colors.get(name, "tab:gray")
        label = "abusers at work" if name == "abuse" else f"{name} phase"
        top.axvspan(start, end, alpha=0.1, color=color, label=label)
        if name not in summary["normal"]:
            continue
        series = summary["normal"][name]["p99_by_interval_ms"]
        offset = start + settings["warmup_s"]
        bottom.plot([offset + t for t, _ in series], [ms for _, ms in series], marker=".",
                    color=color, label=f"p99 {name}")
    top.set_ylabel("MiB")
    top.legend(loc="upper left")
    bottom.set_ylabel("p99 ms (per interval)")
    bottom.set_xlabel("seconds since the soak began")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(summary: dict[str, Any], out: Path, name: str, notes: Sequence[str] = ()) -> list[str]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png``; return the findings (the
    figures', then ``notes``: what a person found out about them)."""
    found = [*abuse_report.findings(summary), *notes]
    summary = {**summary, "findings": found}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / f"{name}.md").write_text(abuse_report.markdown(summary, found))
    try:
        plot(summary, out / f"{name}.png")
    except (ImportError, ValueError, KeyError) as exc:
        say(f"no plot: {exc!r}")
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abuse_soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--minutes", type=float, default=10.0, help="the abused phase (default 10)")
    add("--unabused-minutes", type=float, default=None,
        help="the unabused phase (default: the shorter of 3 and --minutes)")
    add("--users", type=int, default=200, help="normal chat sockets (default 200)")
    add("--delay-ms", type=int, default=200, help="their scripted delay_ms (default 200)")
    add("--warmup-s", type=float, default=10.0, help="each phase's warm-up before its window")
    add("--interval-s", type=float, default=5.0, help="a latency record every S s")
    add("--sample-s", type=float, default=2.0, help="server RSS and CPU every S s")
    add("--settle-s", type=float, default=5.0,
        help="seconds after the abuse before the last /metrics reading")
    for budget, default in BUDGETS.items():
        add(f"--{budget.replace('_', '-')}", type=float, default=default,
            help=f"server setting (default {default})")
    add("--count", action="append", default=[], metavar="KIND=N",
        help=f"abusers of one kind, among {', '.join(KINDS)} (see benchmarks.abusers)")
    add("--abusers-args", default="", help="more arguments for benchmarks.abusers (quoted)")
    add("--rss-abort-mib", type=float, default=3072.0,
        help="stop the abusers when the server's RSS passes this (safety)")
    add("--out", type=Path, default=HERE / "results", help="results folder")
    add("--name", default="abuse", help="results file names: <name>.json|md|png")
    add("--logs", type=Path, default=None, help="server and client logs (default: a temp dir)")
    add("--report-only", action="store_true",
        help="measure nothing: rewrite <name>.md and .png (and the findings) from <name>.json")
    add("--note", action="append", default=[],
        help="a finding to add to the report (repeatable), e.g. a diagnosis of the figures")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    budgets = {name: getattr(args, name) for name in BUDGETS}
    unabused = args.unabused_minutes
    return Settings(
        minutes=args.minutes,
        unabused_minutes=min(3.0, args.minutes) if unabused is None else unabused,
        users=args.users, delay_ms=args.delay_ms, warmup_s=args.warmup_s,
        abuse_lead_s=min(4.0, args.warmup_s / 2), interval_s=args.interval_s,
        sample_s=args.sample_s, settle_s=args.settle_s, rss_abort_mib=args.rss_abort_mib,
        counts=tuple(args.count),
        abuser_args=tuple(shlex.split(args.abusers_args)), budgets=budgets,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run the soak, write and print its figures."""
    args = parse_args(argv)
    if args.report_only:
        summary = json.loads((args.out / f"{args.name}.json").read_text())
        summary.pop("findings", None)
        for finding in write(summary, args.out, args.name, args.note):
            say(f"FINDING: {finding}")
        return 0 if summary["ok"] else 1
    settings = settings_of(args)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="abuse-soak-"))
    bench = Bench(SMOKE, args.out, logs, prepare(args.out, logs))
    say(f"abuse soak: unabused {settings.unabused_minutes} min, abused {settings.minutes} min, "
        f"{settings.users} users; logs in {logs}")
    try:
        summary = Soak(bench, settings).run()
    except (ScenarioError, ServerStartError, subprocess.TimeoutExpired) as exc:
        say(f"FAILED: {exc}")
        (args.out / f"{args.name}-failed.json").write_text(json.dumps({"failure": str(exc)}))
        return 1
    found = write(summary, args.out, args.name, args.note)
    for line in abuse_report.summary_lines(summary):
        say(line)
    for finding in found:
        say(f"FINDING: {finding}")
    say(f"results: {args.out / (args.name + '.json')}, {args.out / (args.name + '.md')}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
