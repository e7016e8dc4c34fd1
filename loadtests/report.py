"""Turn a load test's raw per-process files into ``summary.json``, ``summary.md`` and plots.

Reads the ``events-<pid>.json`` files the Locust processes write (tally + raw latency samples),
merges them, computes HDR percentiles per event type and draws PNGs with matplotlib (Agg).
Imports neither locust nor trio.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadtests.checker import Kind
from loadtests.latency import histogram_of, new_histogram, summarize
from loadtests.serverproc import Sample
from loadtests.tally import LatencySamples, Tally

MIB = 1024 * 1024


def load_raw(folder: Path) -> tuple[Tally, LatencySamples]:
    """Merge every ``events-*.json`` in ``folder`` into one tally and one sample set (the
    samples of events received on another node than the user's home node included)."""
    tally = Tally()
    parts = []
    for path in sorted(folder.glob("events-*.json")):
        data = json.loads(path.read_text())
        tally.merge(data["tally"])
        parts.append(data["samples"])
        if "samples_other_node" in data:
            parts.append(data["samples_other_node"])
    return tally, LatencySamples.merged(parts)


def latency_by_node_path(folder: Path) -> dict[str, dict[str, float]]:
    """Latency percentiles (ms) of a multi-node test by delivery path: events received on the
    user's home node (the node running the run), and on the node a dropped socket resumed on
    (replayed and then relayed by that node's mirror of the run)."""
    home, other = [], []
    for path in sorted(folder.glob("events-*.json")):
        data = json.loads(path.read_text())
        home.append(data["samples"])
        other.append(data.get("samples_other_node", {}))
    return {
        "home_node": latency_table(LatencySamples.merged(home))["all"],
        "other_node": latency_table(LatencySamples.merged(other))["all"],
    }


def latency_table(samples: LatencySamples) -> dict[str, dict[str, float]]:
    """Return HDR percentiles (ms) for every event type and for all of them together."""
    table: dict[str, dict[str, float]] = {}
    total = new_histogram()
    for etype, (_, millis) in sorted(samples.series().items()):
        histogram = histogram_of(millis)
        total.add(histogram)
        table[etype] = summarize(histogram)
    table["all"] = summarize(total)
    return table


def events_per_second(samples: LatencySamples) -> float:
    """Return delivered events per second over the span of the samples."""
    times = [t for series in samples.series().values() for t in series[0]]
    if len(times) < 2:
        return 0.0
    return len(times) / max(1e-9, max(times) - min(times))


def event_counts(tally: Tally, samples: LatencySamples) -> dict[str, Any]:
    """Return the delivery figures: expected, delivered, each violation kind, ratio, rate.

    ``lost`` and ``unterminated`` are violations; runs cut because a ``delivery_mode`` direct
    server declined their resume add ``lost_by_design`` events (a lower bound when
    ``lost_is_lower_bound``). ``lost_total`` and ``never_ended`` (runs whose terminal event
    the client never got) count both.
    """
    expected = tally.counts["events_expected"]
    delivered = tally.counts["events_delivered"]
    counts: dict[str, Any] = {"expected": expected, "delivered": delivered}
    names = {Kind.DUPLICATE: "duplicated"}
    for kind in Kind:
        counts[names.get(kind, kind.value)] = tally.violations[kind.value]
    counts["lost_by_design"] = tally.counts["events_lost_by_design"]
    counts["lost_is_lower_bound"] = tally.counts["runs_cut_length_unknown"] > 0
    counts["lost_total"] = counts["lost"] + counts["lost_by_design"]
    counts["never_ended"] = counts["unterminated"] + tally.counts["runs_cut"]
    counts["delivery_ratio"] = delivered / expected if expected else 0.0
    counts["per_second"] = round(events_per_second(samples), 1)
    counts["samples_dropped"] = samples.dropped
    return counts


def server_figures(samples: Sequence[Sample], exit_code: int | None) -> dict[str, Any]:
    """Return the server's mean/max CPU % and peak RSS from the sampler, and its exit code."""
    cpu = [s.cpu_percent for s in samples]
    return {
        "cpu_mean_percent": round(sum(cpu) / len(cpu), 1) if cpu else 0.0,
        "cpu_max_percent": round(max(cpu), 1) if cpu else 0.0,
        "peak_rss_mib": round(max((s.rss_bytes for s in samples), default=0) / MIB, 1),
        "exit_code": exit_code,
    }


VIOLATION_FIGURES = (
    "lost",
    "duplicated",
    "reordered",
    "foreign",
    "unterminated",
    "unpaired_tool",
    "malformed",
)
"""The violation figures of ``summary["events"]``; any of them fails a test."""
TOLERATED_IN_DIRECT_MODE = frozenset({"lost", "unterminated"})
"""What does not fail a ``delivery_mode`` direct test: losing events is the legacy behaviour
measured. Duplicates, reorders, foreign events and the rest still fail it."""


def slo_problems(summary: Mapping[str, Any], p95_ms: float, p99_ms: float) -> list[str]:
    """Return every failed SLO of a summary (empty when the run passed).

    With ``config.delivery_mode`` = ``direct``, losses (lost, unterminated, runs cut, delivery
    below 100 %) are measured, not failed.
    """
    events, latency = summary["events"], summary["latency_ms"]["all"]
    direct = summary["config"].get("delivery_mode") == "direct"
    tolerated = TOLERATED_IN_DIRECT_MODE if direct else frozenset()
    problems = [
        f"{events[name]} {name}"
        for name in VIOLATION_FIGURES
        if events[name] and name not in tolerated
    ]
    if not events["expected"] or (events["delivered"] < events["expected"] and not direct):
        problems.append(f"delivery {events['delivered']}/{events['expected']} below 100%")
    if latency["p95"] > p95_ms:
        problems.append(f"p95 {latency['p95']:.1f} ms > {p95_ms:.0f} ms")
    if latency["p99"] > p99_ms:
        problems.append(f"p99 {latency['p99']:.1f} ms > {p99_ms:.0f} ms")
    problems.extend(_process_problems(summary))
    return problems


def _process_problems(summary: Mapping[str, Any]) -> list[str]:
    """Return the failures of the processes themselves (Locust verdict, server/node/Redis exits,
    resumes that did not change node)."""
    problems = []
    if summary["locust"]["exit_code"] != 0:
        problems.append(f"locust exited {summary['locust']['exit_code']} (see locust.log)")
    if summary.get("redis") is None:
        if summary["server"]["exit_code"] != 0:
            problems.append(f"server exited {summary['server']['exit_code']} on SIGINT")
    else:
        problems += [
            f"{node['label']} exited {node['exit_code']} on SIGTERM"
            for node in summary["nodes"]
            if node["exit_code"] != 0
        ]
        if summary["redis"]["exit_code"] != 0:
            problems.append(f"redis-server exited {summary['redis']['exit_code']} on SIGTERM")
    if summary["runs"]["failed_to_start"]:
        problems.append(f"{summary['runs']['failed_to_start']} runs failed to start")
    if summary["runs"].get("resumes_same_node"):
        problems.append(
            f"{summary['runs']['resumes_same_node']} resumes on the node the socket dropped from"
        )
    return problems


def render_markdown(summary: Mapping[str, Any]) -> str:
    """Return ``summary.md``: verdict, run and delivery figures, GC pauses, the nodes (when
    there are several), the latency table."""
    runs, events, server = summary["runs"], summary["events"], summary["server"]
    config = summary["config"]
    verdict = "PASS" if summary["slo"]["passed"] else "FAIL"
    mode = config.get("delivery_mode", "registry")
    lines = [f"# Load test {summary['started_at']} — {verdict}", ""]
    lines += [f"- {problem}" for problem in summary["slo"]["problems"]] or ["- every SLO met"]
    if mode == "direct":
        lines.append(
            "- delivery_mode direct (the legacy path): losses are measured, not failed; "
            "duplicates, reorders and foreign events still fail"
        )
    lines += ["", "| figure | value |", "|---|---|"]
    rows = [
        ("users / duration", f"{config['users']} / {config['duration_s']} s"),
        ("delivery mode / nodes", f"{mode} / {config.get('nodes') or 1}"),
        ("runs started / completed", f"{runs['started']} / {runs['completed']}"),
        (
            "runs abandoned at stop / failed to start",
            f"{runs['abandoned']} / {runs['failed_to_start']}",
        ),
        ("events expected / delivered", f"{events['expected']} / {events['delivered']}"),
        ("lost / duplicated", f"{events['lost']} / {events['duplicated']}"),
        ("reordered / foreign", f"{events['reordered']} / {events['foreign']}"),
        ("unterminated / unpaired_tool", f"{events['unterminated']} / {events['unpaired_tool']}"),
        ("socket drops + resumes", str(runs["drops"])),
    ]
    if runs.get("cut") or mode == "direct":
        bound = "≥ " if events.get("lost_is_lower_bound") else ""
        rows += [
            ("runs cut (resume declined)", str(runs.get("cut", 0))),
            ("events lost by design (cut runs)", f"{bound}{events.get('lost_by_design', 0)}"),
            ("runs never ended (client's view)", str(events.get("never_ended", 0))),
        ]
    if config.get("nodes"):
        rows.append(
            (
                "resumes on another node / same node",
                f"{runs.get('resumes_other_node', 0)} / {runs.get('resumes_same_node', 0)}",
            )
        )
    rows += [
        ("events/s", f"{events['per_second']}"),
        ("server CPU mean / max", f"{server['cpu_mean_percent']}% / {server['cpu_max_percent']}%"),
        ("server peak RSS", f"{server['peak_rss_mib']} MiB"),
    ]
    locust = summary["locust"]
    if "cpu_mean_percent" in locust:
        rows.append(
            (
                "Locust CPU mean / max (load generator)",
                f"{locust['cpu_mean_percent']}% / {locust['cpu_max_percent']}%",
            )
        )
    if summary.get("gc"):
        rows.append(("GC pauses (count / total / longest)", gc_text(summary["gc"])))
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += gc_note(summary.get("gc"))
    unread = [
        f"- could not read {node['label']}'s figures: {error}"
        for node in summary.get("nodes", [])
        for error in node["metrics"].get("scrape_errors", [])
    ]
    if unread:
        lines += ["", "Server figures missing (/metrics, /dashboard/data):", *unread]
    if summary.get("dashboard_urls"):
        lines += ["", "Live dashboard during the run: " + ", ".join(summary["dashboard_urls"])]
    if config.get("nodes"):
        lines += ["", *nodes_markdown(summary)]
    if summary.get("latency_ms_by_node_path"):
        lines += ["", *node_path_markdown(summary["latency_ms_by_node_path"])]
    return "\n".join([*lines, "", *latency_markdown(summary["latency_ms"]), ""])


def gc_text(gc: Mapping[str, Any]) -> str:
    """``N / X ms / Y ms``: collections and pause time during the test, longest pause."""
    return f"{gc['collections']} / {gc['pause_total_ms']:.1f} ms / {gc['longest_ms']:.1f} ms"


def gc_note(gc: Mapping[str, Any] | None) -> list[str]:
    """Lines explaining the longest pause when it is older than the load, and the stalls."""
    lines: list[str] = []
    if gc and not gc.get("longest_during_load", True):
        lines += [
            "",
            f"The longest GC pause ({gc['longest_ms']:.1f} ms) came before the load (start-up): "
            "every pause during the load was at most that long (the server's gauge covers its "
            "whole life).",
        ]
    if gc and gc.get("over_25ms") is not None:
        lines += ["", f"GC pauses longer than 25 ms during the load: {gc['over_25ms']}."]
    return lines


def _column(client: Mapping[str, Any], metrics: Mapping[str, Any], resources: Mapping[str, Any],
            bound: str = "") -> dict[str, str]:
    """One column of the per-node table: the client's counts, the server's /metrics changes
    and the process's resources (``bound`` = "≤ " for sums of peaks)."""
    return {
        "sockets opened (client)": str(client["connections"]),
        "runs started (client)": str(client["runs_started"]),
        "events received (client)": str(client["events"]),
        "resumes arriving (client)": str(client["resumes_in"]),
        "connections peak (/metrics)": f"{bound}{metrics['connections_peak']}",
        "runs started (/metrics)": str(metrics["runs_started"]),
        "events emitted (/metrics)": str(metrics["events_emitted"]),
        "events delivered (/metrics)": str(metrics["events_delivered"]),
        "events retried / failed": f"{metrics['events_retried']} / {metrics['events_failed']}",
        "resumes ok / unavailable / not found": f"{metrics['resumes_ok']} / "
        f"{metrics['resumes_unavailable']} / {metrics['resumes_not_found']}",
        "4008 closes / error frames": f"{metrics['closes_4008']} / {metrics['errors']}",
        "CPU mean / max": f"{resources['cpu_mean_percent']}% / {resources['cpu_max_percent']}%",
        "peak RSS": f"{bound}{resources['peak_rss_mib']} MiB",
        "GC pauses (count / total / longest)": gc_text(metrics["gc"]),
        "exit code": str(resources.get("exit_code", "")),
    }


def nodes_markdown(summary: Mapping[str, Any]) -> list[str]:
    """The per-node table, with a column for the whole service (sums; a sum of per-node
    peaks is an upper bound, marked ≤), and Redis's resources."""
    nodes, service = summary["nodes"], summary["service"]
    columns = [_column(node["client"], node["metrics"], node) for node in nodes]
    columns.append(_column(service["client"], service["metrics"], service, "≤ "))
    header = ["figure", *(node["label"] for node in nodes), "service"]
    lines = [
        "## Nodes",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for name in columns[0]:
        lines.append(f"| {name} | " + " | ".join(column[name] for column in columns) + " |")
    redis = summary.get("redis")
    if redis:
        lines += [
            "",
            f"Redis ({redis['url']}): CPU mean {redis['cpu_mean_percent']}%, "
            f"peak RSS {redis['peak_rss_mib']} MiB, exit code {redis['exit_code']}.",
        ]
    return lines


def node_path_markdown(table: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The latency of a multi-node test by delivery path, as Markdown lines."""
    names = {
        "home_node": "on the home node (the node running the run)",
        "other_node": "on another node, after a cross-node resume (mirror)",
    }
    lines = [
        "## Delivery latency by path (ms)",
        "",
        "| events received | count | p50 | p95 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, row in table.items():
        lines.append(
            f"| {names.get(key, key)} | {row['count']:.0f} | {row['p50']:.2f} | "
            f"{row['p95']:.2f} | {row['p99']:.2f} | {row['max']:.2f} |"
        )
    return lines


def latency_markdown(table: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Return the per-event-type latency table as Markdown lines."""
    lines = [
        "## Delivery latency (ms, receive time - ts)",
        "",
        "| event | count | p50 | p95 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for etype, row in table.items():
        lines.append(
            f"| {etype} | {row['count']:.0f} | {row['p50']:.2f} | {row['p95']:.2f} | "
            f"{row['p99']:.2f} | {row['max']:.2f} |"
        )
    return lines


def _bins(samples: LatencySamples) -> tuple[list[float], dict[str, list[float]], list[int]]:
    """Group all samples into 1-second bins: (bin starts, percentile series, counts)."""
    pairs = sorted(
        (t, ms)
        for t_list, ms_list in samples.series().values()
        for t, ms in zip(t_list, ms_list, strict=True)
    )
    if not pairs:
        return [], {}, []
    start = pairs[0][0]
    grouped: dict[int, list[float]] = {}
    for t, ms in pairs:
        grouped.setdefault(int(t - start), []).append(ms)
    keys = sorted(grouped)
    rows = [summarize(histogram_of(grouped[k])) for k in keys]
    series = {name: [row[name] for row in rows] for name in ("p50", "p95", "p99", "max")}
    return [float(k) for k in keys], series, [len(grouped[k]) for k in keys]


def plot_over_time(samples: LatencySamples, path: Path) -> None:
    """Draw p50/p95/p99/max delivery latency per second, and events/s, over the test."""
    seconds, series, counts = _bins(samples)
    fig, ax = plt.subplots(figsize=(10, 5))
    for name, values in series.items():
        ax.plot(seconds, values, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("seconds since first event")
    ax.set_ylabel("delivery latency (ms, log)")
    rate = ax.twinx()
    rate.plot(seconds, counts, color="grey", alpha=0.4, label="events/s")
    rate.set_ylabel("events/s")
    if seconds:
        ax.legend(loc="upper left")
    ax.set_title("Delivery latency over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_distribution(samples: LatencySamples, path: Path) -> None:
    """Draw the latency CDF of each event type (log x)."""
    fig, ax = plt.subplots(figsize=(10, 5))
    for etype, (_, millis) in sorted(samples.series().items()):
        values = sorted(max(ms, 0.001) for ms in millis)
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        ax.plot(values, fractions, label=f"{etype} (n={len(values)})")
    ax.set_xscale("log")
    ax.set_xlabel("delivery latency (ms, log)")
    ax.set_ylabel("fraction of events")
    ax.grid(True, which="both", alpha=0.3)
    if samples.series():
        ax.legend(loc="lower right", fontsize="small")
    ax.set_title("Delivery latency distribution (CDF)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_resources(
    samples: Sequence[Sample] | Mapping[str, Sequence[Sample]], path: Path
) -> None:
    """Draw CPU % and RSS over the test: of the server, or of each process named in a mapping
    (the nodes and Redis of a multi-node test)."""
    series = {"server": samples} if not isinstance(samples, Mapping) else dict(samples)
    series = {name: list(values) for name, values in series.items() if values}
    if not series:
        return
    start = min(values[0].t for values in series.values())
    fig, (cpu, mem) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for name, values in series.items():
        times = [s.t - start for s in values]
        cpu.plot(times, [s.cpu_percent for s in values], label=name)
        mem.plot(times, [s.rss_bytes / MIB for s in values], label=name)
    cpu.set_ylabel("CPU % (100 = one core)")
    mem.set_ylabel("RSS (MiB)")
    mem.set_xlabel("seconds")
    cpu.legend(loc="upper left", fontsize="small")
    cpu.set_title("Server resources" if len(series) == 1 else "Resources per process")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def console_table(summary: Mapping[str, Any]) -> str:
    """Return the end-of-run summary for the terminal."""
    lines = render_markdown(summary).splitlines()
    return "\n".join(line for line in lines if line.strip() != "") + "\n"


def nan_free(value: float) -> float:
    """Return ``value`` or 0.0 when it is NaN or infinite (JSON has neither)."""
    return value if math.isfinite(value) else 0.0
