"""One benchmark session: its scale, output folders, environment, servers and load generators.

Shared by the scenarios of :mod:`benchmarks.run` (sweep, fan-out, idle, drops; trio generator),
of :mod:`benchmarks.lean_scenarios` (active, soak, retained memory; lean generator) and of
:mod:`benchmarks.node_scenarios` (nodes on one Redis, delivery modes). Also the sweep's rule
(:func:`sustained`), which the node ramp applies too. Servers and generators always run as
subprocesses: this process imports neither trio nor asyncio.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import attrs

from loadtests.serverproc import ServerProcess, ServerStartError, running_server, sampling

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SERVERS: dict[str, tuple[list[str], str]] = {
    "registry": (["-m", "harness", "serve"], "native"),
    "baseline": (["-m", "benchmarks.baseline_trio"], "native"),
    "websockets": (["-m", "benchmarks.peer_websockets"], "native"),
    "socketio": (["-m", "benchmarks.peer_socketio"], "socketio"),
    "fastapi": (["-m", "harness", "serve", "--server", "fastapi"], "native"),
}
"""Server name -> (python arguments, wire flavor). ``registry`` is this project's trio server,
``fastapi`` the same registry behind FastAPI/asyncio (when ``harness serve`` has it)."""
OURS = ("registry", "fastapi")
"""The project's own servers: the registry's settings flags apply, every guarantee must hold."""


@attrs.frozen
class Load:
    """What the lean generator does: sockets each with one ``scripted`` run in flight."""

    sockets: int
    delay_ms: int
    tools: int = 2
    tokens: int = 20
    warmup_s: float = 5.0
    window_s: float = 30.0
    interval_s: float = 0.0
    runs_per_socket: int = 0
    token_bytes: int = 0
    idle: int = 0
    ack: bool = True
    """Ack each run at its end, letting the server trim its retained events (clients do)."""

    @property
    def events_per_run(self) -> int:
        """3 + 2 x tools + tokens."""
        return 3 + 2 * self.tools + self.tokens

    def args(self) -> list[str]:
        """Return the generator's command-line arguments."""
        pairs = {
            "--sockets": self.sockets,
            "--delay-ms": self.delay_ms,
            "--tools": self.tools,
            "--tokens": self.tokens,
            "--warmup": self.warmup_s,
            "--duration": self.window_s,
            "--interval": self.interval_s,
            "--runs-per-socket": self.runs_per_socket,
            "--token-bytes": self.token_bytes,
            "--idle": self.idle,
        }
        args = [str(item) for pair in pairs.items() for item in pair]
        return args if self.ack else [*args, "--no-ack"]


P99_LIMIT_MS = 50.0
SATURATED = 0.8
"""A step whose achieved/offered ratio is below this fraction of the server's ratio at the
lowest rate is saturated."""
SWEEP_DELAY_MS = 10
"""The sweep's runs emit an event every 10 ms: R events/s offered = R / 100 sockets."""


def sweep_load(rate: int, warmup_s: float, window_s: float) -> Load:
    """Return the sweep's load at ``rate`` events/s offered: R x 10 / 1000 sockets, each with
    a run of 2 tools and 40 tokens, an event every 10 ms."""
    runs = max(1, round(rate * SWEEP_DELAY_MS / 1000))
    return Load(runs, SWEEP_DELAY_MS, 2, 40, warmup_s=warmup_s, window_s=window_s)


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


@attrs.frozen
class NodesScale:
    """How big the node-scaling scenario is: per service, a fixed load then a ramp."""

    counts: tuple[int, ...]
    """Node counts on one Redis (the in-memory single node is always measured too)."""
    load: Load
    """The fixed offered load (the ``active`` shape), its window two run lengths long."""
    rates: tuple[int, ...]
    """The ramp's offered rates (the sweep's load), up to the first not sustained."""
    step_s: float
    warmup_s: float


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
    active: Load
    soak: Load
    retained: Load
    repeats: int = 1
    active_rounds: int = 1
    nodes: NodesScale = attrs.field(kw_only=True)


FULL = Scale(
    rates=(500, 1000, 2000, 3000, 4000, 6000, 8000, 10000, 12000, 15000, 20000),
    step_s=5.0,
    warmup_s=1.0,
    fanout=(1000, 200, 80),
    fanout_s=10.0,
    idle_levels=(1000, 5000, 10000),
    drops_rate=1000,
    drops_s=6.0,
    active=Load(1000, 500, 2, 20, warmup_s=5.0, window_s=30.0),
    soak=Load(750, 500, 2, 20, warmup_s=5.0, window_s=15 * 60.0, interval_s=10.0, ack=False),
    retained=Load(100, 0, 2, 50, warmup_s=0.0, window_s=300.0, runs_per_socket=20, ack=False),
    repeats=3,
    active_rounds=2,
    nodes=NodesScale(
        counts=(1, 2, 3),
        load=Load(1000, 500, 2, 20, warmup_s=5.0, window_s=27.0),  # 2 runs of 13.5 s
        rates=(1000, 2000, 3000, 4000, 5000, 6000, 8000, 10000, 12000, 14000),
        step_s=5.0,
        warmup_s=1.0,
    ),
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
    active=Load(100, 200, 2, 4, warmup_s=1.0, window_s=5.0),
    soak=Load(100, 200, 2, 4, warmup_s=1.0, window_s=15.0, interval_s=3.0, ack=False),
    retained=Load(40, 0, 2, 20, warmup_s=0.0, window_s=60.0, runs_per_socket=10, ack=False),
    nodes=NodesScale(
        counts=(1, 2, 3),
        load=Load(60, 200, 2, 4, warmup_s=1.0, window_s=4.4),  # 2 runs of 2.2 s
        rates=(1000, 3000),
        step_s=1.0,
        warmup_s=0.5,
    ),
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
    #: Only these servers are measured (None: every server of each scenario).
    only: tuple[str, ...] | None = None

    def servers_of(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Return the servers of ``names`` this session measures, in order."""
        return tuple(name for name in names if self.only is None or name in self.only)

    def server(self, name: str, tag: str, *extra: str) -> AbstractContextManager[ServerProcess]:
        """Run server ``name`` (``--port 0`` and ``extra`` arguments) for a ``with`` block,
        logging to ``<logs>/<name>-<tag>.log``; it is stopped with SIGINT at the end."""
        cmd = [sys.executable, *SERVERS[name][0], "--port", "0", *extra]
        return running_server(cmd, self.env, self.logs / f"{name}-{tag}.log")

    def drops(self, server: ServerProcess, flavor: str) -> dict[str, Any]:
        """Run the trio generator's ``drops`` mode (every run drops its socket mid-run and
        resumes) at the scale's rate for its window; returns its JSON.

        Raises:
            ScenarioError: when the generator fails; subprocess.TimeoutExpired after 300 s.
        """
        scale = self.scale
        return self.loadgen(
            server, flavor, "drops", "--rate", str(scale.drops_rate), "--delay-ms", "10",
            "--tokens", "40", "--duration", str(scale.drops_s), "--warmup", "0.5",
        )

    def loadgen(self, server: ServerProcess, flavor: str, mode: str, *extra: str) -> dict[str, Any]:
        """Run the trio generator against ``server``; returns its JSON plus server CPU/RSS.

        Raises:
            ScenarioError: when the generator fails; subprocess.TimeoutExpired after 300 s.
        """
        cmd = [sys.executable, "-m", "benchmarks.loadgen", mode, "--url", server.url]
        cmd += ["--flavor", flavor, *extra]
        with sampling(server.proc.pid, 0.5) as sampler:
            data = self._generate(cmd, 300)
        data["server_cpu_percent"] = round(sampler.mean_cpu, 1)
        data["server_peak_rss_mib"] = round(sampler.peak_rss / 2**20, 1)
        return data

    def leangen(
        self,
        server: ServerProcess | Sequence[ServerProcess],
        load: Load,
        flavor: str = "native",
        *,
        redis: str | None = None,
    ) -> dict[str, Any]:
        """Run the lean generator against ``server`` (it reads the server's /proc and /metrics);
        ``server_cpu_percent`` in the result is the server's CPU over the window.

        Several servers (the nodes of one service): the sockets go round robin over them and
        their CPU is summed; ``redis`` (``HOST:PORT``) is the Redis they share, whose counters
        the generator reads at the window's edges.

        Raises:
            ScenarioError: when the generator fails or runs past its bound.
        """
        servers = [server] if isinstance(server, ServerProcess) else list(server)
        urls = ",".join(s.url for s in servers)
        cmd = [sys.executable, "-m", "benchmarks.leangen", "--url", urls, "--flavor", flavor]
        cmd += ["--server-pid", ",".join(str(s.proc.pid) for s in servers), *load.args()]
        if redis is not None:
            cmd += ["--redis", redis]
        run_s = load.events_per_run * load.delay_ms / 1000
        data = self._generate(cmd, 120 + load.warmup_s + load.window_s + 3 * run_s)
        window = data.get("window") or {}
        data["server_cpu_percent"] = window.get("server_cpu_percent")
        data["cpu_us_per_event"] = window.get("cpu_us_per_event")
        return data

    def _generate(self, cmd: list[str], timeout: float) -> dict[str, Any]:
        """Run one generator command with ``--out``; return its JSON."""
        result_path = self.logs / f"loadgen-{secrets.token_hex(4)}.json"
        cmd = [*cmd, "--out", str(result_path)]
        try:
            done = subprocess.run(
                cmd, env=self.env, cwd=REPO, timeout=timeout, check=False,
                capture_output=True, text=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise ScenarioError(f"{' '.join(cmd)} ran past {timeout:.0f} s") from exc
        if done.returncode != 0 or not result_path.exists():
            raise ScenarioError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-800:]}")
        data: dict[str, Any] = json.loads(result_path.read_text())
        return data


def say(text: str) -> None:
    """Print one progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def attempt(bench: Bench, label: str, fn: Callable[[Bench, str], T], name: str) -> T | None:
    """Run one scenario for one server; a failure is recorded and the session goes on."""
    try:
        return fn(bench, name)
    except (ScenarioError, ServerStartError, subprocess.TimeoutExpired) as exc:
        bench.failures.append(f"{label} {name}: {exc}"[:1000])
        say(f"  {name:10} {label} FAILED: {str(exc)[:300]}")
        return None


def code_version() -> str:
    """Return the commit of the code under test, plus a short hash of how ``harness/`` and
    ``registry/`` differ from it when they do (``a770bd4+3f2c1d``): the servers are measured
    as they are on disk, edits in progress included."""

    def git(*args: str) -> bytes:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, timeout=30)
        return done.stdout

    head = git("rev-parse", "--short", "HEAD").decode().strip() or "unknown"
    digest = hashlib.sha1(git("diff", "HEAD", "--", "harness", "registry"))
    for name in sorted(git("ls-files", "-o", "--exclude-standard", "harness", "registry").split()):
        digest.update(name + (REPO / name.decode()).read_bytes())
    dirty = digest.hexdigest() != hashlib.sha1().hexdigest()
    return f"{head}+{digest.hexdigest()[:6]}" if dirty else head


def missing_server(name: str, env: dict[str, str]) -> str | None:
    """Return why server ``name`` cannot run here (``fastapi``: ``harness serve`` has no
    ``--server fastapi`` yet), or None when it can."""
    if name != "fastapi":
        return None
    cmd = [sys.executable, "-m", "harness", "serve", "--help"]
    shown = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    if "fastapi" not in shown.stdout:
        return "`python -m harness serve --server fastapi` does not exist yet"
    return None
