"""Write the benchmark results: JSON per scenario, derived ratios, PNG plots and REPORT.md.

Pure data in, files out (matplotlib with the Agg backend). No trio, no locust.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks import reporting_lean as lean
from benchmarks import reporting_nodes as multi

Results = Mapping[str, Mapping[str, Any]]
SCENARIO_FILES = (
    "sweep", "fanout", "idle", "drops", "active", "nodes", "delivery", "soak", "retained"
)
KINDS = ("lost", "duplicate", "reordered", "foreign", "unterminated", "unpaired_tool", "malformed")
GOALS = {
    "fanout_p95_ms": 10.0,
    "fanout_p99_ms": 25.0,
    "idle_sockets": 10_000,
    "idle_kib_per_socket": 30.0,
    "overhead_pct": 20.0,
    "max_rate": 12_000.0,
    "active_cpu_x_websockets": 1.3,
    "active_cpu_x_baseline": 1.15,
    "gc_pause_ms": lean.GC_PAUSE_LIMIT_MS,
}


def overhead(results: Results) -> dict[str, Any]:
    """Return registry-vs-baseline ratios: max sustained rate, p99 at common rates, fan-out."""
    sweeps, fan = results.get("sweep", {}), results.get("fanout", {})
    if "registry" not in sweeps or "baseline" not in sweeps:
        return {}
    reg, base = sweeps["registry"], sweeps["baseline"]
    rate_ratio = reg["max_sustained_rate"] / max(base["max_sustained_rate"], 1e-9)
    p99_ratios = common_p99_ratios(reg["steps"], base["steps"])
    out: dict[str, Any] = {
        "max_rate_registry": reg["max_sustained_rate"],
        "max_rate_baseline": base["max_sustained_rate"],
        "max_rate_ratio": round(rate_ratio, 3),
        "rate_overhead_pct": round((1 - rate_ratio) * 100, 1),
        "p99_ratio_by_rate": p99_ratios,
        "p99_ratio_median": round(statistics.median(p99_ratios.values()), 3)
        if p99_ratios
        else None,
    }
    if "registry" in fan and "baseline" in fan:
        ratio = fan["registry"]["latency_ms"]["p99"] / max(
            fan["baseline"]["latency_ms"]["p99"], 1e-9
        )
        out["fanout_p99_ratio"] = round(ratio, 3)
    median = out["p99_ratio_median"]
    out["p99_overhead_pct"] = round((median - 1) * 100, 1) if median is not None else None
    return out


def common_p99_ratios(reg: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, float]:
    """Return registry p99 / baseline p99 at each offered rate both measured."""
    base_by_rate = {step["offered_rate"]: step for step in base}
    ratios = {}
    for step in reg:
        other = base_by_rate.get(step["offered_rate"])
        if other is not None and other["latency_ms"]["p99"] > 0:
            ratio = step["latency_ms"]["p99"] / other["latency_ms"]["p99"]
            ratios[str(int(step["offered_rate"]))] = round(ratio, 3)
    return ratios


def guarantees(result: Mapping[str, Any]) -> dict[str, Any]:
    """Return what a drops run kept: counts per violation kind and a yes/no per guarantee."""
    violations = result["tally"]["violations"]
    counts = result["tally"]["counts"]
    kept = {
        "no_loss": not violations.get("lost") and not violations.get("unterminated"),
        "no_duplicate": not violations.get("duplicate"),
        "order": not violations.get("reordered"),
        "isolation": not violations.get("foreign"),
        "tool_pairs": not violations.get("unpaired_tool"),
    }
    return {
        "drops": counts["drops"],
        "runs": counts["runs_started"],
        "events_expected": counts["events_expected"],
        "events_delivered": counts["events_delivered"],
        "violations": {kind: violations.get(kind, 0) for kind in KINDS},
        "kept": kept,
    }


def load_results(out: Path) -> dict[str, Any]:
    """Return every scenario's results found in ``<out>/*.json``."""
    return {
        name: json.loads((out / f"{name}.json").read_text())
        for name in SCENARIO_FILES
        if (out / f"{name}.json").exists()
    }


def problems(results: Results, failures: list[str]) -> list[str]:
    """Return why the session failed: scenarios that did not run, a registry violation in
    any scenario, or any violation of any server in the lean scenarios."""
    return [
        *registry_problems(results, failures),
        *lean.lean_problems(results),
        *multi.nodes_problems(results.get("nodes", {})),
        *multi.delivery_problems(results.get("delivery", {})),
    ]


def registry_problems(results: Results, failures: list[str]) -> list[str]:
    """Return why the session failed: scenarios that did not run, registry violations."""
    problems = list(failures)
    for scenario in ("fanout", "drops"):
        result = results.get(scenario, {}).get("registry")
        if result and any(result["tally"]["violations"].values()):
            problems.append(f"registry {scenario}: violations {result['tally']['violations']}")
    for step in results.get("sweep", {}).get("registry", {}).get("steps", []):
        if any(step["tally"]["violations"].values()):
            problems.append(f"registry sweep {step['offered_rate']}: {step['tally']['violations']}")
    return problems


def write_json(out: Path, name: str, data: Any) -> None:
    """Write ``<out>/<name>.json``."""
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def write_all(
    results: Results,
    machine: Mapping[str, Any],
    failures: list[str],
    out: Path,
    report_path: Path,
    before_dir: Path | None = None,
) -> list[str]:
    """Write the derived JSON, every PNG and the report from ``results`` (every scenario found);
    return their problems."""
    derived = {
        "overhead": overhead(results),
        "guarantees": {k: guarantees(v) for k, v in results.get("drops", {}).items()},
        "before": lean.load_before(before_dir),
    }
    found = problems(results, failures)
    write_json(out, "overhead", derived["overhead"])
    if {"sweep", "fanout"} <= results.keys():
        write_json(out, "peers", peers_table(results, derived))
    write_json(out, "run", {**machine, "failures": failures, "problems": found})
    plot_all(results, out)
    report_path.write_text(render(results, derived, machine, found, out, report_path))
    return found


def peers_table(results: Results, derived: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Return, per server, max sustained rate, p99 at the lowest rate, fan-out p99, drops."""
    table: dict[str, dict[str, Any]] = {}
    for name, sweep in results["sweep"].items():
        first = sweep["steps"][0] if sweep["steps"] else None
        fan = results.get("fanout", {}).get(name)
        table[name] = {
            "max_sustained_rate": sweep["max_sustained_rate"],
            "p99_ms_at_lowest_rate": first["latency_ms"]["p99"] if first else None,
            "fanout_p99_ms": fan["latency_ms"]["p99"] if fan else None,
            "drops": derived["guarantees"].get(name),
        }
    return table


def _fig(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    """Return a new figure and axes with labels."""
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _save(fig: Any, path: Path) -> None:
    """Save and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(results: Results, out: Path) -> None:
    """Plot p50/p95/p99 vs offered rate per server, and achieved vs offered."""
    fig, ax = _fig("Delivery latency vs offered event rate", "offered events/s", "ms (log)")
    fig2, ax2 = _fig("Achieved vs offered event rate", "offered events/s", "achieved events/s")
    for index, (name, sweep) in enumerate(results["sweep"].items()):
        color = f"C{index}"
        rates = [s["offered_rate"] for s in sweep["steps"]]
        for pct, style in (("p50", ":"), ("p95", "--"), ("p99", "-")):
            values = [s["latency_ms"][pct] for s in sweep["steps"]]
            ax.plot(rates, values, style, color=color, marker="o", label=f"{name} {pct}")
        ax2.plot(rates, [s["achieved_rate"] for s in sweep["steps"]], "-o", color=color, label=name)
    ax.axhline(50, color="red", linewidth=0.8, label="p99 limit 50 ms")
    ax.set_yscale("log")
    ax.legend(fontsize="x-small", ncol=2)
    top = max(
        [r for sw in results["sweep"].values() for r in (s["offered_rate"] for s in sw["steps"])]
        or [1]
    )
    ax2.plot([0, top], [0, top], color="grey", linewidth=0.8, label="offered")
    ax2.legend(fontsize="small")
    _save(fig, out / "latency_vs_rate.png")
    _save(fig2, out / "achieved_vs_offered.png")


def plot_bars(
    groups: Mapping[str, Mapping[str, float]],
    path: Path,
    title: str,
    ylabel: str,
    goals: Mapping[str, float] | None = None,
) -> None:
    """Draw grouped bars: one group per server, one bar per series."""
    fig, ax = _fig(title, "", ylabel)
    names = list(groups)
    series = sorted({key for values in groups.values() for key in values})
    width = 0.8 / max(len(series), 1)
    for index, key in enumerate(series):
        xs = [i + index * width for i in range(len(names))]
        ax.bar(xs, [groups[n].get(key, 0) for n in names], width, label=key)
    for label, value in (goals or {}).items():
        ax.axhline(value, color="red", linewidth=0.8, linestyle="--")
        ax.annotate(label, (0, value), fontsize="small", color="red")
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(names))], names)
    ax.legend(fontsize="small")
    _save(fig, path)


def plot_idle(results: Results, out: Path) -> None:
    """Plot the server's RSS per idle socket vs sockets held."""
    fig, ax = _fig("Server memory per idle socket", "idle sockets held", "KiB per socket")
    for name, data in results["idle"].items():
        rows = data["levels"]
        ax.plot([r["level"] for r in rows], [r["kib_per_socket"] for r in rows], "-o", label=name)
    ax.axhline(GOALS["idle_kib_per_socket"], color="red", linestyle="--", label="goal 30 KiB")
    ax.legend()
    _save(fig, out / "idle_rss.png")


def plot_all(results: Results, out: Path) -> None:
    """Draw every PNG the results allow."""
    if "sweep" in results:
        plot_sweep(results, out)
    if "fanout" in results:
        fan = {
            n: {k: r["latency_ms"][k] for k in ("p50", "p95", "p99")}
            for n, r in results["fanout"].items()
        }
        plot_bars(
            fan,
            out / "fanout_latency.png",
            "Fan-out: latency (ms)",
            "ms",
            {"p95 goal": GOALS["fanout_p95_ms"], "p99 goal": GOALS["fanout_p99_ms"]},
        )
    if "idle" in results:
        plot_idle(results, out)
    if "drops" in results:
        lost = {
            n: {k: float(v) for k, v in guarantees(r)["violations"].items() if v}
            for n, r in results["drops"].items()
        }
        plot_bars(lost, out / "drops_violations.png", "Socket drops: violations by kind", "events")
    if "active" in results:
        lean.plot_active(results["active"], out)
    if "soak" in results:
        lean.plot_soak(results["soak"], out)
    if "nodes" in results:
        multi.plot_nodes(results["nodes"], out)


def render(
    results: Results,
    derived: Mapping[str, Any],
    machine: Mapping[str, Any],
    problems: list[str],
    out: Path,
    report_path: Path,
) -> str:
    """Return REPORT.md: a section for every scenario present, in a fixed order."""
    rel = _relative(out, report_path.parent)
    sections: list[tuple[str, Any]] = [
        ("sweep", lambda n: _sweep_section(results, rel, n)),
        ("fanout", lambda n: _fanout_section(results, rel, n)),
        ("idle", lambda n: _idle_section(results, rel, n)),
        ("overhead", lambda n: _overhead_section(derived["overhead"], n)),
        ("drops", lambda n: _drops_section(derived["guarantees"], rel, n)),
        ("active", lambda n: lean.active_section(results["active"], rel, n)),
        ("nodes", lambda n: multi.nodes_section(results["nodes"], rel, n)),
        ("delivery", lambda n: multi.delivery_section(results["delivery"], n)),
        ("soak", lambda n: lean.soak_section(results["soak"], rel, n)),
        ("retained", lambda n: lean.retained_section(results["retained"], n)),
        ("before", lambda n: lean.before_section(results, derived["before"], n)),
    ]
    present = {*results, "overhead", "before"} if derived["overhead"] else {*results, "before"}
    parts = [_header(machine, problems), _goals(results, derived)]
    number = 1
    for name, section in sections:
        if name in present:
            text = section(number)
            if text:
                parts.append(text)
                number += 1
    parts.append(_method())
    return "\n\n".join(parts) + "\n"


def _relative(out: Path, base: Path) -> str:
    """Return ``out`` relative to ``base`` when possible (for links in the report)."""
    try:
        return str(out.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(out)


def _header(machine: Mapping[str, Any], problems: list[str]) -> str:
    """Return the report's title, run description and problems."""
    kind = "smoke (small scale)" if machine["smoke"] else "full scale"
    measured = machine.get("measured", {})
    lines = [
        f"# Benchmarks — {kind}, last session {machine['started_at']} UTC",
        "",
        f"{machine['cpus']} CPUs, Python {machine['python']}, {machine['platform']}, "
        f"fd limit {machine['fd_limit']}, the last session took {machine['duration_s']} s "
        f"({', '.join(machine.get('scenarios', [])) or 'every scenario'}), load average at its "
        f"end {machine.get('load_average_at_end')}. Server and load generator are separate "
        "processes on the same (shared, noisy) machine; compare servers through the ratios "
        "measured in this same run. Registry and baseline sweep/fan-out figures are the "
        "median-p99 trial of three interleaved trials (full run).",
    ]
    if measured:
        when = ", ".join(f"{name} {stamp}" for name, stamp in sorted(measured.items()))
        lines += ["", f"Each section was last measured at (UTC): {when}."]
    if problems:
        lines += ["", "**Problems:**", *[f"- {p}" for p in problems]]
    return "\n".join(lines)


Goal = tuple[str, Any, Any, str]
"""(goal, measured or None, target, ``<=`` or ``>=``)."""


def _goal_rows(results: Results, derived: Mapping[str, Any]) -> list[Goal]:
    """Return the registry's goals, classic scenarios first."""
    fan = results.get("fanout", {}).get("registry")
    lat = fan["latency_ms"] if fan else {}
    levels = results.get("idle", {}).get("registry", {}).get("levels", [])
    top = levels[-1] if levels else {}
    ovh = derived["overhead"]
    return [
        ("fan-out p95 (ms)", lat.get("p95"), GOALS["fanout_p95_ms"], "<="),
        ("fan-out p99 (ms)", lat.get("p99"), GOALS["fanout_p99_ms"], "<="),
        ("idle sockets held (answering ping)", top.get("alive"), top.get("level"), ">="),
        ("server RSS per idle socket (KiB)", top.get("kib_per_socket"),
         GOALS["idle_kib_per_socket"], "<="),
        *_rate_goals(results),
        ("max sustained rate overhead vs baseline (%)", ovh.get("rate_overhead_pct"),
         GOALS["overhead_pct"], "<="),
        ("p99 overhead vs baseline (%)", ovh.get("p99_overhead_pct"), GOALS["overhead_pct"], "<="),
        *_lean_goals(results),
    ]


def _rate_goals(results: Results) -> list[Goal]:
    """The max-sustained-rate goals: 12,000 events/s, ahead of socketio, at least the baseline."""
    rates = {name: s["max_sustained_rate"] for name, s in results.get("sweep", {}).items()}
    mine = rates.get("registry")

    def versus(other: str) -> float | None:
        theirs = rates.get(other)
        return round(mine / theirs, 3) if mine is not None and theirs else None

    return [
        ("max sustained rate, p99 <= 50 ms (events/s)", mine, GOALS["max_rate"], ">="),
        ("max sustained rate vs python-socketio (x)", versus("socketio"), 1.0, ">="),
        ("max sustained rate vs bare trio baseline (x)", versus("baseline"), 1.0, ">="),
    ]


def _lean_goals(results: Results) -> list[Goal]:
    """The goals of the active and soak scenarios."""
    rows: list[Goal] = []
    active = lean.active_summary(results.get("active", {})).get("registry")
    if active:
        rows += [
            ("active: CPU per event vs websockets peer (x)", active["x_websockets"],
             GOALS["active_cpu_x_websockets"], "<="),
            ("active: CPU per event vs bare trio baseline (x)", active["x_baseline"],
             GOALS["active_cpu_x_baseline"], "<="),
            ("active: violations (lost/dup/reordered/foreign...)", active["violations"], 0, "<="),
            ("active: longest GC pause in the window (ms, at most)", active["gc_longest_ms"],
             GOALS["gc_pause_ms"], "<="),
        ]
    if results.get("soak"):
        for check in lean.soak_verdict(results["soak"]):
            if check["met"] is None and check["measured"] is not None:
                continue  # shown for information in the soak section
            rows.append((f"soak: {check['check']}", check["measured"], check["limit"],
                         "met" if check["met"] else "missed"))
    return rows


def _goals(results: Results, derived: Mapping[str, Any]) -> str:
    """Return the goals table for the registry."""
    lines = ["## Goals (registry)", "", "| goal | measured | target | |", "|---|---:|---:|---|"]
    for goal, value, target, rule in _goal_rows(results, derived):
        if value is None or target is None:
            lines.append(f"| {goal} | n/a | {target} | n/a |")
            continue
        if rule in ("met", "missed"):
            ok = rule == "met"
        else:
            ok = value >= target if rule == ">=" else value <= target
        target_text = f"{rule} {target}" if rule in ("<=", ">=") else target
        lines.append(f"| {goal} | {value} | {target_text} | {'met' if ok else '**missed**'} |")
    return "\n".join(lines)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Return a Markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _sweep_rows(results: Results) -> Iterator[list[Any]]:
    """Yield one table row per sweep step."""
    for name, sweep in results["sweep"].items():
        for s in sweep["steps"]:
            lat = s["latency_ms"]
            yield [
                name,
                f"{s['offered_rate']:.0f}",
                f"{s['achieved_rate']:.0f}",
                lat["p50"],
                lat["p95"],
                lat["p99"],
                s["server_cpu_percent"],
                s.get("cpu_us_per_event"),
                s["loadgen_cpu_percent"],
                (s.get("window") or {}).get("other_processes_cpu_percent"),
            ]


def _sweep_section(results: Results, rel: str, number: int) -> str:
    """Return the latency-vs-rate section."""
    headers = [
        "server",
        "offered/s",
        "achieved/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "server CPU %",
        "CPU us/event",
        "loadgen CPU %",
        "other processes CPU %",
    ]
    best = ", ".join(
        f"{n} **{s['max_sustained_rate']:.0f}/s**" for n, s in results["sweep"].items()
    )
    lines = [
        f"## {number}. Latency vs offered event rate",
        "",
        f"![latency vs rate]({rel}/latency_vs_rate.png) "
        f"![achieved vs offered]({rel}/achieved_vs_offered.png)",
        "",
        *_table(headers, _sweep_rows(results)),
        "",
        "Other processes CPU % = the machine's busy CPU time over the window minus the "
        "server's and the generator's (200 % = both cores): a step with a high figure was "
        "disturbed by something else on this shared machine.",
        "",
        "Max sustained rate = highest achieved rate of a step with p99 <= 50 ms and not "
        "saturated (achieved/offered >= 80 % of that server's ratio at the lowest rate): " + best,
    ]
    return "\n".join(lines)


def _fanout_section(results: Results, rel: str, number: int) -> str:
    """Return the fan-out section."""
    lines = [
        f"## {number}. Fan-out: many sockets, concurrent runs",
        "",
        f"![fan-out]({rel}/fanout_latency.png)",
        "",
        *_table(
            ("server", "sockets", "runs", "events/s", "p50 ms", "p95 ms", "p99 ms", "max ms",
             "server CPU %"),
            ([name, r["sockets"], r["concurrent_runs"], f"{r['achieved_rate']:.0f}",
              r["latency_ms"]["p50"], r["latency_ms"]["p95"], r["latency_ms"]["p99"],
              r["latency_ms"]["max"], r["server_cpu_percent"]]
             for name, r in results["fanout"].items()),
        ),
    ]
    return "\n".join(lines)


def _idle_section(results: Results, rel: str, number: int) -> str:
    """Return the idle-sockets section."""
    lines = [
        f"## {number}. Idle sockets and server memory",
        "",
        f"![idle RSS]({rel}/idle_rss.png)",
        "",
        *_table(
            ("server", "sockets", "answering ping", "server RSS MiB", "KiB per socket"),
            ([name, row["level"], row["alive"], row["rss_mib"], row["kib_per_socket"]]
             for name, data in results["idle"].items() for row in data["levels"]),
        ),
    ]
    lines += [
        "",
        "RSS per socket = (server RSS with N sockets - RSS before any) / N. The load "
        "generator raises its RLIMIT_NOFILE soft limit to the hard limit, the runner does "
        "the same before starting servers (10k sockets need 10k descriptors on each side); "
        "sockets are spread over many users, 4 per user, below `max_connections_per_user`.",
    ]
    return "\n".join(lines)


def _overhead_section(ovh: Mapping[str, Any], number: int) -> str:
    """Return the registry-overhead section."""
    if not ovh:
        missing = "Not measured (registry or baseline sweep missing)."
        return f"## {number}. Registry overhead\n\n{missing}"
    return "\n".join(
        [
            f"## {number}. Registry overhead vs the bare trio-websocket baseline",
            "",
            f"- max sustained rate: registry {ovh['max_rate_registry']:.0f}/s, baseline "
            f"{ovh['max_rate_baseline']:.0f}/s, ratio {ovh['max_rate_ratio']} "
            f"(overhead {ovh['rate_overhead_pct']} %)",
            f"- p99 ratio registry/baseline by offered rate: {ovh['p99_ratio_by_rate']} "
            f"(median {ovh['p99_ratio_median']}, overhead {ovh['p99_overhead_pct']} %)",
            f"- fan-out p99 ratio: {ovh.get('fanout_p99_ratio', 'n/a')}",
        ]
    )


DROPS_INTRO = (
    "Every run drops its socket abruptly mid-run, stays offline 100 ms, reconnects and sends "
    "`resume` with the last seq held (the peers have no log: their `resume` only re-subscribes "
    "to live events)."
)


def _drops_section(table: Mapping[str, Mapping[str, Any]], rel: str, number: int) -> str:
    """Return the socket-drop guarantees section."""
    counts = [
        [
            name,
            g["runs"],
            g["drops"],
            g["events_expected"],
            g["events_delivered"],
            *(g["violations"][kind] for kind in KINDS),
        ]
        for name, g in table.items()
    ]
    kept = [
        [name, *("kept" if ok else "**broken**" for ok in g["kept"].values())]
        for name, g in table.items()
    ]
    lines = [
        f"## {number}. Peers under socket drops",
        "",
        f"![drops]({rel}/drops_violations.png)",
        "",
        DROPS_INTRO,
        "",
        *_table(["server", "runs", "drops", "expected", "delivered", *KINDS], counts),
        "",
        *_table(["server", "no loss", "no duplicate", "order", "isolation", "tool pairs"], kept),
    ]
    return "\n".join(lines)


def _method() -> str:
    """Return the method notes."""
    return "\n".join(
        [
            "## Method",
            "",
            "- Load: `benchmarks/leangen.py` (asyncio, one `Protocol` per socket over a sans-IO "
            "frame codec, no task per socket) for the sweep, fan-out, active and soak scenarios; "
            "`benchmarks/loadgen.py` (trio + trio-websocket) for drops and idle sockets. Closed "
            "loop: each socket starts a `scripted` run (sweep: 2 tools, 40 tokens, `delay_ms` 10; "
            "fan-out: 2 tools, 20 tokens, 80 ms; active: 2 tools, 20 tokens, 500 ms) and the next "
            "as soon as it ends. Offered rate = concurrent runs x 1000 / delay_ms.",
            "- Latency = client receive wall time - event `ts` (server wall time at emit), same "
            "machine, recorded in HDR histograms (1 us resolution, 3 significant digits) during "
            "the measurement window only (after a warm-up).",
            "- Every event is checked with `loadtests.checker` (seq gapless/unrepeated, order, "
            "terminal, tool pairs, foreign runs, exact 3+2T+K count).",
            "- Each server runs in its own process (the sweep starts all four and measures them "
            "in turn at each rate; the other scenarios start a fresh server per trial). With the "
            "lean generator, server CPU is read from /proc at the window's edges (server CPU % "
            "and CPU per event = ticks over the window / events received in it); drops and idle "
            "sample it with psutil. The generator is itself one Python process sharing the two "
            "cores: its CPU % is in the tables.",
            "- Sweep stop rule: a server leaves the sweep after the first step whose p99 passes "
            "50 ms or whose achieved/offered ratio falls below 80 % of its ratio at 500/s "
            "(the servers measured once per rate get a second, confirming trial before they "
            "leave; sweeps before 2026-12-02 08:15 UTC did not).",
            "- The baseline (`benchmarks/baseline_trio.py`) has the registry's fan-out shape "
            "(run task -> per-socket unbounded outbox -> writer task) and an in-memory log for "
            "`resume`, and nothing else: no limits, backpressure, acks, retention or lifecycle.",
            "- `nodes` and `delivery` (benchmarks/node_scenarios.py): the lean generator spreads "
            "its sockets round robin over the nodes and reads Redis's `INFO` (commands, socket "
            "reads, CPU) at the window's edges, the orchestrator reads it around each whole "
            "trial; `delivery` runs the trio generator's drops mode against "
            "`--delivery-mode registry` and `direct`. docs/SCALING.md builds on these figures.",
            "- `python -m benchmarks.run --report-only` redraws plots and this report from the "
            "JSON files without measuring.",
        ]
    )
