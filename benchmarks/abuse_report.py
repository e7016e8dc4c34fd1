"""The abuse soak's figures and verdict, from what its processes measured; its Markdown page.

Pure: the orchestrator (:mod:`benchmarks.abuse_soak`) hands over the normal users' results
(:mod:`benchmarks.leangen`'s JSON, one per phase), the abusers' (:mod:`benchmarks.abusers`),
the server's ``/metrics`` readings at the phases' edges, its RSS samples and the machine's
load; :func:`summarize` turns them into the report's figures and :func:`markdown` into
``abuse.md``. No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from benchmarks import abuse_tally as at

P99_RATIO_GOAL: Final = 2.0
"""Abused p99 over unabused p99 must stay at or under this."""
PERCENTILES: Final = ("p50", "p95", "p99", "p999", "max")
WRITE_BATCH_MIB: Final = 64 / 1024
"""What one socket may hold taken from its queue for writing (the server's write batch)."""
HEAD_MIB: Final = 16 / 1024
"""The largest request head a pending handshake holds (``harness._http.MAX_HEAD_BYTES``)."""
FLAT_MIB_PER_MIN: Final = 1.0
"""Over the second half of an abused phase of at least :data:`FLAT_AFTER_S`, RSS rising
faster than this is a leak, not a bound being filled."""
FLAT_AFTER_S: Final = 120.0
CLOSE_FAMILY: Final = "registry_connections_closed_total"
ERROR_FAMILY: Final = "registry_errors_total"


def labelled(samples: Mapping[str, float], family: str) -> dict[str, float]:
    """Return ``{label value: sample}`` of a one-label family of a parsed /metrics page."""
    out: dict[str, float] = {}
    prefix = family + "{"
    for name, value in samples.items():
        if name.startswith(prefix) and name.endswith('"}'):
            out[name[len(prefix):-2].partition('="')[2]] = value
    return out


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float],
                   family: str) -> dict[str, int]:
    """Return how much each label of counter ``family`` grew between two readings (the
    labels that grew, sorted)."""
    start, end = labelled(before, family), labelled(after, family)
    grown = {label: round(value - start.get(label, 0.0)) for label, value in end.items()}
    return {label: grown[label] for label in sorted(grown) if grown[label]}


def latency_ratios(unabused: Mapping[str, float], abused: Mapping[str, float]
                   ) -> dict[str, float | None]:
    """Return abused / unabused for each percentile (None where unabused is 0)."""
    return {
        name: round(abused[name] / unabused[name], 2) if unabused.get(name) else None
        for name in PERCENTILES if name in abused
    }


def normal_users(result: Mapping[str, Any]) -> dict[str, Any]:
    """Return a phase's normal-user figures from the lean generator's result."""
    counts = result["tally"]["counts"]
    window = result.get("window") or {}
    return {
        "sockets": result.get("sockets"),
        "runs_started": counts["runs_started"],
        "runs_completed": counts["runs_completed"],
        "runs_failed_to_start": counts["runs_failed_to_start"],
        "events_received": result["events_received"],
        "events_expected": counts["events_expected"],
        "events_delivered": counts["events_delivered"],
        "unexpected_closes": counts["unexpected_closes"],
        "violations": dict(result["tally"]["violations"]),
        "violation_count": sum(result["tally"]["violations"].values()),
        "errors": dict(result.get("errors", {})),
        "examples": list(result.get("examples", [])),
        "latency_ms": dict(result["latency_ms"]),
        "achieved_rate": result.get("achieved_rate"),
        "offered_rate": result.get("offered_rate"),
        "window_s": result.get("window_s"),
        "server_cpu_percent": window.get("server_cpu_percent"),
        "cpu_us_per_event": window.get("cpu_us_per_event"),
        "loadgen_cpu_percent": result.get("loadgen_cpu_percent"),
        "other_processes_cpu_percent": window.get("other_processes_cpu_percent"),
        "p99_by_interval_ms": [
            [i["t_s"], i["latency_ms"]["p99"]] for i in window.get("intervals", [])
        ],
    }


def rss_curve(samples: Iterable[Sequence[float]], origin: float) -> list[list[float]]:
    """Return ``[[seconds since origin, RSS MiB], ...]`` of ``(t, cpu %, rss bytes)`` samples."""
    return [[round(t - origin, 1), round(rss / 2**20, 1)] for t, _cpu, rss in samples]


def rss_ceiling(base_mib: float, budgets: Mapping[str, Any], queue_sockets: int) -> float:
    """Return the RSS the server may reach under abuse: its peak without abuse, plus every
    retained event the budget allows (``max_retained_mib``), plus a full outbound queue
    (``max_queued_mib``) and a full write batch (64 KiB) on each abusive socket that can
    hold one, plus a whole request head (16 KiB) on each of ``max_pending_handshakes``."""
    per_socket = float(budgets["max_queued_mib"]) + WRITE_BATCH_MIB
    pending = float(budgets["max_pending_handshakes"]) * HEAD_MIB
    return round(base_mib + float(budgets["max_retained_mib"]) + queue_sockets * per_socket
                 + pending, 1)


def rss_slope(curve: Sequence[Sequence[float]], start: float, end: float) -> float | None:
    """Return the least-squares slope, in MiB a minute, of ``curve`` between ``start`` and
    ``end`` seconds (None with fewer than 3 samples there)."""
    points = [(t, mib) for t, mib in curve if start <= t <= end]
    if len(points) < 3:
        return None
    mean_t = sum(t for t, _ in points) / len(points)
    mean_m = sum(m for _, m in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if not spread:
        return None
    slope = sum((t - mean_t) * (m - mean_m) for t, m in points) / spread
    return round(slope * 60, 2)


def queue_sockets(counts: Mapping[str, int], max_connections_per_user: int) -> int:
    """Return how many abusive sockets can hold an outbound queue at once: every abuser but
    the ones that never finish a handshake, the limit tester with all its sockets."""
    held = 0
    for kind, count in counts.items():
        if kind in (at.SLOWLORIS, at.PENDING_PROBE):
            continue
        held += count * (max_connections_per_user + 1 if kind == at.LIMITS else 1)
    return held


def peak(curve: Iterable[Sequence[float]], start: float, end: float) -> float | None:
    """Return the highest RSS of ``curve`` between ``start`` and ``end`` seconds (None if no
    sample falls there)."""
    inside = [mib for t, mib in curve if start <= t <= end]
    return max(inside) if inside else None


def abuse_outcomes(abusers: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Return the outcomes seen per kind, from the abusers' result."""
    kinds = abusers.get("tally", {}).get("kinds", {})
    return {kind: dict(part.get("outcomes", {})) for kind, part in kinds.items()}


def headline_counts(abusers: Mapping[str, Any]) -> dict[str, int]:
    """Return the abuse answers the issue names, summed over every kind: 4008 and 1009
    closes, 429s, ``rate_limited``, handshake timeouts, closed at once, error frames."""
    totals: dict[str, int] = {}
    for outcomes in abuse_outcomes(abusers).values():
        for outcome, count in outcomes.items():
            totals[outcome] = totals.get(outcome, 0) + count
    errors = sum(count for outcome, count in totals.items() if outcome.startswith("error:"))
    return {
        "close_4008": totals.get("close:4008", 0),
        "close_1009": totals.get("close:1009", 0),
        "http_429": totals.get("http:429", 0),
        "http_401": totals.get("http:401", 0),
        "rate_limited": totals.get("error:rate_limited", 0),
        "handshake_timeouts": totals.get(at.HANDSHAKE_TIMEOUT, 0),
        "closed_at_once": totals.get(at.CLOSED_AT_ONCE, 0),
        "error_frames": errors,
    }


def summarize(
    *,
    settings: Mapping[str, Any],
    unabused: Mapping[str, Any],
    abused: Mapping[str, Any],
    abusers: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, float]],
    rss_samples: Sequence[Sequence[float]],
    phases: Mapping[str, Sequence[float]],
    machine: Mapping[str, Any],
    server_exit: int | None,
    failures: Sequence[str] = (),
) -> dict[str, Any]:
    """Return the soak's figures and verdict.

    Args:
        settings: The soak's settings; ``budgets`` holds the server's.
        unabused, abused: The lean generator's results of each phase.
        abusers: The abusers' result.
        metrics: Parsed ``/metrics`` at ``start``, ``unabused_end``, ``abused_end``, ``settled``.
        rss_samples: The server's ``(t, cpu %, rss bytes)`` samples over the whole soak.
        phases: Phase name -> (start, end) wall times: ``unabused``, ``abused`` and, when
            known, ``abuse`` (while the abusers ran, inside ``abused``), which the abused
            peak and the RSS slope are taken over.
        machine: Load averages and other processes' CPU.
        server_exit: The server's exit code (None: never stopped).
        failures: What could not run.
    """
    origin = phases["unabused"][0]
    curve = rss_curve(rss_samples, origin)
    normal = {"unabused": normal_users(unabused), "abused": normal_users(abused)}
    base = peak(curve, 0.0, phases["unabused"][1] - origin) or 0.0
    budgets = settings["budgets"]
    sockets = queue_sockets(abusers.get("counts", {}), int(budgets["max_connections_per_user"]))
    ceiling = rss_ceiling(base, budgets, sockets)
    rss_max = max((mib for _, mib in curve), default=0.0)
    abused_s = [t - origin for t in phases.get("abuse", phases["abused"])]
    slope = rss_slope(curve, (abused_s[0] + abused_s[1]) / 2, abused_s[1])
    long_enough = abused_s[1] - abused_s[0] >= FLAT_AFTER_S
    kinds = [kind for kind, count in abusers.get("counts", {}).items() if count]
    judged = abusers.get("verdict") or at.verdict(abusers.get("tally", {}), kinds)
    ratios = latency_ratios(normal["unabused"]["latency_ms"], normal["abused"]["latency_ms"])
    server_side = {
        phase: {
            "closes": counter_deltas(metrics[a], metrics[b], CLOSE_FAMILY),
            "errors": counter_deltas(metrics[a], metrics[b], ERROR_FAMILY),
        }
        for phase, (a, b) in {"unabused": ("start", "unabused_end"),
                              "abused": ("unabused_end", "abused_end")}.items()
        if a in metrics and b in metrics
    }
    rss = {
        "max_mib": rss_max,
        "unabused_peak_mib": base,
        "abused_peak_mib": peak(curve, abused_s[0], abused_s[1]),
        "end_mib": curve[-1][1] if curve else None,
        "ceiling_mib": ceiling,
        "ceiling_rule": (
            f"unabused peak {base} + max_retained_mib {budgets['max_retained_mib']} + "
            f"{sockets} abusive sockets x (max_queued_mib {budgets['max_queued_mib']} + a 64 KiB "
            f"write batch) + max_pending_handshakes {budgets['max_pending_handshakes']} x a "
            "16 KiB request head"
        ),
        "slope_second_half_mib_per_min": slope,
        "within": rss_max <= ceiling,
        "curve": curve,
        "phases_s": {name: [round(a - origin, 1), round(b - origin, 1)]
                     for name, (a, b) in phases.items()},
    }
    violations = sum(n["violation_count"] for n in normal.values())
    p99_ratio = ratios.get("p99")
    checks = {
        "zero_violations": violations == 0,
        "p99_within_2x": p99_ratio is not None and p99_ratio <= P99_RATIO_GOAL,
        "rss_within_ceiling": rss["within"],
        "rss_flat_under_abuse": (not long_enough or slope is None
                                 or slope <= FLAT_MIB_PER_MIN),
        "server_exit_0": server_exit == 0,
        "every_abuse_answered": bool(judged) and all(v["ok"] for v in judged.values()),
        "pending_bound_held": abusers.get("probe_bound_held") is not False,
        "no_failures": not failures,
    }
    return {
        "settings": dict(settings),
        "normal": normal,
        "latency_ratio": ratios,
        "rss": rss,
        "server_cpu_percent": {k: v["server_cpu_percent"] for k, v in normal.items()},
        "abuse": {
            "counts": abusers.get("counts", {}),
            "headline": headline_counts(abusers),
            "outcomes": abuse_outcomes(abusers),
            "figures": {k: v.get("figures", {})
                        for k, v in abusers.get("tally", {}).get("kinds", {}).items()},
            "verdict": judged,
            "probes": abusers.get("probes", []),
            "examples": abusers.get("tally", {}).get("examples", []),
            "cpu_percent": abusers.get("cpu_percent"),
            "plan": abusers.get("plan", {}),
        },
        "server_metrics": server_side,
        "connections_after": {
            name: metrics[name].get("registry_connections_active")
            for name in ("start", "unabused_end", "abused_end", "settled") if name in metrics
        },
        "retained_runs_after": {
            name: metrics[name].get("registry_retained_runs")
            for name in ("unabused_end", "abused_end", "settled") if name in metrics
        },
        "machine": dict(machine),
        "server_exit": server_exit,
        "failures": list(failures),
        "checks": checks,
        "ok": all(checks.values()),
    }


# ---------------------------------------------------------------------- rendering
def _fmt(value: object) -> str:
    return "-" if value is None else str(value)


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """Return the soak's headline figures as a few printable lines."""
    normal, rss, abuse = summary["normal"], summary["rss"], summary["abuse"]
    un, ab = normal["unabused"], normal["abused"]
    ratio = summary["latency_ratio"]
    machine = summary["machine"]
    return [
        f"normal users: {un['runs_started']} + {ab['runs_started']} runs, "
        f"{un['events_received']} + {ab['events_received']} events (unabused + abused), "
        f"violations {un['violation_count']} + {ab['violation_count']}",
        f"latency p50/p95/p99 ms: unabused {un['latency_ms']['p50']}/{un['latency_ms']['p95']}/"
        f"{un['latency_ms']['p99']}, abused {ab['latency_ms']['p50']}/{ab['latency_ms']['p95']}/"
        f"{ab['latency_ms']['p99']}; p99 ratio {_fmt(ratio.get('p99'))} (goal <= "
        f"{P99_RATIO_GOAL})",
        f"server RSS max {rss['max_mib']} MiB (unabused peak {rss['unabused_peak_mib']}, abused "
        f"peak {_fmt(rss['abused_peak_mib'])}) vs ceiling {rss['ceiling_mib']} MiB: "
        f"{'within' if rss['within'] else 'OVER'}",
        f"server CPU: unabused {_fmt(un['server_cpu_percent'])} %, abused "
        f"{_fmt(ab['server_cpu_percent'])} %; exit {_fmt(summary['server_exit'])}",
        "abuse answers: " + ", ".join(f"{k} {v}" for k, v in abuse["headline"].items()),
        "abuse verdict: " + ", ".join(
            f"{kind} {'ok' if v['ok'] else 'NOT OK'}" for kind, v in abuse["verdict"].items()
        ),
        f"machine load average: start {_fmt(machine.get('load_start'))}, end "
        f"{_fmt(machine.get('load_end'))}, max 1-min {_fmt(machine.get('load1_max'))}; "
        f"other processes' CPU (abused window) {_fmt(ab['other_processes_cpu_percent'])} %",
        "checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in summary["checks"].items()),
    ]


def markdown(summary: Mapping[str, Any], findings: Sequence[str] = ()) -> str:
    """Return ``abuse.md``: settings, normal users, latency, RSS, abuse answers, findings."""
    s, normal, rss = summary["settings"], summary["normal"], summary["rss"]
    lines = [
        "# Abuse soak",
        "",
        f"`{s.get('command', 'python -m benchmarks.abuse_soak')}` — code {s.get('code')}, "
        f"{s.get('date', '')}. Verdict: **{'pass' if summary['ok'] else 'FAIL'}**.",
        "",
        f"One registry server (`{' '.join(s.get('server_args', []))}`). "
        f"{s.get('users')} normal chat sockets (the lean generator: "
        f"{s.get('sockets_per_user')} per user id, each with one `scripted` run in flight: "
        f"{s.get('context')}, every frame checked by `loadtests.checker`) for an unabused phase "
        f"of {s.get('unabused_s')} s, then an abused phase of {s.get('abused_s')} s at the same "
        "rate, beside the abusive clients in another process (counts below).",
        "",
        "| figure | unabused | abused |",
        "|---|---|---|",
    ]
    un, ab = normal["unabused"], normal["abused"]
    for key in ("runs_started", "runs_completed", "events_received", "violation_count",
                "unexpected_closes", "achieved_rate", "server_cpu_percent",
                "loadgen_cpu_percent", "other_processes_cpu_percent"):
        lines.append(f"| {key} | {_fmt(un.get(key))} | {_fmt(ab.get(key))} |")
    for name in PERCENTILES:
        lines.append(f"| latency {name} ms | {un['latency_ms'].get(name)} | "
                     f"{ab['latency_ms'].get(name)} (x{_fmt(summary['latency_ratio'].get(name))})"
                     " |")
    lines += [
        "",
        f"Normal users' errors: unabused {un['errors'] or 'none'}, "
        f"abused {ab['errors'] or 'none'}.",
        "",
        "## Server memory",
        "",
        f"RSS max **{rss['max_mib']} MiB** (unabused peak {rss['unabused_peak_mib']}, abused peak "
        f"{_fmt(rss['abused_peak_mib'])}, at the end {_fmt(rss['end_mib'])}); ceiling "
        f"{rss['ceiling_mib']} MiB = {rss['ceiling_rule']}: "
        f"**{'within' if rss['within'] else 'OVER'}**. Slope over the abused phase's second "
        f"half: {_fmt(rss['slope_second_half_mib_per_min'])} MiB/min. Sampled every "
        f"{s.get('sample_s')} s; the curve (seconds, MiB) is in the JSON, the plot in "
        "`abuse.png`. Retained runs at the phases' ends: "
        f"{summary['retained_runs_after']}; open connections: {summary['connections_after']}.",
        "",
        "## Abuse and the answers it got",
        "",
        "| kind | abusers | outcomes (count) | verdict |",
        "|---|---|---|---|",
    ]
    abuse = summary["abuse"]
    for kind, verdict in abuse["verdict"].items():
        outcomes = ", ".join(f"{k} {v}" for k, v in abuse["outcomes"].get(kind, {}).items())
        state = "ok" if verdict["ok"] else (
            f"NOT OK: missing {verdict['missing']}, unexpected {verdict['unexpected']}")
        lines.append(f"| {kind} | {abuse['counts'].get(kind)} | {outcomes or '-'} | {state} |")
    lines += [
        "",
        _abusers_plan(abuse.get("plan") or {}),
        "",
        "Totals: " + ", ".join(f"{k} {v}" for k, v in abuse["headline"].items()) + ".",
        f"Server side over the abused phase: closes {_server(summary, 'closes')}, error frames "
        f"{_server(summary, 'errors')}.",
        f"Pending-handshake probes: {abuse['probes'] or 'none'}.",
        "",
        "## Machine",
        "",
        _machine(summary),
        "",
        "## Checks",
        "",
        *[f"- {k}: {'yes' if v else '**NO**'}" for k, v in summary["checks"].items()],
    ]
    if summary["failures"]:
        lines += ["", "Failures:", *[f"- {f}" for f in summary["failures"]]]
    if findings:
        lines += ["", "## Findings", "", *[f"- {f}" for f in findings]]
    return "\n".join(lines) + "\n"


def _abusers_plan(plan: Mapping[str, Any]) -> str:
    """One sentence on how hard the abusers pushed (empty without their plan)."""
    if not plan:
        return ""
    return (
        f"Abusers' settings: floods of {plan.get('flood_messages')} messages at "
        f"{plan.get('flood_rate')}/s (pings carry a 1,000-character id), then "
        f"{plan.get('hold_s')} s more without reading; WebSocket pings at "
        f"{plan.get('ws_ping_rate')}/s for {plan.get('ws_ping_s')} s; non-readers start "
        f"{plan.get('nonreader_runs')} runs of {plan.get('nonreader_context')} and stop reading "
        f"for {plan.get('hold_s')} s; slowloris sends a byte every {plan.get('trickle_s')} s; "
        f"a probe of max_pending_handshakes + {plan.get('probe_extra')} connections every "
        f"{plan.get('probe_every_s')} s; churn {plan.get('churn_per_s')} connections/s. "
        "Sockets that stop reading keep a 64 KiB receive buffer."
    )


def _server(summary: Mapping[str, Any], what: str) -> str:
    part = summary["server_metrics"].get("abused", {}).get(what)
    return str(part) if part else "none"


def _machine(summary: Mapping[str, Any]) -> str:
    m = summary["machine"]
    return (
        f"{m.get('cpus')} cores, shared: other people's benchmarks and tests ran at the same "
        f"time. Load average (1, 5, 15 min) at the start {m.get('load_start')}, at the end "
        f"{m.get('load_end')}, highest 1-min {m.get('load1_max')}; machine CPU busy "
        f"{m.get('busy_percent_mean')} % of all cores on average. Other processes' CPU "
        f"(neither server nor generator) in the windows: unabused "
        f"{_fmt(summary['normal']['unabused']['other_processes_cpu_percent'])} %, abused "
        f"{_fmt(summary['normal']['abused']['other_processes_cpu_percent'])} % (of one core; "
        f"the abusers' own CPU, {_fmt(summary['abuse'].get('cpu_percent'))} %, is part of it)."
    )


def findings(summary: Mapping[str, Any]) -> list[str]:
    """Return what the figures show went wrong, one sentence each (empty when nothing)."""
    out: list[str] = []
    normal = summary["normal"]
    for phase in ("unabused", "abused"):
        if normal[phase]["violation_count"]:
            out.append(f"normal users saw {normal[phase]['violations']} in the {phase} phase, "
                       f"e.g. {normal[phase]['examples'][:3]}")
    ratio = summary["latency_ratio"].get("p99")
    if ratio is not None and ratio > P99_RATIO_GOAL:
        out.append(f"abused p99 is {ratio} x the unabused p99 (goal <= {P99_RATIO_GOAL})")
    rss = summary["rss"]
    if not rss["within"]:
        out.append(f"server RSS reached {rss['max_mib']} MiB, over the {rss['ceiling_mib']} MiB "
                   "ceiling")
    if not summary["checks"].get("rss_flat_under_abuse", True):
        out.append(f"server RSS kept rising under abuse: "
                   f"{rss['slope_second_half_mib_per_min']} MiB/min over the abused phase's "
                   "second half")
    out += _ws_ping_finding(summary)
    for kind, verdict in summary["abuse"]["verdict"].items():
        if not verdict["ok"]:
            out.append(f"{kind}: expected {verdict['expected']}, missing {verdict['missing']}, "
                       f"unexpected {verdict['unexpected']}")
    if summary["server_exit"] != 0:
        out.append(f"the server exited {summary['server_exit']} (0 expected)")
    return out


def _ws_ping_finding(summary: Mapping[str, Any]) -> list[str]:
    """The WebSocket-ping flood's finding when no flood, however large, met the bound."""
    abuse = summary["abuse"]
    verdict = abuse["verdict"].get(at.WS_PING_FLOOD, {})
    absorbed = verdict.get("tolerated", {}).get(at.ABSORBED)
    held = abuse["figures"].get(at.WS_PING_FLOOD, {}).get("pong_bytes_read")
    if not absorbed or not held or "close:4008" not in verdict.get("missing", ()):
        return []
    bound = summary["settings"]["budgets"]["max_queued_mib"]
    return [
        f"ws_ping_flood: {absorbed} floods of WebSocket pings on a socket that did not read "
        f"were answered in full, about {held / 2**20 / absorbed:.1f} MiB of pongs each, "
        f"against max_queued_mib {bound}, and 4008 never came: either the pongs owed to a "
        "client's pings are outside the outbound bound or the kernel's socket buffers held "
        "every flood (run longer floods: --ws-ping-s)"
    ]
