"""The operations surface both servers share: health, readiness, Prometheus metrics, the dashboard.

:class:`Operations` keeps what only a transport sees (sockets closed by code, error frames by
code, resumes by outcome, the delivery latency of every event frame written) beside the
registry's own counters, and answers the HTTP routes of PROTOCOL.md v2 from both. Metrics
are written by prometheus-client from a collector registry of this server's own (never the
global default), built from the counters at scrape time, so the event path pays one list
append and one bisect per frame for them. No label and no figure carries a user, run,
request or thread id, or any message text.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import json
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any, Final, Literal, final

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from harness._auth import AuthError, token_from_request
from harness._http import REFUSALS
from registry import AgentExecutionRegistry, Config, RunStatus

__all__ = ["JSON", "METRICS_CONTENT_TYPE", "ROUTES", "TEXT", "CollectorPauses", "HeapKeeper",
           "Operations", "dashboard_html", "freeze_startup_heap"]

METRICS_CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
JSON: Final = "application/json"
TEXT: Final = "text/plain; charset=utf-8"
#: Upper bounds (seconds) of the delivery-latency histogram's buckets.
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                          1.0, 2.5, 5.0, 10.0)
#: Upper bounds (seconds) of the collector-pause histogram's buckets: a reader of two scrapes
#: knows how many pauses in between were longer than each (the longest-pause gauge only
#: says what happened since the server started).
GC_PAUSE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: How many seconds of one-per-second samples the dashboard's charts show.
HISTORY_S: Final = 300
#: Most latencies kept per sample interval for its percentiles (the rest are only counted).
_MAX_INTERVAL_SAMPLES: Final = 50_000

Readiness = Literal["starting", "ready", "draining"]


def freeze_startup_heap() -> None:
    """Moves every object alive after start-up (modules, classes, the app) out of the cyclic
    garbage collector's sight, so a full collection only walks what serving creates.

    Call once, when the server is ready. What start-up created lives as long as the process
    does anyway, so nothing that could be collected is kept.
    """
    gc.collect()
    gc.freeze()


@final
class HeapKeeper:
    """Keeps the cyclic garbage collector's pauses short while the server serves.

    A full collection walks every tracked object: with a thousand sockets and their runs
    that is over 100,000 objects and a pause of about 100 ms. Objects that have lived
    ``freeze_every_s`` are moved out of its sight (``gc.freeze()``), so it only walks what
    is younger. Frozen objects are still freed by reference counting; only a reference
    cycle among them would outlive its use, and serving creates none (a test checks it).
    As a safety valve, when the frozen population has grown ``audit_growth`` times since
    the last audit (and at least ``audit_every_s`` passed), they are unfrozen and
    collected once: a pause of a full collection (250 ms at 7,000 retained runs), so the
    first measure is taken only ``audit_every_s`` into serving, under load — growing from an
    idle start to a steady load is not a leak, and a steady heap is never audited.
    """

    def __init__(self, freeze_every_s: float = 1.0, audit_growth: float = 2.0,
                 audit_every_s: float = 600.0, check_every: int = 60) -> None:
        self.freeze_every_s = freeze_every_s
        self.audit_growth = audit_growth
        self.audit_every_s = audit_every_s
        #: The frozen population is counted (a walk of it) only every this many freezes.
        self.check_every = check_every
        self.audits = 0

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Freezes what lived a while, every ``freeze_every_s``, until cancelled."""
        freeze_startup_heap()
        baseline: int | None = None  # the frozen population measured under load
        audited_at = time.monotonic()
        task_status.started()
        freezes = 0
        while True:
            freezes += 1
            await anyio.sleep(self.freeze_every_s)
            gc.freeze()
            if freezes % self.check_every or time.monotonic() - audited_at < self.audit_every_s:
                continue
            if baseline is None:
                baseline, audited_at = gc.get_freeze_count(), time.monotonic()
            elif gc.get_freeze_count() > self.audit_growth * baseline:
                gc.unfreeze()
                gc.collect()
                gc.freeze()
                self.audits += 1
                baseline, audited_at = gc.get_freeze_count(), time.monotonic()


def dashboard_html() -> bytes:
    """The dashboard page (``harness/dashboard.html``, self-contained)."""
    return resources.files("harness").joinpath("dashboard.html").read_bytes()


@final
class _Latency:
    """Delivery latencies: cumulative histogram buckets, plus the current interval's samples."""

    __slots__ = ("buckets", "count", "interval", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.count = 0
        self.total = 0.0
        self.interval: list[float] = []

    def observe(self, stamps: Sequence[float], now: float) -> None:
        for ts in stamps:
            seconds = max(now - ts, 0.0)
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.total += seconds
            if len(self.interval) < _MAX_INTERVAL_SAMPLES:
                self.interval.append(seconds)
        self.count += len(stamps)

    def take_interval(self) -> list[float]:
        samples, self.interval = self.interval, []
        samples.sort()
        return samples

    def cumulative(self) -> list[tuple[str, float]]:
        return cumulative_buckets(LATENCY_BUCKETS, self.buckets)


def cumulative_buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """A histogram's buckets as prometheus-client takes them: ``(upper bound, count at or
    below it)``, ``+Inf`` last; ``counts`` has one entry per bound and one beyond them."""
    labels = [*map(repr, bounds), "+Inf"]
    return list(zip(labels, map(float, itertools.accumulate(counts)), strict=True))


def _percentile_ms(samples: list[float], fraction: float) -> float | None:
    if not samples:
        return None
    index = min(len(samples) - 1, max(0, math.ceil(fraction * len(samples)) - 1))
    return round(samples[index] * 1000, 3)


@final
class CollectorPauses:
    """The cyclic garbage collector's pauses, measured with ``gc.callbacks``.

    Use it as a context manager: it watches from entry to exit. A pause is the time from a
    collection's start callback to its stop callback, in which the event loop is stopped.
    ``by_bucket[i]`` counts the pauses of at most ``GC_PAUSE_BUCKETS[i]`` seconds that were
    longer than the bucket before (the last entry: longer than every bound).
    """

    __slots__ = ("_started", "by_bucket", "by_generation", "count", "longest_s", "total_s")

    def __init__(self) -> None:
        self.count = 0
        self.total_s = 0.0
        self.longest_s = 0.0
        self.by_generation = [0, 0, 0]
        self.by_bucket = [0] * (len(GC_PAUSE_BUCKETS) + 1)
        self._started = 0.0

    def __enter__(self) -> CollectorPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.count += 1
        self.total_s += pause
        self.longest_s = max(self.longest_s, pause)
        self.by_generation[info.get("generation", 2)] += 1
        self.by_bucket[bisect.bisect_left(GC_PAUSE_BUCKETS, pause)] += 1

    def cumulative(self) -> list[tuple[str, float]]:
        return cumulative_buckets(GC_PAUSE_BUCKETS, self.by_bucket)


@final
class Operations:
    """Counters, readiness and the HTTP answers of the operations routes for one server.

    Args:
        registry: The registry the server runs on.
        config: Its settings.
        server: ``trio`` or ``fastapi`` (shown on the dashboard).
    """

    def __init__(self, registry: AgentExecutionRegistry, config: Config, server: str) -> None:
        self.registry = registry
        self.config = config
        self.server = server
        self.state: Readiness = "starting"
        self.started_at = time.time()
        self.connections = 0
        self.frames_written = 0
        self.closes: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.resumes: Counter[str] = Counter({"ok": 0, "not_found": 0,
                                              "resume_unavailable": 0})
        self.latency = _Latency()
        #: The garbage collector's pauses (the server enters it while it serves).
        self.gc = CollectorPauses()
        #: Keeps those pauses short (the server runs its service).
        self.heap = HeapKeeper()
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_S)
        self._last_sample: tuple[float, int] = (time.monotonic(), 0)
        self.collectors = CollectorRegistry(auto_describe=False)
        self.collectors.register(_Collector(self))

    # ------------------------------------------------------ what transports report
    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def count_resume(self, outcome: str) -> None:
        self.resumes[outcome] += 1

    def count_close(self, code: int) -> None:
        self.closes[code] += 1

    def written(self, stamps: Sequence[float], now: float) -> None:
        """Event frames (their emit times) were written to a socket at ``now`` (Unix s)."""
        if stamps:
            self.frames_written += len(stamps)
            self.latency.observe(stamps, now)

    # ------------------------------------------------------------ the answers
    def readiness(self) -> tuple[int, dict[str, Any]]:
        """``/readyz``: 200 ``ready``, else 503 with the status and reasons a person can read."""
        if self.state != "ready":
            reason = ("the server is starting" if self.state == "starting"
                      else "the server is shutting down and takes no new runs")
            return 503, {"status": self.state, "reasons": [reason]}
        health = self.registry.health()
        if health.status == "ok":
            return 200, {"status": "ready"}
        return 503, {"status": "degraded", "reasons": list(health.reasons)}

    def metrics(self) -> bytes:
        """``/metrics`` in the Prometheus text format."""
        return generate_latest(self.collectors)

    def dashboard_data(self) -> dict[str, Any]:
        """What the dashboard page polls: live figures, totals and the last 5 minutes."""
        stats = self.registry.statistics()
        _, body = self.readiness()
        latest = self.history[-1] if self.history else {}
        return {
            "ts": time.time(), "status": body["status"], "reasons": body.get("reasons", []),
            "server": self.server, "delivery_mode": self.config.delivery_mode,
            "uptime_s": round(time.time() - self.started_at, 1),
            "runs_active": stats.active_runs,
            "retained_runs": stats.retained_runs - stats.active_runs,
            "connections_active": self.connections,
            "events_per_second": latest.get("events_per_second", 0.0),
            **{k: latest.get(k) for k in ("delivery_p50_ms", "delivery_p95_ms",
                                          "delivery_p99_ms")},
            "events_failed": stats.events_failed, "events_retried": stats.events_retried,
            "closes_4008": self.closes[4008], "runs_started": stats.runs_started,
            "runs_completed": {str(s): stats.runs_by_status.get(str(s), 0) for s in RunStatus},
            "errors": dict(self.errors), "history": list(self.history),
            "gc_pauses": self.gc.count, "gc_pause_longest_ms": round(self.gc.longest_s * 1e3, 3),
        }

    def dashboard_json(self) -> bytes:
        return json.dumps(self.dashboard_data(), separators=(",", ":")).encode()

    # ------------------------------------------------------------- the routes
    def answer(self, path: str | None, method: str, headers: Mapping[str, str],
               query: Mapping[str, str]) -> tuple[int, bytes, str]:
        """The HTTP answer (status, body, content type) of an operations route.

        Unknown paths are 404, other methods 405; ``metrics_token`` guards /metrics and the
        dashboard (header ``Authorization: Bearer`` or ``?token=``), never health.
        """
        route = ROUTES.get(path or "")
        if route is None:
            return 404, REFUSALS[404], TEXT
        if method != "GET":
            return 405, REFUSALS[405], TEXT
        guarded, respond = route
        if guarded and not self._metrics_allowed(headers, query):
            return 401, REFUSALS[401], TEXT
        return respond(self)

    def _metrics_allowed(self, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        token = self.config.metrics_token
        if token is None:
            return True
        try:
            return token_from_request(headers, query) == token
        except AuthError:
            return False

    def _healthz(self) -> tuple[int, bytes, str]:
        return 200, b'{"status":"ok"}', JSON

    def _readyz(self) -> tuple[int, bytes, str]:
        status, body = self.readiness()
        return status, json.dumps(body, separators=(",", ":")).encode(), JSON

    def _metrics(self) -> tuple[int, bytes, str]:
        return 200, self.metrics(), METRICS_CONTENT_TYPE

    def _dashboard(self) -> tuple[int, bytes, str]:
        return 200, dashboard_html(), "text/html; charset=utf-8"

    def _dashboard_data(self) -> tuple[int, bytes, str]:
        return 200, self.dashboard_json(), JSON

    # ----------------------------------------------------------------- drain
    async def drain(self, registry: AgentExecutionRegistry,
                    close_all: Callable[[], Awaitable[None]], grace_s: float) -> None:
        """The graceful shutdown both servers do, within ``grace_s``.

        Readiness turns ``draining`` (new upgrades get 503); every run ends ``cancelled``
        with its terminal event delivered to the sockets still open; then every socket is
        closed with 1001 (``close_all``).
        """
        self.state = "draining"
        deadline = anyio.current_time() + grace_s
        with anyio.move_on_at(deadline - min(grace_s / 2, 1.0)):
            await registry.aclose_runs()
        with anyio.move_on_at(deadline):
            await close_all()

    # ---------------------------------------------------------------- sampling
    def sample(self) -> dict[str, Any]:
        """Closes one sample interval (normally a second) and adds it to the history."""
        now, written = time.monotonic(), self.frames_written
        then, before = self._last_sample
        self._last_sample = (now, written)
        samples = self.latency.take_interval()
        point = {
            "ts": round(time.time(), 3),
            "events_per_second": round((written - before) / max(now - then, 1e-3), 1),
            "delivery_p50_ms": _percentile_ms(samples, 0.50),
            "delivery_p95_ms": _percentile_ms(samples, 0.95),
            "delivery_p99_ms": _percentile_ms(samples, 0.99),
            "runs_active": self.registry.statistics().active_runs,
            "connections_active": self.connections,
        }
        self.history.append(point)
        return point

    async def sampler(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Takes one history sample a second until cancelled."""
        task_status.started()
        while True:
            await anyio.sleep(1.0)
            self.sample()


Respond = Callable[[Operations], tuple[int, bytes, str]]
#: path -> (needs metrics_token, answer)
ROUTES: Final[dict[str, tuple[bool, Respond]]] = {
    "/healthz": (False, Operations._healthz),
    "/readyz": (False, Operations._readyz),
    "/metrics": (True, Operations._metrics),
    "/dashboard": (True, Operations._dashboard),
    "/dashboard/data": (True, Operations._dashboard_data),
}


@final
class _Collector:
    """Builds every metric family of PROTOCOL.md v2 from the counters, at scrape time."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    def collect(self) -> Iterator[Metric]:
        ops, stats = self.ops, self.ops.registry.statistics()
        yield _counter("registry_runs_started", "Runs started (duplicates are not).",
                       stats.runs_started)
        yield _labelled(CounterMetricFamily, "registry_runs_completed", "Runs ended, by status.",
                        "status", {str(s): stats.runs_by_status.get(str(s), 0)
                                   for s in RunStatus})
        yield GaugeMetricFamily("registry_runs_active", "Runs in flight.",
                                value=stats.active_runs)
        yield GaugeMetricFamily("registry_retained_runs",
                                "Ended runs still retained for resume.",
                                value=stats.retained_runs - stats.active_runs)
        yield GaugeMetricFamily("registry_connections_active", "Open WebSocket connections.",
                                value=ops.connections)
        yield _labelled(CounterMetricFamily, "registry_connections_closed",
                        "Closed sockets, by close code.", "code",
                        {str(code): n for code, n in ops.closes.items()})
        yield from self._events(stats)
        yield _labelled(CounterMetricFamily, "registry_resumes", "Resume requests, by outcome.",
                        "outcome", dict(ops.resumes))
        yield _counter("registry_dedup_hits", "start_agent answered duplicate: true.",
                       stats.dedup_hits)
        yield _labelled(CounterMetricFamily, "registry_errors", "Error frames sent, by code.",
                        "code", dict(ops.errors))
        yield from self._collector_pauses()

    def _collector_pauses(self) -> Iterator[Metric]:
        pauses = self.ops.gc
        yield _labelled(CounterMetricFamily, "registry_gc_collections",
                        "Cyclic garbage collections, by generation.", "generation",
                        {str(g): n for g, n in enumerate(pauses.by_generation)})
        yield _counter("registry_gc_pause_seconds",
                       "Time the event loop stood still in garbage collections.", pauses.total_s)
        yield GaugeMetricFamily("registry_gc_pause_longest_seconds",
                                "The longest garbage-collection pause so far.",
                                value=pauses.longest_s)
        yield HistogramMetricFamily(
            "registry_gc_pause_duration_seconds", "Garbage-collection pauses, by length.",
            buckets=pauses.cumulative(), sum_value=pauses.total_s)

    def _events(self, stats: Any) -> Iterator[Metric]:
        ops = self.ops
        yield _counter("registry_events_emitted", "Events recorded.", stats.events_emitted)
        yield _counter("registry_events_delivered", "Event frames handed to sockets.",
                       ops.frames_written)
        yield _counter("registry_events_retried", "Delivery retries.", stats.events_retried)
        yield _counter("registry_events_failed", "Deliveries given up.", stats.events_failed)
        yield HistogramMetricFamily(
            "registry_event_delivery_seconds",
            "From an event's ts to its frame written to the socket.",
            buckets=ops.latency.cumulative(), sum_value=ops.latency.total)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(
    kind: type[CounterMetricFamily], name: str, doc: str, label: str, values: dict[str, float],
) -> CounterMetricFamily:
    family = kind(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family
