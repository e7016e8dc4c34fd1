"""The server's own figures for a load report: ``/metrics``, ``/dashboard/data``, dashboard URL.

The runner reads every node's ``/metrics`` (Prometheus text) and the dashboard's data at the
start and at the end of a test (and ``/metrics`` now and then in between, for peaks), and turns
the differences into report figures: the garbage collector's pauses, events emitted and
delivered, resumes by outcome, closes, errors. The parsing and the arithmetic are pure; only
:func:`scrape` and :func:`fetch` do I/O (plain urllib, from the runner: never next to locust).
"""

from __future__ import annotations

import http.client
import json
import shlex
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import attrs
from prometheus_client.parser import text_string_to_metric_families

GC_COLLECTIONS: Final = "registry_gc_collections_total"
GC_PAUSE_TOTAL: Final = "registry_gc_pause_seconds_total"
GC_PAUSE_LONGEST: Final = "registry_gc_pause_longest_seconds"
GC_PAUSES: Final = "registry_gc_pause_duration_seconds_count"
#: Pauses of at most 25 ms (a bucket of the server's pause histogram): a longer one is a stall.
GC_PAUSES_SHORT: Final = 'registry_gc_pause_duration_seconds_bucket{le="0.025"}'

COUNTER_FIGURES: Final = (
    ("runs_started", "registry_runs_started_total"),
    ("runs_completed", "registry_runs_completed_total"),
    ("events_emitted", "registry_events_emitted_total"),
    ("events_delivered", "registry_events_delivered_total"),
    ("events_retried", "registry_events_retried_total"),
    ("events_failed", "registry_events_failed_total"),
    ("resumes_ok", 'registry_resumes_total{outcome="ok"}'),
    ("resumes_unavailable", 'registry_resumes_total{outcome="resume_unavailable"}'),
    ("resumes_not_found", 'registry_resumes_total{outcome="not_found"}'),
    ("connections_closed", "registry_connections_closed_total"),
    ("closes_4008", 'registry_connections_closed_total{code="4008"}'),
    ("dedup_hits", "registry_dedup_hits_total"),
    ("errors", "registry_errors_total"),
)
"""(report name, metric key) of the counters a report shows as the change over the test."""

GAUGE_PEAKS: Final = (
    ("connections_peak", "registry_connections_active"),
    ("runs_active_peak", "registry_runs_active"),
)
"""(report name, gauge) whose highest value over the test's scrapes a report shows."""


def parse_metrics(text: str) -> dict[str, float]:
    """Flatten a Prometheus text exposition into ``{key: value}``.

    Every sample is keyed by its name plus, when it has labels, ``{k="v",...}`` sorted by label
    name (``registry_resumes_total{outcome="ok"}``). A labelled counter or gauge also gets its
    plain name for the sum over its labels (``registry_gc_collections_total`` = every
    generation), unless the exposition has an unlabelled sample of that name itself.
    Histogram buckets are kept per ``le`` only.

    Raises:
        ValueError: when ``text`` is not in the text format.
    """
    out: dict[str, float] = {}
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = float(sample.value)
                if not sample.name.endswith("_bucket"):
                    sums[sample.name] = sums.get(sample.name, 0.0) + float(sample.value)
            else:
                out[sample.name] = float(sample.value)
    for name, total in sums.items():
        out.setdefault(name, total)
    return out


@attrs.frozen
class Snapshot:
    """One node's figures at one moment: parsed ``/metrics`` and the dashboard's data.

    Either is empty when it could not be read (``error`` says why).
    """

    at: float
    metrics: Mapping[str, float] = attrs.field(factory=dict)
    dashboard: Mapping[str, Any] = attrs.field(factory=dict)
    error: str | None = None

    def get(self, key: str) -> float:
        """A metric's value (0.0 when absent)."""
        return float(self.metrics.get(key, 0.0))


def http_base(ws_url: str) -> str:
    """``ws://HOST:PORT/ws`` → ``http://HOST:PORT`` (``wss`` → ``https``)."""
    parts = urllib.parse.urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return f"{scheme}://{parts.netloc}"


def dashboard_url(ws_url: str, token: str | None) -> str:
    """The live dashboard's URL for a browser, with ``?token=`` when a metrics token is set."""
    url = http_base(ws_url) + "/dashboard"
    return f"{url}?token={urllib.parse.quote(token, safe='')}" if token else url


def metrics_token_of(
    explicit: str | None, server_cmd: str, environ: Mapping[str, str]
) -> str | None:
    """The ``metrics_token`` the server will use: the runner's ``--metrics-token``, else a
    ``--metrics-token`` in the server command, else ``REGISTRY_METRICS_TOKEN``; None when unset.
    """
    if explicit:
        return explicit
    words = shlex.split(server_cmd)
    for index, word in enumerate(words):
        if word == "--metrics-token" and index + 1 < len(words):
            return words[index + 1]
        if word.startswith("--metrics-token="):
            return word.split("=", 1)[1]
    return environ.get("REGISTRY_METRICS_TOKEN") or None


def fetch(url: str, token: str | None, timeout: float = 5.0) -> bytes:
    """GET ``url`` (bearer ``token`` when given) and return the body.

    Raises:
        OSError: on a connection problem or an HTTP error status (urllib's errors are OSErrors).
    """
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: bytes = response.read()
    return body


def scrape(ws_url: str, token: str | None, now: float, dashboard: bool = True) -> Snapshot:
    """Read a node's ``/metrics`` (and ``/dashboard/data`` when ``dashboard``) now."""
    base = http_base(ws_url)
    try:
        metrics = parse_metrics(fetch(base + "/metrics", token).decode())
        data = json.loads(fetch(base + "/dashboard/data", token)) if dashboard else {}
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return Snapshot(now, error=f"{base}: {exc}")
    return Snapshot(now, metrics, data if isinstance(data, dict) else {})


def gc_figures(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """The garbage collector's pauses over a test, from two snapshots of one node.

    ``collections`` and ``pause_total_ms`` are the change between the snapshots.
    ``longest_ms`` is the server's longest pause *so far* at the end (the gauge covers the
    process's life), ``longest_at_start_ms`` the same gauge at the start: when they are equal,
    the longest pause happened before the load (e.g. the collection at start-up) and every
    pause during the load was at most that long. The dashboard's own ``gc_pauses`` and
    ``gc_pause_longest_ms`` (since the server started) at the start and at the end are kept
    beside them. ``over_25ms`` counts the pauses during the test longer than 25 ms (from the
    server's pause histogram; None when the server has none).
    """
    collections = after.get(GC_COLLECTIONS) - before.get(GC_COLLECTIONS)
    stalls = None
    if GC_PAUSES in after.metrics:
        stalls = round((after.get(GC_PAUSES) - after.get(GC_PAUSES_SHORT))
                       - (before.get(GC_PAUSES) - before.get(GC_PAUSES_SHORT)))
    longest = after.get(GC_PAUSE_LONGEST) * 1000
    longest_at_start = before.get(GC_PAUSE_LONGEST) * 1000
    return {
        "collections": round(collections),
        "pause_total_ms": round(1000 * (after.get(GC_PAUSE_TOTAL) - before.get(GC_PAUSE_TOTAL)), 3),
        "longest_ms": round(longest, 3),
        "longest_at_start_ms": round(longest_at_start, 3),
        "longest_during_load": longest > longest_at_start,
        "over_25ms": stalls,
        "dashboard_gc_pauses": after.dashboard.get("gc_pauses"),
        "dashboard_gc_pause_longest_ms": after.dashboard.get("gc_pause_longest_ms"),
        "dashboard_gc_pauses_at_start": before.dashboard.get("gc_pauses"),
        "dashboard_gc_pause_longest_ms_at_start": before.dashboard.get("gc_pause_longest_ms"),
    }


def node_figures(before: Snapshot, after: Snapshot, during: Sequence[Snapshot]) -> dict[str, Any]:
    """One node's server-side figures over a test: counter changes, gauge peaks, GC pauses."""
    out: dict[str, Any] = {
        name: round(after.get(key) - before.get(key)) for name, key in COUNTER_FIGURES
    }
    readable = [snap for snap in (before, *during, after) if snap.error is None]
    for name, key in GAUGE_PEAKS:
        out[name] = int(max((snap.get(key) for snap in readable), default=0.0))
    out["gc"] = gc_figures(before, after)
    out["scrape_errors"] = [
        f"at {when}: {snap.error}" for when, snap in (("start", before), ("end", after))
        if snap.error
    ]
    return out


def service_figures(per_node: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The whole service's server-side figures: every node's counters and peaks summed (a sum
    of peaks is an upper bound of the service's peak), GC pauses summed, the longest the max."""
    nodes = list(per_node)
    out: dict[str, Any] = {
        name: sum(int(node[name]) for node in nodes)
        for name in (*(n for n, _ in COUNTER_FIGURES), *(n for n, _ in GAUGE_PEAKS))
    }
    gcs = [node["gc"] for node in nodes]
    out["gc"] = {
        "collections": sum(g["collections"] for g in gcs),
        "pause_total_ms": round(sum(g["pause_total_ms"] for g in gcs), 3),
        "longest_ms": max((g["longest_ms"] for g in gcs), default=0.0),
        "longest_at_start_ms": max((g["longest_at_start_ms"] for g in gcs), default=0.0),
        "longest_during_load": any(g["longest_during_load"] for g in gcs),
        "over_25ms": None if any(g.get("over_25ms") is None for g in gcs)
        else sum(g["over_25ms"] for g in gcs),
    }
    return out
