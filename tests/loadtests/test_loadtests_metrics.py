"""The server's figures in a load report: /metrics parsing, GC pauses, per-node and service
sums, the dashboard URL and the metrics token."""

from __future__ import annotations

import pytest

from loadtests import metrics
from loadtests.metrics import Snapshot

EXPOSITION = """\
# HELP registry_runs_started_total Runs started (duplicates are not).
# TYPE registry_runs_started_total counter
registry_runs_started_total {runs}
# HELP registry_connections_active Open WebSocket connections.
# TYPE registry_connections_active gauge
registry_connections_active {conns}
# HELP registry_resumes_total Resume requests, by outcome.
# TYPE registry_resumes_total counter
registry_resumes_total{{outcome="not_found"}} 0.0
registry_resumes_total{{outcome="ok"}} {resumes}
# HELP registry_event_delivery_seconds From an event's ts to its frame written to the socket.
# TYPE registry_event_delivery_seconds histogram
registry_event_delivery_seconds_bucket{{le="0.001"}} 3.0
registry_event_delivery_seconds_bucket{{le="+Inf"}} 4.0
registry_event_delivery_seconds_count 4.0
registry_event_delivery_seconds_sum 0.01
# HELP registry_gc_collections_total Cyclic garbage collections, by generation.
# TYPE registry_gc_collections_total counter
registry_gc_collections_total{{generation="0"}} {gen0}
registry_gc_collections_total{{generation="1"}} 1.0
registry_gc_collections_total{{generation="2"}} 1.0
# HELP registry_gc_pause_seconds_total Time the event loop stood still in garbage collections.
# TYPE registry_gc_pause_seconds_total counter
registry_gc_pause_seconds_total {pause}
# HELP registry_gc_pause_longest_seconds The longest garbage-collection pause so far.
# TYPE registry_gc_pause_longest_seconds gauge
registry_gc_pause_longest_seconds {longest}
"""


def exposition(runs: float = 0, conns: float = 0, resumes: float = 0, gen0: float = 0,
               pause: float = 0.04, longest: float = 0.04) -> str:
    return EXPOSITION.format(runs=runs, conns=conns, resumes=resumes, gen0=gen0, pause=pause,
                             longest=longest)


def snapshot(at: float, dashboard: dict[str, object] | None = None, **values: float) -> Snapshot:
    return Snapshot(at, metrics.parse_metrics(exposition(**values)), dashboard or {})


def test_metrics_are_flattened_with_labels_and_labelled_sums() -> None:
    parsed = metrics.parse_metrics(exposition(runs=7, resumes=2, gen0=5))
    assert parsed["registry_runs_started_total"] == 7
    assert parsed['registry_resumes_total{outcome="ok"}'] == 2
    assert parsed["registry_resumes_total"] == 2
    assert parsed["registry_gc_collections_total"] == 7
    assert parsed['registry_event_delivery_seconds_bucket{le="+Inf"}'] == 4
    assert "registry_event_delivery_seconds_bucket" not in parsed
    assert parsed["registry_event_delivery_seconds_count"] == 4


def test_text_that_is_not_an_exposition_is_refused() -> None:
    with pytest.raises(ValueError):
        metrics.parse_metrics("registry_runs_started_total not-a-number\n")


def test_gc_pauses_during_the_load_are_the_change_and_the_longest_is_flagged() -> None:
    before = snapshot(0.0, gen0=1, pause=0.040, longest=0.040)
    after = snapshot(60.0, {"gc_pauses": 9, "gc_pause_longest_ms": 55.0},
                     gen0=8, pause=0.075, longest=0.055)
    gc = metrics.gc_figures(before, after)
    assert gc["collections"] == 7
    assert gc["pause_total_ms"] == pytest.approx(35.0)
    assert (gc["longest_ms"], gc["longest_at_start_ms"]) == (55.0, 40.0)
    assert gc["longest_during_load"] is True
    assert (gc["dashboard_gc_pauses"], gc["dashboard_gc_pause_longest_ms"]) == (9, 55.0)
    quiet = metrics.gc_figures(before, snapshot(60.0, gen0=1, pause=0.040, longest=0.040))
    assert (quiet["collections"], quiet["longest_during_load"]) == (0, False)


def test_node_figures_take_changes_peaks_and_survive_a_failed_scrape() -> None:
    before = snapshot(0.0, runs=2, conns=1)
    during = [snapshot(5.0, conns=9), Snapshot(10.0, error="refused")]
    after = snapshot(20.0, runs=12, conns=3, resumes=4)
    node = metrics.node_figures(before, after, during)
    assert (node["runs_started"], node["resumes_ok"], node["connections_peak"]) == (10, 4, 9)
    assert node["scrape_errors"] == []
    lost = metrics.node_figures(before, Snapshot(20.0, error="gone"), [])
    assert lost["scrape_errors"] == ["at end: gone"]


def test_the_service_sums_the_nodes_and_keeps_the_longest_pause() -> None:
    one = metrics.node_figures(snapshot(0.0), snapshot(1.0, runs=3, gen0=2, pause=0.05,
                                                       longest=0.06), [])
    two = metrics.node_figures(snapshot(0.0), snapshot(1.0, runs=4, gen0=1, pause=0.045), [])
    service = metrics.service_figures([one, two])
    assert service["runs_started"] == 7
    assert service["gc"]["collections"] == 3
    assert service["gc"]["pause_total_ms"] == pytest.approx(15.0)
    assert service["gc"]["longest_ms"] == 60.0
    assert service["gc"]["longest_during_load"] is True


def test_dashboard_url_from_the_ws_url_with_the_token_when_set() -> None:
    url = "ws://127.0.0.1:8765/ws"
    assert metrics.http_base(url) == "http://127.0.0.1:8765"
    assert metrics.http_base("wss://chat.example/ws") == "https://chat.example"
    assert metrics.dashboard_url(url, None) == "http://127.0.0.1:8765/dashboard"
    assert metrics.dashboard_url(url, "a b&c") == "http://127.0.0.1:8765/dashboard?token=a%20b%26c"


def test_metrics_token_flag_then_server_command_then_environment() -> None:
    env = {"REGISTRY_METRICS_TOKEN": "from-env"}
    cmd = "python -m harness serve --metrics-token from-cmd"
    assert metrics.metrics_token_of("flag", cmd, env) == "flag"
    assert metrics.metrics_token_of(None, cmd, env) == "from-cmd"
    assert metrics.metrics_token_of(None, "serve --metrics-token=eq", env) == "eq"
    assert metrics.metrics_token_of(None, "serve", env) == "from-env"
    assert metrics.metrics_token_of(None, "serve", {}) is None


def test_an_unreachable_node_gives_an_empty_snapshot_with_the_reason() -> None:
    snap = metrics.scrape("ws://127.0.0.1:1/ws", None, 0.0)
    assert snap.error is not None
    assert snap.metrics == {}
    assert snap.get("registry_runs_started_total") == 0.0
