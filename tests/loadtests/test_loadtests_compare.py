"""Delivery modes side by side, direct mode's verdict, the multi-node report and the runner's
command lines (no server, no Locust: synthetic summaries)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtests import compare, report, run
from loadtests.checker import Kind, RunChecker
from loadtests.metrics import COUNTER_FIGURES
from loadtests.serverproc import Sample
from loadtests.tally import LatencySamples, Tally
from loadtests.wire import scripted_context, scripted_types

SCRIPT = scripted_types(scripted_context(1, 5, 0))  # 10 events


def frame(seq: int, etype: str) -> dict[str, Any]:
    call = {"tool": "t", "call_id": "c0", "args": {}}
    return {"type": etype, "run_id": "r", "seq": seq, "ts": 1.0, "payload": call}


def cut_run(held: list[int], script: tuple[str, ...] | None = SCRIPT) -> RunChecker:
    """A run that received ``held`` and was then cut (its resume declined)."""
    run = RunChecker("r", None, script)
    types = SCRIPT
    for seq in held:
        run.feed(frame(seq, types[seq - 1]))
    run.cut()
    run.finish()
    return run


def test_a_cut_run_loses_its_tail_by_design_not_as_violations() -> None:
    run = cut_run([1, 2, 3, 4])
    assert run.violations == ()
    assert (run.cut_after, run.lost_by_design, run.length_known) == (4, 6, True)
    tally = Tally()
    tally.add_finished_run(run)
    counts = tally.to_dict()["counts"]
    assert (counts["runs_cut"], counts["events_lost_by_design"]) == (1, 6)
    assert (counts["events_expected"], counts["events_delivered"]) == (10, 4)


def test_a_gap_before_the_cut_is_still_lost() -> None:
    run = cut_run([1, 2, 4])
    assert [(v.kind, v.seq) for v in run.violations] == [(Kind.LOST, 3)]
    assert run.lost_by_design == 6


def test_a_cut_run_of_unknown_length_loses_at_least_its_terminal_event() -> None:
    run = cut_run([1, 2], script=None)
    assert run.violations == ()
    assert (run.lost_by_design, run.length_known) == (1, False)
    tally = Tally()
    tally.add_finished_run(run)
    assert tally.counts["runs_cut_length_unknown"] == 1
    assert tally.counts["events_expected"] == 3


def summary(mode: str = "registry", lost: int = 0, cut: int = 0, by_design: int = 0,
            duplicated: int = 0, p99: float = 3.0) -> dict[str, Any]:
    """A runner-style summary of one test."""
    tally = Tally()
    tally.counts.update(runs_started=20, runs_completed=20 - cut, events_expected=200,
                        events_delivered=200 - lost - by_design, drops=cut or 5, runs_cut=cut,
                        events_lost_by_design=by_design)
    tally.violations.update({k: v for k, v in (("lost", lost), ("duplicate", duplicated)) if v})
    out: dict[str, Any] = {
        "started_at": "now",
        "config": {"users": 10, "duration_s": 5, "delivery_mode": mode, "nodes": None,
                   "drop_fraction": 0.3, "agent_mix": "scripted:1"},
        "runs": {"started": 20, "completed": 20 - cut, "failed_to_start": 0, "abandoned": 0,
                 "drops": cut or 5, "cut": cut},
        "events": report.event_counts(tally, LatencySamples()),
        "latency_ms": {"all": {"count": 200, "p50": 1.0, "p95": 2.0, "p99": p99, "max": p99}},
        "server": {"cpu_mean_percent": 1.0, "cpu_max_percent": 2.0, "peak_rss_mib": 50.0,
                   "exit_code": 0},
        "locust": {"exit_code": 0},
    }
    problems = report.slo_problems(out, 500.0, 1000.0)
    out["slo"] = {"passed": not problems, "problems": problems}
    return out


def test_direct_mode_measures_losses_but_fails_on_duplicates() -> None:
    cut = summary("direct", lost=2, cut=4, by_design=30)
    assert cut["slo"]["problems"] == []
    assert (cut["events"]["lost_total"], cut["events"]["never_ended"]) == (32, 4)
    assert "legacy path" in report.render_markdown(cut)
    assert "2 duplicated" in summary("direct", cut=4, by_design=30, duplicated=2)["slo"]["problems"]
    registry = summary("registry", lost=2)["slo"]["problems"]
    assert "2 lost" in registry
    assert any("below 100%" in problem for problem in registry)


def comparison(tmp_path: Path) -> dict[str, Any]:
    config = {"users": 10, "duration_s": 5, "drop_fraction": 0.3, "agent_mix": "scripted:1",
              "nodes": None}
    modes = {"registry": (summary("registry", p99=4.5), "registry"),
             "direct": (summary("direct", cut=6, by_design=40, p99=3.25), "direct")}
    built = compare.build("now", config, modes)
    compare.write(built, tmp_path)
    return built


def test_the_comparison_puts_the_modes_side_by_side(tmp_path: Path) -> None:
    built = comparison(tmp_path)
    assert built["passed"] is True
    text = (tmp_path / "summary.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| figure"))
    assert header == "| figure | `registry` | `direct` |"
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["| **events lost**"] == "| **events lost** | 0 | 40 |"
    assert rows["| **runs never ended** (no terminal event)"].endswith("| 0 | 6 |")
    assert rows["| **duplicated**"] == "| **duplicated** | 0 | 0 |"
    assert rows["| latency p99 (ms)"] == "| latency p99 (ms) | 4.50 | 3.25 |"
    assert "40 of 200 events lost (20.0%)" in text
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["modes"]["direct"]["runs_never_ended"] == 6
    assert (tmp_path / "delivery_modes.png").stat().st_size > 0


def test_a_loss_of_unknown_size_is_shown_as_a_lower_bound() -> None:
    row = compare.mode_row(summary("direct", cut=1, by_design=1))
    row["lost_is_lower_bound"] = True
    assert compare._cell(row, "events_lost") == "≥ 1"
    assert compare.conclusion({"direct": row})[0].count("at least 1 of") == 1


def test_a_failing_mode_fails_the_comparison() -> None:
    modes = {"registry": (summary("registry", lost=1), "r"), "direct": (summary("direct"), "d")}
    built = compare.build("now", {}, modes)
    assert built["passed"] is False
    assert built["modes"]["registry"]["verdict"] == "FAIL"


def node_entry(index: int, events: int) -> dict[str, Any]:
    gc = {"collections": 2, "pause_total_ms": 1.5, "longest_ms": 40.0,
          "longest_at_start_ms": 40.0, "longest_during_load": False}
    figures: dict[str, Any] = {name: 1 for name, _ in COUNTER_FIGURES}
    figures.update(connections_peak=5, runs_active_peak=2, events_delivered=events, gc=gc)
    return {"label": f"node{index}", "url": f"ws://h:{index}/ws", "exit_code": 0,
            "cpu_mean_percent": 10.0, "cpu_max_percent": 20.0, "peak_rss_mib": 50.0,
            "client": {"connections": 3, "runs_started": 4, "events": events, "resumes_in": 1},
            "metrics": figures}


def test_the_multi_node_report_has_a_column_per_node_and_the_service() -> None:
    nodes = [node_entry(0, 100), node_entry(1, 120), node_entry(2, 80)]
    service = run.service_entry(nodes)
    assert service["client"]["events"] == 300
    assert service["metrics"]["events_delivered"] == 300
    assert service["metrics"]["gc"]["collections"] == 6
    out = summary()
    out["config"]["nodes"] = 3
    out["runs"].update(resumes_other_node=5, resumes_same_node=0)
    out.update(nodes=nodes, service=service, gc=service["metrics"]["gc"],
               redis={"url": "redis://x/0", "cpu_mean_percent": 1.0, "peak_rss_mib": 9.0,
                      "exit_code": 0})
    text = report.render_markdown(out)
    assert "| figure | node0 | node1 | node2 | service |" in text
    assert "| events received (client) | 100 | 120 | 80 | 300 |" in text
    assert "| resumes on another node / same node | 5 / 0 |" in text
    assert "came before the load" in text
    out["runs"]["resumes_same_node"] = 1
    nodes[1]["exit_code"] = -9
    problems = report.slo_problems(out, 500.0, 1000.0)
    assert "node1 exited -9 on SIGTERM" in problems
    assert "1 resumes on the node the socket dropped from" in problems


def test_report_resources_plot_one_line_per_process(tmp_path: Path) -> None:
    series = {"node0": [Sample(0.0, 5.0, 2**20), Sample(1.0, 6.0, 2**21)],
              "redis": [Sample(0.5, 1.0, 2**20)]}
    report.plot_resources(series, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0


def args(*argv: str) -> Any:
    return run.parse_args(list(argv))


def test_the_delivery_mode_goes_to_the_server_and_to_locust(tmp_path: Path) -> None:
    direct = args("--delivery-mode", "direct")
    assert run.server_command(direct)[-2:] == ["--delivery-mode", "direct"]
    cmd = run.locust_cmd(direct, "ws://h:1/ws", tmp_path)
    assert cmd[cmd.index("--delivery-mode") + 1] == "direct"
    assert cmd[cmd.index("--seed") + 1] == "-1"
    assert "--node-urls" not in cmd
    assert run.server_command(args())[-2:] == ["--delivery-mode", "registry"]
    other = args("--server-cmd", "python -m benchmarks.baseline_trio")
    assert "--delivery-mode" not in run.server_command(other)


def test_nodes_go_to_locust_as_node_urls(tmp_path: Path) -> None:
    urls = ["ws://h:1/ws", "ws://h:2/ws", "ws://h:3/ws"]
    cmd = run.locust_cmd(args("--nodes", "3"), urls, tmp_path)
    assert cmd[cmd.index("--host") + 1] == urls[0]
    assert cmd[cmd.index("--node-urls") + 1] == ",".join(urls)


def test_a_comparison_has_its_own_defaults_and_refuses_a_mode() -> None:
    compared = args("--compare-delivery-modes")
    assert (compared.drop_fraction, compared.agent_mix) == (0.3, "scripted:1")
    assert compared.seed >= 0
    plain = args()
    assert (plain.drop_fraction, plain.agent_mix, plain.delivery_mode, plain.seed) == (
        0.1, "scripted:3,research:1", "registry", -1)
    assert args("--compare-delivery-modes", "--drop-fraction", "0.5").drop_fraction == 0.5
    with pytest.raises(SystemExit):
        args("--compare-delivery-modes", "--delivery-mode", "direct")
    with pytest.raises(SystemExit):
        args("--nodes", "0")


def test_the_dashboard_banner_names_every_node_and_the_token(tmp_path: Path) -> None:
    one = run.dashboard_banner(["ws://127.0.0.1:8765/ws"], "s3cret", "registry", tmp_path)
    assert "LIVE DASHBOARD:  http://127.0.0.1:8765/dashboard?token=s3cret" in one
    many = run.dashboard_banner(["ws://h:1/ws", "ws://h:2/ws"], None, "direct", tmp_path)
    assert "node1 (h:2):  http://h:2/dashboard" in many
    assert "delivery_mode direct" in many


def test_multi_node_latency_is_split_by_delivery_path(tmp_path: Path) -> None:
    home, other = LatencySamples(), LatencySamples()
    for i in range(10):
        home.record("partial_result", 100.0 + i, 1.0)
        other.record("partial_result", 100.0 + i, 200.0)
    raw = {"tally": Tally().to_dict(), "samples": home.to_dict(),
           "samples_other_node": other.to_dict()}
    (tmp_path / "events-1.json").write_text(json.dumps(raw))
    _, merged = report.load_raw(tmp_path)
    assert len(merged) == 20
    paths = report.latency_by_node_path(tmp_path)
    assert (paths["home_node"]["count"], paths["other_node"]["count"]) == (10, 10)
    assert paths["other_node"]["p50"] == pytest.approx(200.0, rel=0.01)
    out = summary()
    out["latency_ms_by_node_path"] = paths
    assert "| on another node, after a cross-node resume (mirror) | 10 | 200" in (
        report.render_markdown(out))
