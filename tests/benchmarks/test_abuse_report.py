"""The abuse soak's figures, verdict and Markdown page from made-up measurements."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import abuse_report as ar
from benchmarks import abuse_tally as at

BUDGETS = {"max_retained_mib": 64, "max_queued_mib": 1, "max_pending_handshakes": 1000,
           "max_connections_per_user": 5}


def lean(p99: float, violations: dict[str, int] | None = None) -> dict[str, Any]:
    """A lean generator's result with the fields the report reads."""
    return {
        "sockets": 200,
        "tally": {"counts": {"runs_started": 10, "runs_completed": 10, "runs_failed_to_start": 0,
                             "events_expected": 270, "events_delivered": 270,
                             "unexpected_closes": 0},
                  "violations": violations or {}},
        "events_received": 270,
        "errors": {},
        "examples": ["lost abc seq 3: never delivered"] if violations else [],
        "latency_ms": {"count": 270, "p50": 1.0, "p95": 5.0, "p99": p99, "p999": 30.0,
                       "max": 40.0},
        "achieved_rate": 1000.0,
        "offered_rate": 1000.0,
        "window_s": 60,
        "loadgen_cpu_percent": 8.0,
        "window": {"server_cpu_percent": 20.0, "cpu_us_per_event": 200.0,
                   "other_processes_cpu_percent": 100.0,
                   "intervals": [{"t_s": 5.0, "latency_ms": {"p99": p99}}]},
    }


def abusers_result(limits_ok: bool = True) -> dict[str, Any]:
    tally = at.AbuseTally()
    tally.add(at.NON_READER, "close:4008", 3.0)
    tally.add(at.HUGE_MESSAGE, "close:1009", 0.1)
    tally.add(at.LIMITS, "http:429")
    tally.add(at.LIMITS, "http:401")
    if limits_ok:
        tally.add(at.LIMITS, "error:rate_limited")
    tally.add(at.THREAD_ID, "error:invalid_field:thread_id")
    tally.add(at.THREAD_ID, "accepted")
    counts = {at.NON_READER: 2, at.HUGE_MESSAGE: 1, at.LIMITS: 1, at.THREAD_ID: 1,
              at.SLOWLORIS: 20}
    data = tally.to_dict()
    return {"counts": counts, "tally": data, "verdict": at.verdict(data, list(counts)[:-1]),
            "probes": [{"opened": 1025, "closed_at_once": 25, "handshake_timeout": 1000}],
            "probe_bound_held": True, "cpu_percent": 5.0}


METRICS = {
    "start": {'registry_connections_closed_total{code="1000"}': 0.0},
    "unabused_end": {'registry_connections_closed_total{code="1000"}': 200.0,
                     'registry_errors_total{code="rate_limited"}': 0.0},
    "abused_end": {'registry_connections_closed_total{code="1000"}': 250.0,
                   'registry_connections_closed_total{code="4008"}': 7.0,
                   'registry_errors_total{code="rate_limited"}': 3.0,
                   "registry_connections_active": 0.0, "registry_retained_runs": 42.0},
}


def summary(**changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "settings": {"budgets": BUDGETS, "warmup_s": 10, "users": 200},
        "unabused": lean(10.0),
        "abused": lean(15.0),
        "abusers": abusers_result(),
        "metrics": METRICS,
        "rss_samples": [(100.0 + t, 0.0, min(60 + t / 10, 75) * 2**20) for t in range(0, 400, 2)],
        "phases": {"unabused": (100.0, 200.0), "abused": (200.0, 500.0)},
        "machine": {"cpus": 2, "load_start": [1.0, 1.0, 1.0], "load_end": [2.0, 2.0, 2.0]},
        "server_exit": 0,
    }
    args.update(changes)
    return ar.summarize(**args)


def test_labelled_counters_and_their_growth() -> None:
    before, after = METRICS["unabused_end"], METRICS["abused_end"]
    assert ar.labelled(after, ar.CLOSE_FAMILY) == {"1000": 250.0, "4008": 7.0}
    assert ar.counter_deltas(before, after, ar.CLOSE_FAMILY) == {"1000": 50, "4008": 7}
    assert ar.counter_deltas(before, after, ar.ERROR_FAMILY) == {"rate_limited": 3}
    assert ar.counter_deltas(after, after, ar.ERROR_FAMILY) == {}


def test_latency_ratios_skip_a_zero_baseline() -> None:
    ratios = ar.latency_ratios({"p50": 0.0, "p99": 10.0}, {"p50": 2.0, "p99": 25.0})
    assert ratios == {"p50": None, "p99": 2.5}


def test_the_rss_ceiling_adds_every_budget_to_the_unabused_peak() -> None:
    sockets = ar.queue_sockets({at.SLOWLORIS: 20, at.PENDING_PROBE: 1, at.NON_READER: 2,
                                at.LIMITS: 1}, max_connections_per_user=5)
    assert sockets == 2 + 6  # the limit tester holds max_connections_per_user + 1 sockets
    ceiling = ar.rss_ceiling(100.0, BUDGETS, sockets)
    assert ceiling == pytest.approx(100 + 64 + 8 * (1 + 1 / 16) + 1000 / 64, abs=0.05)


def test_rss_slope_is_in_mib_a_minute() -> None:
    curve = [[t, 50 + t / 60] for t in range(0, 120, 2)]
    assert ar.rss_slope(curve, 0, 120) == pytest.approx(1.0)
    assert ar.rss_slope(curve, 0, 3) is None
    assert ar.peak(curve, 10, 20) == pytest.approx(50 + 20 / 60)
    assert ar.peak(curve, 500, 600) is None


def test_a_clean_soak_passes_every_check() -> None:
    got = summary()
    assert got["ok"], got["checks"]
    assert got["latency_ratio"]["p99"] == 1.5
    assert got["rss"]["unabused_peak_mib"] == 70.0
    assert got["rss"]["max_mib"] == 75.0
    assert got["rss"]["curve"][0] == [0.0, 60.0]
    assert got["rss"]["slope_second_half_mib_per_min"] == 0.0
    assert got["server_metrics"]["abused"] == {
        "closes": {"1000": 50, "4008": 7}, "errors": {"rate_limited": 3}}
    assert got["abuse"]["headline"]["close_4008"] == 1
    assert got["abuse"]["headline"]["error_frames"] == 2
    assert got["connections_after"]["abused_end"] == 0.0
    assert ar.findings(got) == []


def test_rss_rising_through_the_abuse_is_a_leak() -> None:
    rising = [(100.0 + t, 0.0, (60 + t / 10) * 2**20) for t in range(0, 400, 2)]
    got = summary(rss_samples=rising)  # 6 MiB a minute all along
    assert got["rss"]["slope_second_half_mib_per_min"] == pytest.approx(6.0, abs=0.1)
    assert not got["checks"]["rss_flat_under_abuse"]
    assert any("kept rising" in line for line in ar.findings(got))
    short = summary(rss_samples=rising,
                    phases={"unabused": (100.0, 200.0), "abused": (200.0, 260.0)})
    assert short["checks"]["rss_flat_under_abuse"]  # too short to judge


def test_violations_slow_p99_missing_answers_and_a_bad_exit_fail_the_soak() -> None:
    got = summary(abused=lean(25.0, {"lost": 2}), abusers=abusers_result(limits_ok=False),
                  server_exit=-9)
    checks = got["checks"]
    assert not checks["zero_violations"]
    assert not checks["p99_within_2x"]
    assert not checks["every_abuse_answered"]
    assert not checks["server_exit_0"]
    assert not got["ok"]
    found = "\n".join(ar.findings(got))
    assert "{'lost': 2}" in found
    assert "2.5 x the unabused p99" in found
    assert "limits: expected" in found and "error:rate_limited" in found
    assert "exited -9" in found


def ws_ping_floods(*outcomes: str) -> dict[str, Any]:
    """An abusers' result whose WebSocket-ping flooder had ``outcomes``, 10 MiB of pongs read."""
    result = abusers_result()
    tally = at.AbuseTally()
    tally.merge(result["tally"])
    for outcome in outcomes:
        tally.add(at.WS_PING_FLOOD, outcome)
    tally.count(at.WS_PING_FLOOD, "pong_bytes_read", 10 * 2**20)
    result["tally"] = tally.to_dict()
    result["counts"][at.WS_PING_FLOOD] = 1
    result["verdict"] = at.verdict(result["tally"], [at.WS_PING_FLOOD])
    return result


def test_the_ws_ping_finding_says_how_many_bytes_one_socket_held() -> None:
    found = ar.findings(summary(abusers=ws_ping_floods("absorbed", "absorbed")))
    assert any("about 5.0 MiB of pongs each" in line and "max_queued_mib 1" in line
               for line in found)


def test_absorbed_ws_ping_floods_are_no_finding_once_a_larger_one_met_the_bound() -> None:
    result = ws_ping_floods("absorbed", "close:4008")
    assert result["verdict"][at.WS_PING_FLOOD]["ok"]
    assert not [line for line in ar.findings(summary(abusers=result)) if "ws_ping" in line]


def test_the_page_and_the_lines_carry_the_figures() -> None:
    got = summary()
    page = ar.markdown(got, ["something went wrong"])
    assert "| latency p99 ms | 10.0 | 15.0 (x1.5) |" in page
    assert "| non_reader | 2 | close:4008 1 | ok |" in page
    assert "## Findings" in page and "- something went wrong" in page
    assert "closes {'1000': 50, '4008': 7}" in page
    lines = "\n".join(ar.summary_lines(got))
    assert "p99 ratio 1.5" in lines
    assert "violations 0 + 0" in lines
    assert "close_1009 1" in lines


def test_the_abusers_own_window_is_where_the_abused_peak_and_slope_are_taken() -> None:
    rising_then_flat = [(100.0 + t, 0.0, min(60 + max(t - 150, 0), 200) * 2**20)
                        for t in range(0, 400, 2)]
    phases = {"unabused": (100.0, 200.0), "abused": (200.0, 500.0), "abuse": (240.0, 330.0)}
    got = summary(rss_samples=rising_then_flat, phases=phases)
    assert got["rss"]["phases_s"]["abuse"] == [140.0, 230.0]
    assert got["rss"]["abused_peak_mib"] == 140.0  # at 230 s, the abusers' end
    assert got["rss"]["slope_second_half_mib_per_min"] == pytest.approx(60.0, abs=1)
