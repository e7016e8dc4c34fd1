"""The load-test and benchmark reports: verdicts, tables and plots from synthetic results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import reporting
from loadtests import report
from loadtests.serverproc import Sample
from loadtests.tally import LatencySamples, Tally


def write_raw(folder: Path, lost: int = 0) -> None:
    """Write one process's raw file: 10 runs of 5 events, latencies 1..50 ms."""
    tally = Tally()
    tally.counts.update(
        runs_started=10, runs_completed=10, events_expected=50, events_delivered=50 - lost
    )
    tally.violations.update({"lost": lost} if lost else {})
    samples = LatencySamples()
    for i in range(50 - lost):
        samples.record("partial_result", 100.0 + i / 10, float(i + 1))
    data = {"tally": tally.to_dict(), "samples": samples.to_dict()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "events-1.json").write_text(json.dumps(data))


def summary_for(folder: Path, p95_ms: float = 500.0) -> dict[str, Any]:
    """Build a runner-style summary from the raw files in ``folder``."""
    tally, samples = report.load_raw(folder)
    counts = tally.counts
    summary: dict[str, Any] = {
        "started_at": "now",
        "config": {"users": 1, "duration_s": 1},
        "runs": {
            "started": counts["runs_started"],
            "completed": counts["runs_completed"],
            "failed_to_start": 0,
            "abandoned": 0,
            "drops": 0,
        },
        "events": report.event_counts(tally, samples),
        "latency_ms": report.latency_table(samples),
        "server": report.server_figures([Sample(0.0, 50.0, 2**20)], 0),
        "locust": {"exit_code": 0},
    }
    problems = report.slo_problems(summary, p95_ms, 1000.0)
    summary["slo"] = {"passed": not problems, "problems": problems}
    return summary


def test_clean_run_passes_and_renders(tmp_path: Path) -> None:
    write_raw(tmp_path / "raw")
    summary = summary_for(tmp_path / "raw")
    assert summary["slo"]["problems"] == []
    assert summary["latency_ms"]["all"]["count"] == 50
    assert "PASS" in report.render_markdown(summary)


def test_lost_events_and_slow_p95_fail(tmp_path: Path) -> None:
    write_raw(tmp_path / "raw", lost=2)
    problems = summary_for(tmp_path / "raw", p95_ms=10.0)["slo"]["problems"]
    assert any("lost" in p for p in problems)
    assert any("below 100%" in p for p in problems)
    assert any(p.startswith("p95") for p in problems)


def test_load_test_plots_are_written(tmp_path: Path) -> None:
    write_raw(tmp_path / "raw")
    _, samples = report.load_raw(tmp_path / "raw")
    report.plot_over_time(samples, tmp_path / "t.png")
    report.plot_distribution(samples, tmp_path / "d.png")
    report.plot_resources([Sample(0.0, 10.0, 1), Sample(1.0, 20.0, 2)], tmp_path / "r.png")
    assert all((tmp_path / name).stat().st_size > 0 for name in ("t.png", "d.png", "r.png"))


def loadgen_result(rate: float, p99: float, violations: dict[str, int]) -> dict[str, Any]:
    """Return a loadgen-shaped result."""
    latency = {"count": 100, "p50": p99 / 4, "p95": p99 / 2, "p99": p99, "p999": p99, "max": p99}
    counts = {"runs_started": 5, "drops": 5, "events_expected": 100, "events_delivered": 100}
    return {
        "offered_rate": rate,
        "achieved_rate": rate * 0.95,
        "latency_ms": latency,
        "tally": {"counts": counts, "violations": violations},
        "sockets": 10,
        "concurrent_runs": 2,
        "server_cpu_percent": 10.0,
        "loadgen_cpu_percent": 10.0,
    }


def test_benchmark_report_ratios_and_files(tmp_path: Path) -> None:
    sweep = {
        name: {
            "steps": [loadgen_result(500, p99, {}), loadgen_result(1000, 2 * p99, {})],
            "max_sustained_rate": top,
        }
        for name, p99, top in (("registry", 2.0, 900.0), ("baseline", 1.0, 1000.0))
    }
    results = {
        "sweep": sweep,
        "fanout": {"registry": loadgen_result(2000, 5.0, {})},
        "idle": {
            "registry": {
                "base_rss_mib": 30,
                "levels": [{"level": 10, "alive": 10, "rss_mib": 31, "kib_per_socket": 20.0}],
            }
        },
        "drops": {
            "registry": loadgen_result(500, 3.0, {}),
            "socketio": loadgen_result(500, 3.0, {"lost": 7}),
        },
    }
    machine = {
        "smoke": True,
        "started_at": "now",
        "cpus": 2,
        "python": "3.11",
        "platform": "x",
        "fd_limit": 1024,
        "duration_s": 1.0,
    }
    problems = reporting.write_all(results, machine, [], tmp_path, tmp_path / "REPORT.md")
    assert problems == []
    ovh = json.loads((tmp_path / "overhead.json").read_text())
    assert ovh["max_rate_ratio"] == 0.9
    assert ovh["p99_ratio_median"] == 2.0
    text = (tmp_path / "REPORT.md").read_text()
    assert "**broken**" in text
    assert (tmp_path / "latency_vs_rate.png").exists()
