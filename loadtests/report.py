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
    """Merge every ``events-*.json`` in ``folder`` into one tally and one sample set."""
    tally = Tally()
    parts = []
    for path in sorted(folder.glob("events-*.json")):
        data = json.loads(path.read_text())
        tally.merge(data["tally"])
        parts.append(data["samples"])
    return tally, LatencySamples.merged(parts)


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
    """Return the delivery figures: expected, delivered, each violation kind, ratio, rate."""
    expected = tally.counts["events_expected"]
    delivered = tally.counts["events_delivered"]
    counts: dict[str, Any] = {"expected": expected, "delivered": delivered}
    names = {Kind.DUPLICATE: "duplicated"}
    for kind in Kind:
        counts[names.get(kind, kind.value)] = tally.violations[kind.value]
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


def slo_problems(summary: Mapping[str, Any], p95_ms: float, p99_ms: float) -> list[str]:
    """Return every failed SLO of a summary (empty when the run passed)."""
    events, latency = summary["events"], summary["latency_ms"]["all"]
    problems = [
        f"{events[name]} {name}"
        for name in (
            "lost",
            "duplicated",
            "reordered",
            "foreign",
            "unterminated",
            "unpaired_tool",
            "malformed",
        )
        if events[name]
    ]
    if events["delivered"] < events["expected"] or not events["expected"]:
        problems.append(f"delivery {events['delivered']}/{events['expected']} below 100%")
    if latency["p95"] > p95_ms:
        problems.append(f"p95 {latency['p95']:.1f} ms > {p95_ms:.0f} ms")
    if latency["p99"] > p99_ms:
        problems.append(f"p99 {latency['p99']:.1f} ms > {p99_ms:.0f} ms")
    problems.extend(_process_problems(summary))
    return problems


def _process_problems(summary: Mapping[str, Any]) -> list[str]:
    """Return the failures of the processes themselves (Locust verdict, server exit)."""
    problems = []
    if summary["locust"]["exit_code"] != 0:
        problems.append(f"locust exited {summary['locust']['exit_code']} (see locust.log)")
    if summary["server"]["exit_code"] != 0:
        problems.append(f"server exited {summary['server']['exit_code']} on SIGINT")
    if summary["runs"]["failed_to_start"]:
        problems.append(f"{summary['runs']['failed_to_start']} runs failed to start")
    return problems


def render_markdown(summary: Mapping[str, Any]) -> str:
    """Return ``summary.md``: verdict, run and delivery figures, the latency table."""
    runs, events, server = summary["runs"], summary["events"], summary["server"]
    verdict = "PASS" if summary["slo"]["passed"] else "FAIL"
    lines = [f"# Load test {summary['started_at']} — {verdict}", ""]
    lines += [f"- {problem}" for problem in summary["slo"]["problems"]] or ["- every SLO met"]
    lines += ["", "| figure | value |", "|---|---|"]
    rows = [
        ("users / duration", f"{summary['config']['users']} / {summary['config']['duration_s']} s"),
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
        ("events/s", f"{events['per_second']}"),
        ("server CPU mean / max", f"{server['cpu_mean_percent']}% / {server['cpu_max_percent']}%"),
        ("server peak RSS", f"{server['peak_rss_mib']} MiB"),
    ]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join([*lines, "", *latency_markdown(summary["latency_ms"]), ""])


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


def plot_resources(samples: Sequence[Sample], path: Path) -> None:
    """Draw the server's CPU % and RSS over the test."""
    if not samples:
        return
    start = samples[0].t
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot([s.t - start for s in samples], [s.cpu_percent for s in samples], label="CPU %")
    ax.set_ylabel("server CPU % (100 = one core)")
    ax.set_xlabel("seconds")
    mem = ax.twinx()
    mem.plot(
        [s.t - start for s in samples],
        [s.rss_bytes / MIB for s in samples],
        color="tab:red",
        label="RSS MiB",
    )
    mem.set_ylabel("server RSS (MiB)")
    ax.set_title("Server resources")
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
