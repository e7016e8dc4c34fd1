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

Results = Mapping[str, Mapping[str, Any]]
KINDS = ("lost", "duplicate", "reordered", "foreign", "unterminated", "unpaired_tool", "malformed")
GOALS = {
    "fanout_p95_ms": 10.0,
    "fanout_p99_ms": 25.0,
    "idle_sockets": 10_000,
    "idle_kib_per_socket": 30.0,
    "overhead_pct": 20.0,
}


def overhead(results: Results) -> dict[str, Any]:
    """Return registry-vs-baseline ratios: max sustained rate, p99 at common rates, fan-out."""
    sweeps, fan = results["sweep"], results["fanout"]
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


def registry_problems(results: Results, failures: list[str]) -> list[str]:
    """Return why the session failed: scenarios that did not run, registry violations."""
    problems = list(failures)
    for scenario in ("fanout", "drops"):
        result = results[scenario].get("registry")
        if result and any(result["tally"]["violations"].values()):
            problems.append(f"registry {scenario}: violations {result['tally']['violations']}")
    for step in results["sweep"].get("registry", {}).get("steps", []):
        if any(step["tally"]["violations"].values()):
            problems.append(f"registry sweep {step['offered_rate']}: {step['tally']['violations']}")
    return problems


def write_json(out: Path, name: str, data: Any) -> None:
    """Write ``<out>/<name>.json``."""
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def write_all(
    results: Results, machine: Mapping[str, Any], failures: list[str], out: Path, report_path: Path
) -> list[str]:
    """Write every JSON, PNG and the report; return the session's problems."""
    derived = {
        "overhead": overhead(results),
        "guarantees": {k: guarantees(v) for k, v in results["drops"].items()},
    }
    problems = registry_problems(results, failures)
    for scenario, data in results.items():
        write_json(out, scenario, data)
    write_json(out, "overhead", derived["overhead"])
    write_json(out, "peers", peers_table(results, derived))
    write_json(out, "run", {**machine, "failures": failures, "problems": problems})
    plot_all(results, out)
    report_path.write_text(render(results, derived, machine, problems, out, report_path))
    return problems


def peers_table(results: Results, derived: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Return, per server, max sustained rate, p99 at the lowest rate, fan-out p99, drops."""
    table: dict[str, dict[str, Any]] = {}
    for name, sweep in results["sweep"].items():
        first = sweep["steps"][0] if sweep["steps"] else None
        fan = results["fanout"].get(name)
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
    """Draw every PNG."""
    plot_sweep(results, out)
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
    plot_idle(results, out)
    lost = {
        n: {k: float(v) for k, v in guarantees(r)["violations"].items() if v}
        for n, r in results["drops"].items()
    }
    plot_bars(lost, out / "drops_violations.png", "Socket drops: violations by kind", "events")


def render(
    results: Results,
    derived: Mapping[str, Any],
    machine: Mapping[str, Any],
    problems: list[str],
    out: Path,
    report_path: Path,
) -> str:
    """Return REPORT.md."""
    rel = _relative(out, report_path.parent)
    parts = [
        _header(machine, problems),
        _goals(results, derived),
        _sweep_section(results, rel),
        _fanout_section(results, rel),
        _idle_section(results, rel),
        _overhead_section(derived["overhead"]),
        _drops_section(derived["guarantees"], rel),
        _method(),
    ]
    return "\n\n".join(parts) + "\n"


def _relative(out: Path, base: Path) -> str:
    """Return ``out`` relative to ``base`` when possible (for links in the report)."""
    try:
        return str(out.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(out)


def _header(machine: Mapping[str, Any], problems: list[str]) -> str:
    """Return the report's title, run description and problems."""
    kind = "smoke (small scale)" if machine["smoke"] else "full"
    lines = [
        f"# Benchmarks — {kind} run, {machine['started_at']} UTC",
        "",
        f"{machine['cpus']} CPUs, Python {machine['python']}, {machine['platform']}, "
        f"fd limit {machine['fd_limit']}, took {machine['duration_s']} s, load average at the "
        f"end {machine.get('load_average_at_end')}. Server and load generator are separate "
        "processes on the same (shared, noisy) machine; compare servers through the ratios "
        "measured in this same run. Registry and baseline sweep/fan-out figures are the "
        "median-p99 trial of three interleaved trials (full run).",
    ]
    if problems:
        lines += ["", "**Problems:**", *[f"- {p}" for p in problems]]
    return "\n".join(lines)


def _goal_rows(results: Results, derived: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Return (goal, measured or None, goal value) rows: measured must be <= the goal value,
    except for sockets held, which must be >= it."""
    fan = results["fanout"].get("registry")
    lat = fan["latency_ms"] if fan else {}
    levels = results["idle"].get("registry", {}).get("levels", [])
    top = levels[-1] if levels else {}
    ovh = derived["overhead"]
    return [
        ("fan-out p95 (ms)", lat.get("p95"), GOALS["fanout_p95_ms"]),
        ("fan-out p99 (ms)", lat.get("p99"), GOALS["fanout_p99_ms"]),
        ("idle sockets held (answering ping)", top.get("alive"), top.get("level")),
        (
            "server RSS per idle socket (KiB)",
            top.get("kib_per_socket"),
            GOALS["idle_kib_per_socket"],
        ),
        (
            "max sustained rate overhead vs baseline (%)",
            ovh.get("rate_overhead_pct"),
            GOALS["overhead_pct"],
        ),
        ("p99 overhead vs baseline (%)", ovh.get("p99_overhead_pct"), GOALS["overhead_pct"]),
    ]


def _goals(results: Results, derived: Mapping[str, Any]) -> str:
    """Return the goals table for the registry."""
    lines = ["## Goals (registry)", "", "| goal | measured | target | |", "|---|---:|---:|---|"]
    for goal, value, target in _goal_rows(results, derived):
        if value is None or target is None:
            lines.append(f"| {goal} | n/a | {target} | n/a |")
            continue
        ok = value >= target if goal.startswith("idle sockets") else value <= target
        lines.append(f"| {goal} | {value} | {target} | {'met' if ok else '**missed**'} |")
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
                s["loadgen_cpu_percent"],
            ]


def _sweep_section(results: Results, rel: str) -> str:
    """Return the latency-vs-rate section."""
    headers = [
        "server",
        "offered/s",
        "achieved/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "server CPU %",
        "loadgen CPU %",
    ]
    best = ", ".join(
        f"{n} **{s['max_sustained_rate']:.0f}/s**" for n, s in results["sweep"].items()
    )
    lines = [
        "## 1. Latency vs offered event rate",
        "",
        f"![latency vs rate]({rel}/latency_vs_rate.png) "
        f"![achieved vs offered]({rel}/achieved_vs_offered.png)",
        "",
        *_table(headers, _sweep_rows(results)),
        "",
        "Max sustained rate = highest achieved rate of a step with p99 <= 50 ms and not "
        "saturated (achieved/offered >= 80 % of that server's ratio at the lowest rate): " + best,
    ]
    return "\n".join(lines)


def _fanout_section(results: Results, rel: str) -> str:
    """Return the fan-out section."""
    lines = [
        "## 2. Fan-out: many sockets, concurrent runs",
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


def _idle_section(results: Results, rel: str) -> str:
    """Return the idle-sockets section."""
    lines = [
        "## 3. Idle sockets and server memory",
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


def _overhead_section(ovh: Mapping[str, Any]) -> str:
    """Return the registry-overhead section."""
    if not ovh:
        return "## 4. Registry overhead\n\nNot measured (registry or baseline sweep missing)."
    return "\n".join(
        [
            "## 4. Registry overhead vs the bare trio-websocket baseline",
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


def _drops_section(table: Mapping[str, Mapping[str, Any]], rel: str) -> str:
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
        "## 5. Peers under socket drops",
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
            "- Load: `benchmarks/loadgen.py` (trio + trio-websocket), closed loop: each worker "
            "socket starts a `scripted` run (2 tools, 40 tokens, `delay_ms` 10; fan-out: 80) "
            "and the next as soon as it ends. Offered rate = concurrent runs x 1000 / delay_ms.",
            "- Latency = client receive wall time - event `ts` (server wall time at emit), same "
            "machine, recorded in HDR histograms (1 us resolution, 3 significant digits) during "
            "the measurement window only (after a warm-up).",
            "- Every event is checked with `loadtests.checker` (seq gapless/unrepeated, order, "
            "terminal, tool pairs, foreign runs, exact 3+2T+K count).",
            "- Each server runs in its own process (the sweep starts all four and measures them "
            "in turn at each rate; the other scenarios start a fresh server per trial); CPU and "
            "RSS are sampled with psutil. The generator is itself one Python process on the "
            "second core, so the highest rates may be limited by it: its CPU % is in the tables.",
            "- Sweep stop rule: a server leaves the sweep after the first step whose p99 passes "
            "50 ms or whose achieved/offered ratio falls below 80 % of its ratio at 500/s.",
            "- The baseline (`benchmarks/baseline_trio.py`) has the registry's fan-out shape "
            "(run task -> per-socket unbounded outbox -> writer task) and an in-memory log for "
            "`resume`, and nothing else: no limits, backpressure, acks, retention or lifecycle.",
            "- `python -m benchmarks.run --report-only` redraws plots and this report from the "
            "JSON files without measuring.",
        ]
    )
