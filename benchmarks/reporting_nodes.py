"""Report sections for the node-scaling (``nodes``) and delivery-mode (``delivery``) scenarios.

Pure data in, Markdown text and PNG files out (matplotlib, Agg backend). No trio, no asyncio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.reporting_lean import table

Results = Mapping[str, Any]
BASELINE = "memory-1"
"""The service every other one is compared with: one node, all state in the process."""
EXPECTED_IN_DIRECT = ("lost", "unterminated")
"""What ``delivery_mode`` direct loses by design when a socket drops (not a failure)."""


def service_label(key: str, service: Mapping[str, Any] | None = None) -> str:
    """Return a reader's name for a service: ``1 node, in memory``, ``2 nodes + Redis``."""
    kind, _, count = key.partition("-")
    number = int(service["nodes"]) if service else int(count or 1)
    nodes = f"{number} node" + ("s" if number != 1 else "")
    return f"{nodes}, in memory" if kind == "memory" else f"{nodes} + Redis"


def _add(a: float | None, b: float | None) -> float | None:
    """Return a + b, treating a missing b as 0 (no Redis) and a missing a as unknown."""
    return None if a is None else round(a + (b or 0.0), 2)


def trial_figures(trial: Mapping[str, Any]) -> dict[str, Any]:
    """Return the figures of one lean-generator trial against a service."""
    window = trial.get("window") or {}
    redis = window.get("redis") or {}
    whole = trial.get("redis_trial") or {}
    lat = trial["latency_ms"]
    nodes_cpu = window.get("cpu_us_per_event")
    return {
        "offered": trial.get("offered_rate"),
        "events_per_s": trial["achieved_rate"],
        "p50": lat["p50"],
        "p95": lat["p95"],
        "p99": lat["p99"],
        "max": lat["max"],
        "end_p99": (trial.get("agent_completed_latency_ms") or {}).get("p99"),
        "violations": sum(trial["tally"]["violations"].values()),
        "errors": sum(trial.get("errors", {}).values()),
        "nodes_cpu_us_per_event": nodes_cpu,
        "nodes_cpu_percent": window.get("server_cpu_percent"),
        "redis_cpu_us_per_event": redis.get("cpu_us_per_event"),
        "redis_cpu_percent": redis.get("cpu_percent"),
        "total_cpu_us_per_event": _add(nodes_cpu, redis.get("cpu_us_per_event")),
        "commands_per_event": redis.get("commands_per_event"),
        "script_calls_per_event": redis.get("script_calls_per_event"),
        "transactions_per_event": redis.get("transactions_per_event"),
        "reads_per_event": redis.get("reads_per_event"),
        "commands_per_s": redis.get("commands_per_s"),
        "net_in_bytes_per_event": redis.get("net_in_bytes_per_event"),
        "by_command_per_event": redis.get("by_command_per_event") or {},
        "trial_commands_per_event": whole.get("commands_per_event"),
        "trial_reads_per_event": whole.get("reads_per_event"),
        "trial_script_calls_per_event": whole.get("script_calls_per_event"),
        "loadgen_cpu_percent": trial.get("loadgen_cpu_percent"),
        "others_cpu_percent": window.get("other_processes_cpu_percent"),
    }


def best_step(service: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Return the ramp step whose achieved rate is the service's max sustained rate."""
    best = service.get("max_sustained_rate")
    for step in service.get("steps", []):
        if best and float(step["achieved_rate"]) == float(best):
            return step  # type: ignore[no-any-return]
    return None


def ratio(value: float | None, reference: float | None) -> float | None:
    """Return value / reference rounded (None when either is missing or the reference is 0)."""
    return round(value / reference, 2) if value is not None and reference else None


def nodes_summary(nodes: Results) -> dict[str, dict[str, Any]]:
    """Return, per service, the fixed-load figures, the ramp's best and ratios to memory-1."""
    services = nodes.get("services", {})
    summary: dict[str, dict[str, Any]] = {}
    for key, service in services.items():
        figures = trial_figures(service["fixed"])
        best = best_step(service)
        at_best = trial_figures(best) if best is not None else {}
        figures.update(
            label=service_label(key, service),
            nodes=service["nodes"],
            max_sustained_rate=service.get("max_sustained_rate"),
            p99_at_max=at_best.get("p99"),
            total_cpu_us_at_max=at_best.get("total_cpu_us_per_event"),
            commands_per_event_at_max=at_best.get("commands_per_event"),
            reads_per_event_at_max=at_best.get("reads_per_event"),
            steps=len(service.get("steps", [])),
            load_average=service.get("load_average"),
            code=service.get("code"),
        )
        summary[key] = figures
    base = summary.get(BASELINE, {})
    for figures in summary.values():
        figures["cpu_x_memory"] = ratio(
            figures["total_cpu_us_per_event"], base.get("total_cpu_us_per_event"))
        figures["max_rate_x_memory"] = ratio(
            figures["max_sustained_rate"], base.get("max_sustained_rate"))
    return summary


def nodes_problems(nodes: Results) -> list[str]:
    """Return a problem for every violation in any trial, and for an error or an unopened
    socket at the fixed load (every service is the registry: every guarantee must hold)."""
    problems = []
    for key, service in nodes.get("services", {}).items():
        fixed = service["fixed"]
        if fixed["tally"]["violations"] or fixed["errors"] or (
            fixed["sockets"] < fixed["sockets_asked"]
        ):
            problems.append(
                f"nodes {key} fixed load: violations {fixed['tally']['violations']}, sockets "
                f"{fixed['sockets']}/{fixed['sockets_asked']}, errors {fixed['errors']}"
            )
        for step in service.get("steps", []):
            if step["tally"]["violations"]:
                problems.append(f"nodes {key} ramp {step['offered_rate']}: "
                                f"{step['tally']['violations']}")
    return problems


def delivery_figures(result: Mapping[str, Any]) -> dict[str, Any]:
    """Return what a drops run delivered: events lost, runs whose end never came, latency."""
    counts, violations = result["tally"]["counts"], result["tally"]["violations"]
    lat = result["latency_ms"]
    return {
        "runs": counts["runs_started"],
        "drops": counts["drops"],
        "events_expected": counts["events_expected"],
        "events_delivered": counts["events_delivered"],
        "events_lost": counts["events_expected"] - counts["events_delivered"],
        "runs_never_ended": counts["runs_started"] - counts["runs_completed"],
        "events_per_s": result.get("achieved_rate"),
        "p50": lat["p50"],
        "p95": lat["p95"],
        "p99": lat["p99"],
        "max": lat["max"],
        "other_violations": {
            kind: count for kind, count in violations.items()
            if count and kind not in EXPECTED_IN_DIRECT
        },
        "errors": dict(result.get("errors", {})),
    }


def delivery_problems(delivery: Results) -> list[str]:
    """Return a problem when ``registry`` mode broke any guarantee, or ``direct`` mode broke
    one it keeps (it only loses events after a drop, by design)."""
    problems = []
    for mode, result in delivery.get("modes", {}).items():
        violations = {k: v for k, v in result["tally"]["violations"].items() if v}
        if mode == "direct":
            violations = {k: v for k, v in violations.items() if k not in EXPECTED_IN_DIRECT}
        if violations:
            problems.append(f"delivery {mode}: violations {violations}")
    return problems


def _bars(ax: Any, labels: Sequence[str], series: Sequence[tuple[str, Sequence[Any]]],
          title: str, unit: str, stacked: bool = False, log: bool = False) -> None:
    """Draw grouped (or stacked) bars of ``series`` over ``labels`` on ``ax``."""
    width = 0.8 if stacked else 0.8 / max(len(series), 1)
    bottom = [0.0] * len(labels)
    for index, (name, values) in enumerate(series):
        numbers = [float(v) if v is not None else 0.0 for v in values]
        xs = list(range(len(labels))) if stacked else [i + index * width for i in
                                                     range(len(labels))]
        ax.bar(xs, numbers, width, bottom=bottom if stacked else None, label=name)
        if stacked:
            bottom = [b + n for b, n in zip(bottom, numbers, strict=True)]
    offset = 0.0 if stacked else width * (len(series) - 1) / 2
    ax.set_xticks([i + offset for i in range(len(labels))], labels, fontsize="small")
    ax.set_title(title, fontsize="medium")
    ax.set_ylabel(unit)
    ax.grid(True, axis="y", alpha=0.3)
    if log:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize="x-small")


def plot_nodes(nodes: Results, out: Path) -> None:
    """Four panels per service: max sustained rate, fixed-load latency, CPU per event (nodes
    + Redis), Redis commands and reads per event."""
    summary = nodes_summary(nodes)
    if not summary:
        return
    rows = list(summary.values())
    labels = [r["label"].replace(", ", "\n").replace(" + ", "\n+ ") for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    _bars(axes[0][0], labels, [("max sustained", [r["max_sustained_rate"] for r in rows])],
          "Max sustained events/s (p99 <= 50 ms, not saturated)", "events/s")
    latency = [(p, [r[p] for r in rows]) for p in ("p50", "p95", "p99")]
    _bars(axes[0][1], labels, [*latency, ("agent_completed p99", [r["end_p99"] for r in rows])],
          "Delivery latency at the fixed load", "ms (log)", log=True)
    _bars(axes[1][0], labels, [("nodes", [r["nodes_cpu_us_per_event"] for r in rows]),
                               ("Redis", [r["redis_cpu_us_per_event"] for r in rows])],
          "CPU per event at the fixed load (stacked)", "us", stacked=True)
    redis_work = [("commands", "commands_per_event"), ("socket reads (<= round trips)",
                  "reads_per_event"), ("EVALSHA", "script_calls_per_event")]
    _bars(axes[1][1], labels, [(name, [r[key] for r in rows]) for name, key in redis_work],
          "Redis work per event at the fixed load", "per event")
    fig.tight_layout()
    fig.savefig(out / "nodes.png", dpi=100)
    plt.close(fig)


FIXED_COLUMNS = ("label", "events_per_s", "p50", "p95", "p99", "max", "end_p99",
                 "nodes_cpu_us_per_event", "nodes_cpu_percent", "redis_cpu_us_per_event",
                 "redis_cpu_percent", "total_cpu_us_per_event", "cpu_x_memory", "violations",
                 "loadgen_cpu_percent", "others_cpu_percent")
RAMP_COLUMNS = ("offered", "events_per_s", "p50", "p99", "end_p99", "nodes_cpu_us_per_event",
                "redis_cpu_us_per_event", "redis_cpu_percent", "commands_per_event",
                "reads_per_event", "violations", "others_cpu_percent")


def _fixed_rows(summary: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    return [[s[key] for key in FIXED_COLUMNS] for s in summary.values()]


def _redis_rows(summary: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for s in summary.values():
        if s["commands_per_event"] is None:
            continue
        top = ", ".join(f"{name} {value}" for name, value in s["by_command_per_event"].items())
        rows.append([s["label"], s["commands_per_event"], s["script_calls_per_event"],
                     s["transactions_per_event"], s["reads_per_event"], s["commands_per_s"],
                     s["net_in_bytes_per_event"], s["trial_commands_per_event"],
                     s["trial_reads_per_event"], top])
    return rows


def _ramp_rows(nodes: Results) -> list[list[Any]]:
    rows = []
    for key, service in nodes.get("services", {}).items():
        for step in service.get("steps", []):
            figures = trial_figures(step)
            rows.append([service_label(key, service), *(figures[c] for c in RAMP_COLUMNS)])
    return rows


def nodes_section(nodes: Results, rel: str, number: int) -> str:
    """Return the node-scaling section."""
    load = nodes.get("load", {})
    summary = nodes_summary(nodes)
    cpus = nodes.get("cpus")
    rate = load.get("sockets", 0) * 1000 // max(load.get("delay_ms", 1), 1)
    lines = [
        f"## {number}. Nodes on one Redis: what each node and Redis cost",
        "",
        f"**This machine has {cpus} CPU cores.** Up to 3 nodes, Redis and the load generator "
        "share them (and so do other processes: see the last column), so this scenario cannot "
        "show the speed-up nodes on machines of their own would give: a single node is "
        "limited to one core, several nodes can at most spread over the second one. What it "
        "measures is what a service of several nodes costs per event compared with one "
        "process, and what Redis does per event; docs/SCALING.md projects the rest on paper. "
        "The ramp's maxima move with the machine's other load (a step's achieved rate falls "
        "when other processes take the cores), so compare them with care.",
        "",
        f"One local `redis-server` ({nodes.get('redis_version') or 'version unknown'}, no "
        "persistence); for each service its nodes are `python -m harness serve --port 0 "
        "--redis-url ...` with the defaults (the `active` scenario's settings), and `1 node, in "
        "memory` is the same server without Redis. The lean generator spreads its sockets "
        "round robin over the nodes (socket i on node i mod N; 4 sockets per user, so one "
        "user's sockets are on different nodes). Fixed load: "
        f"{load.get('sockets')} sockets each with a `scripted` run in flight "
        f"({load.get('tools')} tools, {load.get('tokens')} tokens, `delay_ms` "
        f"{load.get('delay_ms')}: about {rate} events/s offered), {load.get('warmup_s')} s "
        f"warm-up, then a {load.get('window_s')} s window (two run lengths: each socket starts "
        "and ends about two runs in it). Ramp: the sweep's load (runs of 2 tools and 40 tokens, "
        f"an event every 10 ms) at {', '.join(str(r) for r in nodes.get('rates', []))} "
        f"events/s offered, {nodes.get('step_s')} s per step, up to the first step whose p99 "
        "passes 50 ms or that saturates (the sweep's rule; a falling step is measured twice).",
        "",
        "Nodes CPU = the /proc ticks of every node over the window, summed, per event "
        "delivered; Redis CPU = `used_cpu_sys + used_cpu_user` from `INFO`. Redis commands "
        "per event = every command Redis executed (`INFO commandstats`: the commands inside "
        "the Lua scripts and the `MULTI` transactions count one by one) / events delivered; "
        "EVALSHA = Lua script calls (one request each); EXEC = transactions (one pipelined "
        "request each); socket reads = `total_reads_processed`, the reads Redis made from its "
        "clients: requests sent together (a pipeline, or the concurrent requests coredis "
        "multiplexes on one connection) are read at once, so this is a lower bound of the "
        "round trips. \"Whole trial\" counts from before the generator "
        "connects to after its last run ended: every run from admission to end and every "
        "socket from connect to disconnect. `agent_completed` p99: the runs' last events "
        "alone (with Redis a node holds a run's end until Redis has recorded it, up to 1 s).",
    ]
    load_start, load_end = nodes.get("load_average_at_start"), nodes.get("load_average_at_end")
    lines += ["", f"Machine load average (1, 5, 15 min) at the scenario's start {load_start}, "
              f"at its end {load_end}; per service at its start: " + "; ".join(
                  f"{s['label']} {s['load_average']}" for s in summary.values()) + "."]
    codes = sorted({str(s["code"]) for s in summary.values() if s.get("code")})
    if codes:
        lines += ["", f"Code measured: {', '.join(codes)}."]
    for key, reason in nodes.get("skipped", {}).items():
        lines += ["", f"**{service_label(key)} not measured:** {reason}."]
    if not summary:
        return "\n".join(lines)
    lines += [
        "",
        f"![nodes]({rel}/nodes.png)",
        "",
        "Fixed load:",
        "",
        *table(["service", "events/s", "p50 ms", "p95 ms", "p99 ms", "max ms",
                "agent_completed p99 ms", "nodes CPU us/event", "nodes CPU %",
                "Redis CPU us/event", "Redis CPU %",
                "total CPU us/event", "x in memory", "violations", "loadgen CPU %",
                "other processes CPU %"], _fixed_rows(summary)),
        "",
        "Redis per event at the fixed load (window; then the whole trial):",
        "",
        *table(["service", "commands/event", "EVALSHA/event", "EXEC/event",
                "socket reads/event (<= round trips)", "commands/s", "bytes in/event",
                "whole trial: commands/event", "whole trial: reads/event",
                "most called (per event)"], _redis_rows(summary)),
        "",
        "Max sustained rate (ramp):",
        "",
        *table(["service", "max sustained events/s", "x in memory", "p99 ms there",
                "total CPU us/event there", "Redis commands/event there",
                "Redis reads/event there", "steps"],
               ([s["label"], s["max_sustained_rate"], s["max_rate_x_memory"], s["p99_at_max"],
                 s["total_cpu_us_at_max"], s["commands_per_event_at_max"],
                 s["reads_per_event_at_max"], s["steps"]] for s in summary.values())),
        "",
        "Every ramp step:",
        "",
        *table(["service", "offered/s", "achieved/s", "p50 ms", "p99 ms",
                "agent_completed p99 ms", "nodes CPU us/event",
                "Redis CPU us/event", "Redis CPU %", "Redis commands/event",
                "Redis reads/event", "violations", "other processes CPU %"],
               _ramp_rows(nodes)),
    ]
    return "\n".join(lines)


def delivery_section(delivery: Results, number: int) -> str:
    """Return the delivery-mode comparison section."""
    load = delivery.get("load", {})
    modes = {mode: delivery_figures(result) for mode, result in delivery.get("modes", {}).items()}
    lines = [
        f"## {number}. Delivery modes under socket drops: `registry` vs `direct`",
        "",
        "The `drops` scenario's load (the trio generator: "
        f"{load.get('rate')} events/s offered, runs of {load.get('tools')} tools and "
        f"{load.get('tokens')} tokens with an event every {load.get('delay_ms')} ms, a "
        f"{load.get('window_s')} s window) against one fresh registry node started with "
        "`--delivery-mode registry` (the default) and one with `--delivery-mode direct` (the "
        "legacy path, the rollback flag: no retained log, `resume` answers "
        "`resume_unavailable`). Every run drops its socket abruptly mid-run, stays offline "
        f"{load.get('offline_ms')} ms, reconnects and sends `resume` after the last seq it "
        "holds.",
        "",
        "Events lost = events the runs emitted that never reached their client (expected - "
        "delivered); runs never ended = runs whose `agent_completed` never reached the client "
        "(the run itself did end on the server). Latency covers the events delivered: in "
        "`registry` mode it includes the events replayed after the outage (their delay "
        "includes the time offline); in `direct` mode the lost events are not in it, which "
        "flatters it.",
    ]
    if not modes:
        return "\n".join([*lines, "", "Not measured."])
    lines += [
        "",
        *table(["mode", "runs", "drops", "events expected", "delivered", "events lost",
                "runs never ended", "events/s", "p50 ms", "p95 ms", "p99 ms", "max ms",
                "other violations"],
               ([mode, f["runs"], f["drops"], f["events_expected"], f["events_delivered"],
                 f["events_lost"], f["runs_never_ended"], f["events_per_s"], f["p50"],
                 f["p95"], f["p99"], f["max"], f["other_violations"] or "none"]
                for mode, f in modes.items())),
    ]
    averages = {mode: result.get("load_average") for mode, result in
                delivery.get("modes", {}).items()}
    lines += ["", "Machine load average at each trial's end: "
              + "; ".join(f"{mode} {value}" for mode, value in averages.items()) + "."]
    return "\n".join(lines)
