"""The node-scaling and delivery-mode report: figures per service, problems, sections and plot,
from synthetic results shaped like the generators' JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import reporting, reporting_nodes
from benchmarks.node_scenarios import NO_REDIS


def lean_trial(
    rate: float, p99: float, nodes_us: float, *, offered: float = 2000.0,
    redis: dict[str, Any] | None = None, violations: dict[str, int] | None = None,
    errors: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A lean-generator result with the fields the report reads."""
    window: dict[str, Any] = {
        "cpu_us_per_event": nodes_us, "server_cpu_percent": round(rate * nodes_us / 1e4, 1),
        "other_processes_cpu_percent": 3.0,
    }
    if redis is not None:
        window["redis"] = redis
    return {
        "offered_rate": offered, "achieved_rate": rate, "sockets": 100, "sockets_asked": 100,
        "events_received": int(rate * 10),
        "latency_ms": {"p50": p99 / 4, "p95": p99 / 2, "p99": p99, "max": p99 * 2},
        "agent_completed_latency_ms": {"p50": p99, "p99": p99 * 1.5},
        "tally": {"counts": {}, "violations": violations or {}}, "errors": errors or {},
        "window": window, "loadgen_cpu_percent": 20.0,
    }


def redis_figures(commands: float, cpu_us: float) -> dict[str, Any]:
    return {
        "commands_per_event": commands, "script_calls_per_event": 0.1,
        "transactions_per_event": 0.4, "reads_per_event": 0.5, "cpu_us_per_event": cpu_us,
        "cpu_percent": 5.0, "commands_per_s": 4000.0, "net_in_bytes_per_event": 300.0,
        "by_command_per_event": {"xadd": 1.0, "exec": 0.4},
    }


def service(count: int, redis: bool, *, fixed: dict[str, Any],
            steps: list[dict[str, Any]], best: float) -> dict[str, Any]:
    return {"nodes": count, "redis": redis, "load_average": [1.0, 1.0, 1.0], "code": "abc123",
            "fixed": fixed, "steps": steps, "max_sustained_rate": best}


def nodes_results(with_redis: bool = True) -> dict[str, Any]:
    services = {
        "memory-1": service(1, False, fixed=lean_trial(1950.0, 4.0, 150.0), steps=[
            lean_trial(900.0, 2.0, 200.0, offered=1000.0),
            lean_trial(5400.0, 9.0, 110.0, offered=6000.0),
            lean_trial(5000.0, 80.0, 120.0, offered=8000.0),
        ], best=5400.0),
    }
    if with_redis:
        for count in (1, 2, 3):
            fixed = lean_trial(1900.0, 6.0 * count, 250.0 * count,
                               redis=redis_figures(2.5 + count / 10, 40.0))
            fixed["redis_trial"] = {"commands_per_event": 3.0, "reads_per_event": 0.8,
                                    "script_calls_per_event": 0.2}
            steps = [lean_trial(900.0, 3.0, 400.0, offered=1000.0,
                                redis=redis_figures(3.0, 50.0)),
                     lean_trial(2700.0, 60.0, 300.0, offered=3000.0,
                                redis=redis_figures(2.2, 20.0))]
            services[f"redis-{count}"] = service(count, True, fixed=fixed, steps=steps,
                                                 best=900.0)
    skipped = {} if with_redis else {f"redis-{n}": NO_REDIS for n in (1, 2, 3)}
    return {
        "load": {"sockets": 1000, "delay_ms": 500, "tools": 2, "tokens": 20, "warmup_s": 5.0,
                 "window_s": 27.0},
        "rates": [1000, 3000], "step_s": 5.0, "cpus": 2, "redis_version": "7.0.15",
        "load_average_at_start": [0.5, 0.5, 0.5], "load_average_at_end": [2.0, 1.0, 0.6],
        "skipped": skipped, "services": services,
    }


def drops_result(expected: int, delivered: int, runs: int, completed: int,
                 violations: dict[str, int]) -> dict[str, Any]:
    return {
        "achieved_rate": 800.0,
        "latency_ms": {"p50": 0.8, "p95": 70.0, "p99": 99.0, "max": 105.0},
        "tally": {"counts": {"runs_started": runs, "runs_completed": completed, "drops": runs,
                             "events_expected": expected, "events_delivered": delivered},
                  "violations": violations},
        "errors": {}, "load_average": [1.0, 1.0, 1.0],
    }


def delivery_results(direct_violations: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "load": {"rate": 1000, "window_s": 6.0, "delay_ms": 10, "tools": 2, "tokens": 40,
                 "offline_ms": 100},
        "modes": {
            "registry": drops_result(4700, 4700, 100, 100, {}),
            "direct": drops_result(4700, 3000, 100, 0, direct_violations or {
                "lost": 1700, "unterminated": 100}),
        },
    }


def test_each_service_adds_redis_cpu_and_compares_with_the_node_in_memory() -> None:
    summary = reporting_nodes.nodes_summary(nodes_results())
    assert list(summary) == ["memory-1", "redis-1", "redis-2", "redis-3"]
    memory, two = summary["memory-1"], summary["redis-2"]
    assert memory["label"] == "1 node, in memory"
    assert two["label"] == "2 nodes + Redis"
    assert memory["total_cpu_us_per_event"] == 150.0  # no Redis: the node alone
    assert two["total_cpu_us_per_event"] == 540.0  # 2 x 250 nodes + 40 Redis
    assert two["cpu_x_memory"] == 3.6
    assert two["commands_per_event"] == 2.7
    assert two["trial_commands_per_event"] == 3.0
    assert memory["commands_per_event"] is None
    assert two["end_p99"] == 18.0


def test_the_max_sustained_rate_points_at_its_step() -> None:
    summary = reporting_nodes.nodes_summary(nodes_results())
    assert summary["memory-1"]["max_sustained_rate"] == 5400.0
    assert summary["memory-1"]["p99_at_max"] == 9.0
    assert summary["memory-1"]["total_cpu_us_at_max"] == 110.0
    assert summary["redis-3"]["max_rate_x_memory"] == round(900 / 5400, 2)
    assert summary["redis-3"]["commands_per_event_at_max"] == 3.0


def test_a_service_that_sustained_no_step_has_no_best_step() -> None:
    results = nodes_results()
    results["services"]["redis-1"]["max_sustained_rate"] = 0.0
    summary = reporting_nodes.nodes_summary(results)
    assert summary["redis-1"]["p99_at_max"] is None
    assert summary["redis-1"]["max_rate_x_memory"] == 0.0


def test_any_violation_or_a_fixed_load_error_is_a_problem() -> None:
    results = nodes_results()
    assert reporting_nodes.nodes_problems(results) == []
    results["services"]["redis-2"]["fixed"]["errors"] = {"run_timeout": 1}
    results["services"]["redis-3"]["steps"][1]["tally"]["violations"] = {"lost": 2}
    results["services"]["redis-1"]["steps"][1]["errors"] = {"run_timeout": 3}  # saturated
    problems = reporting_nodes.nodes_problems(results)
    assert len(problems) == 2
    assert problems[0].startswith("nodes redis-2 fixed load")
    assert problems[1].startswith("nodes redis-3 ramp 3000")


def test_the_section_says_the_machine_has_two_cores_and_shows_every_service() -> None:
    text = reporting_nodes.nodes_section(nodes_results(), "results", 7)
    assert text.startswith("## 7. Nodes on one Redis")
    assert "**This machine has 2 CPU cores.**" in text
    assert "cannot show the speed-up" in text
    assert "![nodes](results/nodes.png)" in text
    for label in ("1 node, in memory", "1 node + Redis", "2 nodes + Redis", "3 nodes + Redis"):
        assert f"| {label} |" in text
    assert "xadd 1.0, exec 0.4" in text
    assert "not measured" not in text


def test_without_redis_the_section_says_why() -> None:
    results = nodes_results(with_redis=False)
    text = reporting_nodes.nodes_section(results, "results", 1)
    assert text.count("redis-server is not installed") == 3
    assert "**3 nodes + Redis not measured:**" in text
    assert "| 1 node, in memory |" in text
    assert reporting_nodes.nodes_problems(results) == []


def test_nothing_measured_gives_the_reasons_and_no_table() -> None:
    results = nodes_results(with_redis=False)
    results["services"] = {}
    text = reporting_nodes.nodes_section(results, "results", 1)
    assert "not measured" in text
    assert "|---|" not in text


def test_the_plot_is_drawn(tmp_path: Path) -> None:
    reporting_nodes.plot_nodes(nodes_results(), tmp_path)
    assert (tmp_path / "nodes.png").stat().st_size > 10_000
    reporting_nodes.plot_nodes({"services": {}}, tmp_path / "missing")  # nothing to draw


def test_delivery_modes_count_lost_events_and_runs_that_never_ended() -> None:
    figures = reporting_nodes.delivery_figures(delivery_results()["modes"]["direct"])
    assert figures["events_lost"] == 1700
    assert figures["runs_never_ended"] == 100
    assert figures["other_violations"] == {}
    registry = reporting_nodes.delivery_figures(delivery_results()["modes"]["registry"])
    assert (registry["events_lost"], registry["runs_never_ended"]) == (0, 0)


@pytest.mark.parametrize(("mode", "violations", "problem"), [
    ("direct", {"lost": 5, "unterminated": 1}, False),
    ("direct", {"lost": 5, "duplicate": 1}, True),
    ("registry", {"lost": 1}, True),
    ("registry", {"unterminated": 0}, False),
])
def test_only_what_a_mode_keeps_can_be_broken(
    mode: str, violations: dict[str, int], problem: bool
) -> None:
    results = delivery_results()
    results["modes"][mode]["tally"]["violations"] = violations
    assert bool(reporting_nodes.delivery_problems(results)) is problem


def test_the_delivery_section_sets_the_modes_side_by_side() -> None:
    text = reporting_nodes.delivery_section(delivery_results(), 3)
    assert text.startswith("## 3. Delivery modes under socket drops")
    assert "| registry | 100 | 100 | 4700 | 4700 | 0 | 0 |" in text
    assert "| direct | 100 | 100 | 4700 | 3000 | 1700 | 100 |" in text
    assert "Not measured" not in reporting_nodes.delivery_section(delivery_results(), 3)
    assert "Not measured" in reporting_nodes.delivery_section({"modes": {}}, 3)


def test_the_report_has_both_sections_and_their_problems(tmp_path: Path) -> None:
    results = {"nodes": nodes_results(), "delivery": delivery_results({"reordered": 2})}
    for name, data in results.items():
        reporting.write_json(tmp_path, name, data)
    machine = {"smoke": True, "started_at": "now", "cpus": 2, "python": "3.11",
               "platform": "linux", "fd_limit": 1024, "duration_s": 1.0}
    loaded = reporting.load_results(tmp_path)
    assert set(loaded) == {"nodes", "delivery"}
    found = reporting.write_all(loaded, machine, [], tmp_path, tmp_path / "REPORT.md")
    assert found == ["delivery direct: violations {'reordered': 2}"]
    report = (tmp_path / "REPORT.md").read_text()
    assert "## 1. Nodes on one Redis" in report
    assert "## 2. Delivery modes under socket drops" in report
    assert (tmp_path / "nodes.png").exists()
    assert json.loads((tmp_path / "run.json").read_text())["problems"] == found
