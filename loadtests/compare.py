"""The delivery-mode comparison: the same load with socket drops, once per ``delivery_mode``.

``python -m loadtests.run --compare-delivery-modes`` runs the load against ``registry`` (the
retained, resumable delivery) and then ``direct`` (the legacy path the migration rolls back
to), each writing its own full report in a sub-folder, and this module puts the two side by
side in the top folder's ``summary.json``, ``summary.md`` and ``delivery_modes.png``: events
lost, runs never ended (a run whose terminal event the client never got), duplicated, and the
delivery latency percentiles. Pure apart from writing the files; no locust, no trio.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MODES: Final = ("registry", "direct")
"""The modes compared, in order: the migration's target first, the legacy path second."""

ROWS: Final = (
    ("runs started", "runs_started"),
    ("socket drops (each followed by a resume)", "drops"),
    ("runs cut (resume declined)", "runs_cut"),
    ("events expected", "events_expected"),
    ("events delivered", "events_delivered"),
    ("**events lost**", "events_lost"),
    ("**runs never ended** (no terminal event)", "runs_never_ended"),
    ("**duplicated**", "duplicated"),
    ("reordered", "reordered"),
    ("foreign", "foreign"),
    ("latency p50 (ms)", "latency_p50_ms"),
    ("latency p95 (ms)", "latency_p95_ms"),
    ("latency p99 (ms)", "latency_p99_ms"),
    ("events/s", "events_per_second"),
    ("verdict", "verdict"),
)
"""(row label, key of :func:`mode_row`) of the comparison table."""


def mode_row(summary: Mapping[str, Any], report_dir: str = "") -> dict[str, Any]:
    """The figures of one mode's load-test summary that the comparison shows."""
    events, runs, latency = summary["events"], summary["runs"], summary["latency_ms"]["all"]
    return {
        "delivery_mode": summary["config"].get("delivery_mode", "registry"),
        "runs_started": runs["started"],
        "drops": runs["drops"],
        "runs_cut": runs.get("cut", 0),
        "events_expected": events["expected"],
        "events_delivered": events["delivered"],
        "events_lost": events.get("lost_total", events["lost"]),
        "lost_is_lower_bound": bool(events.get("lost_is_lower_bound", False)),
        "runs_never_ended": events.get("never_ended", events["unterminated"]),
        "duplicated": events["duplicated"],
        "reordered": events["reordered"],
        "foreign": events["foreign"],
        "latency_p50_ms": latency["p50"],
        "latency_p95_ms": latency["p95"],
        "latency_p99_ms": latency["p99"],
        "events_per_second": events["per_second"],
        "passed": bool(summary["slo"]["passed"]),
        "verdict": "PASS" if summary["slo"]["passed"] else "FAIL",
        "problems": list(summary["slo"]["problems"]),
        "report": report_dir,
    }


def _cell(row: Mapping[str, Any], key: str) -> str:
    """One table cell; a lower-bound loss is shown as ``≥ n``."""
    value = row[key]
    if key == "events_lost" and row.get("lost_is_lower_bound"):
        return f"≥ {value}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def conclusion(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per mode: what a dropped socket costs the user in it."""
    lines = []
    for mode, row in rows.items():
        lost, expected = row["events_lost"], row["events_expected"]
        bound = "at least " if row["lost_is_lower_bound"] else ""
        lines.append(
            f"- **{mode}**: {row['drops']} socket drops; {bound}{lost} of {expected} events lost "
            f"({_share(lost, expected)}), {row['runs_never_ended']} of {row['runs_started']} "
            f"runs never ended for their user, {row['duplicated']} duplicated."
        )
    return lines


def render_markdown(comparison: Mapping[str, Any]) -> str:
    """The comparison's ``summary.md``: the table (modes side by side), the conclusion, notes."""
    rows: Mapping[str, Mapping[str, Any]] = comparison["modes"]
    modes = list(rows)
    config = comparison["config"]
    verdict = "PASS" if comparison["passed"] else "FAIL"
    lines = [
        f"# Delivery modes compared {comparison['started_at']} — {verdict}",
        "",
        f"The same load twice: {config['users']} users for {config['duration_s']} s, "
        f"{config['drop_fraction']:.0%} of them dropping their socket mid-run and resuming, "
        f"agents `{config['agent_mix']}`, {config.get('nodes') or 1} node(s), seed "
        f"{config.get('seed')} (the same users drop, with the same agents and plans).",
        "",
        "| figure | " + " | ".join(f"`{mode}`" for mode in modes) + " |",
        "|---|" + "---:|" * len(modes),
    ]
    for label, key in ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(rows[m], key) for m in modes) + " |")
    lines += ["", *conclusion(rows), ""]
    lines += [
        "Notes:",
        "- `direct` answers a resume `resume_unavailable`: the rest of that run is lost and "
        "its user never sees it end (counted here, not failed). `registry` replays it.",
        "- Latency is from the event's `ts` to its receipt; in `registry` it includes the "
        "replays after a reconnect (delivered late rather than never).",
        "- Each mode's full report: " + ", ".join(f"[{m}]({rows[m]['report']}/summary.md)"
                                                 for m in modes) + ".",
        "",
        "![delivery modes](delivery_modes.png)",
        "",
    ]
    for mode in modes:
        lines += [f"- `{mode}` problem: {problem}" for problem in rows[mode]["problems"]]
    return "\n".join(lines) + "\n"


def plot(rows: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Draw the comparison, one bar per mode: events lost and duplicated, runs never ended
    (of runs started), delivery latency percentiles."""
    modes = list(rows)
    fig, (events, runs, lat) = plt.subplots(1, 3, figsize=(14, 4.5),
                                            gridspec_kw={"width_ratios": [2, 2, 3]})
    _bars(events, modes, rows, (("lost", "events_lost"), ("duplicated", "duplicated")))
    events.set_title("Events a dropped socket costs")
    events.set_ylabel("events")
    _bars(runs, modes, rows, (("never ended", "runs_never_ended"), ("started", "runs_started")))
    runs.set_title("Runs whose user never saw the end")
    runs.set_ylabel("runs")
    _bars(lat, modes, rows, (("p50", "latency_p50_ms"), ("p95", "latency_p95_ms"),
                             ("p99", "latency_p99_ms")))
    lat.set_title("Delivery latency")
    lat.set_ylabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(ax: Any, modes: Sequence[str], rows: Mapping[str, Mapping[str, Any]],
          figures: Sequence[tuple[str, str]]) -> None:
    """Grouped bars: one group per figure, one bar per mode, each labelled with its value."""
    width = 0.8 / max(1, len(modes))
    for index, mode in enumerate(modes):
        xs = [f + index * width for f in range(len(figures))]
        values = [float(rows[mode][key]) for _, key in figures]
        bars = ax.bar(xs, values, width, label=mode)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize="small")
    ax.set_xticks([f + width * (len(modes) - 1) / 2 for f in range(len(figures))])
    ax.set_xticklabels([label for label, _ in figures])
    ax.legend()


def write(comparison: Mapping[str, Any], out: Path) -> None:
    """Write ``summary.json``, ``summary.md`` and ``delivery_modes.png`` into ``out``."""
    (out / "summary.json").write_text(json.dumps(comparison, indent=2) + "\n")
    (out / "summary.md").write_text(render_markdown(comparison))
    plot(comparison["modes"], out / "delivery_modes.png")


def build(started_at: str, config: Mapping[str, Any],
          summaries: Mapping[str, tuple[Mapping[str, Any], str]]) -> dict[str, Any]:
    """The comparison from each mode's summary and report folder (relative to the top one).

    It passes when every mode's own verdict passed (``direct`` tolerates its losses).
    """
    rows = {mode: mode_row(summary, folder) for mode, (summary, folder) in summaries.items()}
    return {
        "started_at": started_at,
        "kind": "delivery_mode_comparison",
        "config": dict(config),
        "modes": rows,
        "passed": all(row["passed"] for row in rows.values()),
    }
