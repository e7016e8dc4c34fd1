"""Report sections for the lean-generator scenarios (active, soak, retained memory) and the
comparison with the previous report (``results/before/``).

Pure data in, Markdown text and PNG files out (matplotlib, Agg backend). No trio, no asyncio.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Results = Mapping[str, Any]
OURS = ("registry", "fastapi")
REFERENCES = ("websockets", "baseline")
"""The servers whose CPU per event the others are divided by, round by round."""
GC_PAUSE_LIMIT_MS = 25.0
RSS_BAND = 0.10
CPU_DRIFT = 0.10
PERFORMANCE_MD_BEFORE = (
    "Before (from /work/shared/PERFORMANCE.md, measured by hand before the server rewrite with an "
    "asyncio `websockets` client, not by this suite): the registry used 1.86-2.24 x the CPU of the "
    "plain `websockets` peer on this load, p95 42.9 ms / p99 93.4 ms with the collector on "
    "(7.3 / 14.6 ms with it off)."
)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Return a Markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    lines += ["| " + " | ".join("n/a" if c is None else str(c) for c in row) + " |" for row in rows]
    return lines


def median(values: Iterable[float | None]) -> float | None:
    """Return the median of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


# ------------------------------------------------------------------------------- active
def trial_figures(trial: Mapping[str, Any]) -> dict[str, Any]:
    """Return the figures of one ``active`` trial."""
    window = trial.get("window") or {}
    gc = window.get("gc") or {}
    if not gc_hooked(gc):
        gc = {}
    lat = trial["latency_ms"]
    return {
        "code": trial.get("code"),
        "round": trial["round"] + 1,
        "events_per_s": trial["achieved_rate"],
        "p50": lat["p50"],
        "p95": lat["p95"],
        "p99": lat["p99"],
        "max": lat["max"],
        "violations": sum(trial["tally"]["violations"].values()),
        "cpu_us_per_event": window.get("cpu_us_per_event"),
        "server_cpu_percent": window.get("server_cpu_percent"),
        "gc_collections": gc.get("collections"),
        "gc_gen2": gc.get("gen2"),
        "gc_pause_total_ms": gc.get("pause_total_ms"),
        "gc_longest_ms": window_longest(gc),
        "rss_mib": window.get("server_rss_mib"),
        "loadgen_cpu_percent": trial["loadgen_cpu_percent"],
        "others_cpu_percent": window.get("other_processes_cpu_percent"),
        "loadgen_gc_longest_ms": (window.get("loadgen_gc") or {}).get("longest_ms"),
    }


def gc_hooked(gc: Mapping[str, Any]) -> bool:
    """Return False when a server's /metrics showed no collection at all over a busy window:
    its collector hook is not installed, so its figures are missing rather than zero."""
    return bool(gc.get("collections"))


def cpu_ratios(active: Results) -> dict[str, dict[str, list[float]]]:
    """Return, per server, its CPU per event divided by each reference's, round by round."""
    by_round: dict[int, dict[str, float]] = {}
    for name, trials in active.get("trials", {}).items():
        for trial in trials:
            cpu = (trial.get("window") or {}).get("cpu_us_per_event")
            if cpu:
                by_round.setdefault(trial["round"], {})[name] = cpu
    ratios: dict[str, dict[str, list[float]]] = {}
    for name in active.get("trials", {}):
        for ref in REFERENCES:
            found = [r[name] / r[ref] for r in by_round.values() if name in r and ref in r]
            if ref != name:
                ratios.setdefault(name, {})[ref] = [round(x, 3) for x in found]
    return ratios


def active_summary(active: Results) -> dict[str, dict[str, Any]]:
    """Return, per server, the median of each figure over its trials and its CPU ratios."""
    ratios = cpu_ratios(active)
    summary = {}
    for name, trials in active.get("trials", {}).items():
        rows = [trial_figures(trial) for trial in trials]
        if not rows:
            continue
        numeric = [key for key in rows[0] if key != "code"]
        merged: dict[str, Any] = {key: median(r[key] for r in rows) for key in numeric}
        merged["code"] = sorted({r["code"] for r in rows if r["code"]})
        merged["violations"] = sum(r["violations"] for r in rows)
        merged["trials"] = len(rows)
        for ref in REFERENCES:
            merged[f"x_{ref}"] = median(ratios.get(name, {}).get(ref, []))
            merged[f"x_{ref}_rounds"] = ratios.get(name, {}).get(ref, [])
        summary[name] = merged
    return summary


def active_problems(active: Results) -> list[str]:
    """Return a problem for every ``active`` trial with a violation, an error or a socket that
    did not open (zero is expected of every server on this load)."""
    problems = []
    for name, trials in active.get("trials", {}).items():
        for trial in trials:
            broken = trial["tally"]["violations"] or trial["errors"]
            if broken or trial["sockets"] < trial["sockets_asked"]:
                problems.append(
                    f"{name} active round {trial['round'] + 1}: violations "
                    f"{trial['tally']['violations']}, sockets {trial['sockets']}/"
                    f"{trial['sockets_asked']}, errors {trial['errors']}"
                )
    return problems


def plot_active(active: Results, out: Path) -> None:
    """Bars per server and round: CPU per event, and p99 / max latency."""
    trials = active.get("trials", {})
    if not trials:
        return
    fig, (cpu_ax, lat_ax) = plt.subplots(1, 2, figsize=(12, 5))
    names = list(trials)
    rounds = max((len(t) for t in trials.values()), default=1)
    width = 0.8 / max(rounds, 1)
    for index in range(rounds):
        xs = [i + index * width for i in range(len(names))]
        rows = [trial_figures(trials[n][index]) if index < len(trials[n]) else None for n in names]
        cpu_ax.bar(xs, [r["cpu_us_per_event"] or 0 if r else 0 for r in rows], width,
                   label=f"round {index + 1}")
        lat_ax.bar(xs, [r["p99"] if r else 0 for r in rows], width, label=f"p99 round {index + 1}")
        lat_ax.scatter(xs, [r["max"] if r else 0 for r in rows], marker="_", s=200, color="k")
    for ax, title, unit in ((cpu_ax, "Server CPU per event", "us"),
                            (lat_ax, "Delivery p99 (bars) and max (dashes)", "ms")):
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_xticks([i + width * (rounds - 1) / 2 for i in range(len(names))], names)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    lat_ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "active.png", dpi=100)
    plt.close(fig)


def active_section(active: Results, rel: str, number: int) -> str:
    """Return the ``active`` section."""
    load = active.get("load", {})
    rate = load.get("sockets", 0) * 1000 // max(load.get("delay_ms", 1), 1)
    rounds = max((len(trials) for trials in active.get("trials", {}).values()), default=0)
    summary = active_summary(active)
    lines = [
        f"## {number}. Active sockets: every socket with a run in flight",
        "",
        f"{load.get('sockets')} sockets (4 per user), each with one `scripted` run in flight "
        f"({load.get('tools')} tools, {load.get('tokens')} tokens, `delay_ms` "
        f"{load.get('delay_ms')}: about {rate} events/s in all), {load.get('warmup_s')} s warm-up "
        f"then a {load.get('window_s')} s window, in {rounds} interleaved rounds; each server "
        "in a fresh process, the lean generator in another. "
        "Server CPU per event = the server's /proc ticks over the window / events delivered in "
        "it. Ratios are taken round by round (servers measured back to back), then the median. "
        "GC: collections and pause total in the window and its longest pause (exact when it set "
        "the server's record since start, else an upper bound from the pause histogram; all "
        "from /metrics, the peers serve the same figures from `gc.callbacks`). The baseline "
        "keeps ended runs 120 s like the registry; the `websockets` peer keeps nothing. "
        + ("Each client acks its run at the end (as the reference client and the Locust users "
           "do), which lets the registry trim that run's retained events."
           if load.get("ack", True) else "Clients never ack: every event stays retained."),
    ]
    codes = sorted({trial.get("code") or "not recorded" for trials in
                    active.get("trials", {}).values() for trial in trials})
    lines += ["", f"Code measured (commit, + a hash of uncommitted changes to harness/ and "
              f"registry/): {', '.join(codes)}" + (
                  " — **the code changed during the session**: compare trials of one version."
                  if len(codes) > 1 else ".")]
    for name, reason in active.get("skipped", {}).items():
        lines += ["", f"**{name} skipped:** {reason}."]
    for name, figures in summary.items():
        if figures["gc_collections"] is None:
            lines += ["", f"**{name}: no collector figures**: its /metrics counted no collection "
                      "at all in a busy window, so its collector hook is not installed (the trio "
                      "server enters `Operations.gc` with `with ops.gc:`)."]
    lines += [
        "",
        f"![active]({rel}/active.png)",
        "",
        *table(
            ["server", "events/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "violations",
             "CPU us/event", "x websockets", "x baseline", "GC collections", "GC pause total ms",
             "longest GC pause ms", "loadgen CPU %"],
            ([name, s["events_per_s"], s["p50"], s["p95"], s["p99"], s["max"], s["violations"],
              s["cpu_us_per_event"], s["x_websockets"], s["x_baseline"], s["gc_collections"],
              s["gc_pause_total_ms"], s["gc_longest_ms"], s["loadgen_cpu_percent"]]
             for name, s in summary.items()),
        ),
        "",
        "Every trial:",
        "",
        *table(
            ["server", "round", "code", "events/s", "p50 ms", "p95 ms", "p99 ms", "max ms",
             "violations",
             "CPU us/event", "server CPU %", "GC collections (gen 2)", "longest GC pause ms",
             "server RSS MiB", "loadgen CPU %", "loadgen longest GC ms",
             "other processes CPU %"],
            ([name, f["round"], f["code"], f["events_per_s"], f["p50"], f["p95"], f["p99"],
              f["max"],
              f["violations"], f["cpu_us_per_event"], f["server_cpu_percent"],
              None if f["gc_collections"] is None else f"{f['gc_collections']} ({f['gc_gen2']})",
              f["gc_longest_ms"], f["rss_mib"],
              f["loadgen_cpu_percent"], f["loadgen_gc_longest_ms"], f["others_cpu_percent"]]
             for name, trials in active.get("trials", {}).items()
             for f in map(trial_figures, trials)),
        ),
        "",
        "CPU ratios round by round: " + "; ".join(
            f"{name} x {ref} {s[f'x_{ref}_rounds']}"
            for name, s in summary.items() for ref in REFERENCES if name != ref
        ),
        "",
        PERFORMANCE_MD_BEFORE,
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- soak
def thirds(values: Sequence[float | None]) -> tuple[float | None, float | None, float | None]:
    """Return the mean of the first, middle and last third of ``values`` (Nones skipped)."""
    size = len(values)
    cuts = (0, size // 3, 2 * size // 3, size)
    means = []
    for low, high in itertools.pairwise(cuts):
        part = [v for v in values[low:high] if v is not None]
        means.append(statistics.fmean(part) if part else None)
    return means[0], means[1], means[2]


def soak_verdict(soak: Results) -> list[dict[str, Any]]:
    """Return the soak's checks: RSS plateau, longest GC pause, CPU-per-event drift."""
    result = soak.get("result") or {}
    window = result.get("window") or {}
    rows = window.get("intervals", [])
    _, rss_mid, rss_last = thirds([r.get("server_rss_mib") for r in rows])
    cpu_first, _, cpu_last = thirds([r.get("cpu_us_per_event") for r in rows])
    gc = window.get("gc") or {}
    longest = window_longest(gc)
    over = gc.get("over_limit")
    rss_change = (rss_last / rss_mid - 1) if rss_mid and rss_last else None
    cpu_change = (cpu_last / cpu_first - 1) if cpu_first and cpu_last else None
    return [
        _check("RSS plateau: last third vs middle third (%)", rss_change,
               f"within +-{RSS_BAND:.0%}", rss_change is not None and abs(rss_change) <= RSS_BAND),
        _check("longest GC pause in the soak's window (ms; <= : a bound)", longest,
               f"< {GC_PAUSE_LIMIT_MS:g}", longest is not None and (
                   over == 0 if over is not None else longest < GC_PAUSE_LIMIT_MS),
               percent=False, bound=gc.get("longest_ms") is None),
        {"check": f"GC pauses over {GC_PAUSE_LIMIT_MS:g} ms in the window", "measured": over,
         "limit": "0", "met": None if over is None else over == 0},
        _check("CPU per event: last third vs first third (%)", cpu_change, f"<= +{CPU_DRIFT:.0%}",
               cpu_change is not None and cpu_change <= CPU_DRIFT),
        {"check": "max delivery latency, whole window (ms)",
         "measured": (result.get("latency_ms") or {}).get("max"), "limit": "(seen by clients)",
         "met": None},
    ]


def _check(
    name: str, value: float | None, limit: str, ok: bool, percent: bool = True,
    bound: bool = False,
) -> dict[str, Any]:
    """One verdict row: the value shown (as a signed percentage, as is, or ``<= value`` when it
    is an upper bound) and whether it met."""
    shown: Any = None if value is None else (f"{value:+.1%}" if percent else round(value, 3))
    if bound and value is not None:
        shown = f"<= {shown}"
    met = ok if value is not None else None
    return {"check": name, "measured": shown, "limit": limit, "met": met}


def window_longest(gc: Mapping[str, Any]) -> float | None:
    """Return a window's longest collector pause: exact when it set the server's record, else
    the bound :func:`benchmarks.genkit.gc_delta` found (None without figures)."""
    if gc.get("longest_ms") is not None:
        return float(gc["longest_ms"])
    bound = gc.get("longest_bound_ms")
    return None if bound is None else float(bound)


def gc_of(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """Return the collector figures of an interval record (empty when the server had none)."""
    return record.get("gc") or {}


def interval_longest(record: Mapping[str, Any]) -> Any:
    """Return an interval's longest GC pause: exact when it set a new record, else its bound."""
    gc = gc_of(record)
    longest = window_longest(gc)
    return longest if longest is None or gc.get("longest_ms") is not None else f"<= {longest}"


def plot_soak(soak: Results, out: Path) -> None:
    """Curves over the soak: RSS, CPU per event, events/s, collector pauses, max latency."""
    window = (soak.get("result") or {}).get("window") or {}
    rows = window.get("intervals", [])
    if not rows:
        return
    minutes = [r["t_s"] / 60 for r in rows]
    series = (
        ("server RSS (MiB)", [r.get("server_rss_mib") for r in rows], None),
        ("server CPU per event (us)", [r.get("cpu_us_per_event") for r in rows], None),
        ("events/s received", [r["events_per_s"] for r in rows], None),
        ("GC pause total in the interval (ms)", [gc_of(r).get("pause_total_ms") for r in rows],
         ("longest pause in the interval (at most)", [window_longest(gc_of(r)) for r in rows])),
        ("max delivery latency in the interval (ms)", [r["latency_ms"]["max"] for r in rows],
         ("p99", [r["latency_ms"]["p99"] for r in rows])),
        ("other processes on the machine (% of one core)",
         [r.get("other_processes_cpu_percent") for r in rows], None),
    )
    fig, axes = plt.subplots(len(series), 1, figsize=(10, 2.4 * len(series)), sharex=True)
    for ax, (label, values, extra) in zip(axes, series, strict=True):
        ax.plot(minutes, [float("nan") if v is None else v for v in values], "-", label=label)
        if extra is not None:
            ax.plot(minutes, [float("nan") if v is None else v for v in extra[1]], "--",
                    label=extra[0])
        ax.set_ylabel(label.rsplit(" (", 1)[-1].rstrip(")"))
        ax.set_title(label, fontsize="small")
        ax.grid(True, alpha=0.3)
        if extra is not None:
            ax.legend(fontsize="x-small")
    axes[3].axhline(GC_PAUSE_LIMIT_MS, color="red", linewidth=0.8, linestyle="--")
    axes[-1].set_xlabel("minutes into the window")
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=100)
    plt.close(fig)


def soak_section(soak: Results, rel: str, number: int) -> str:
    """Return the soak section."""
    load, result = soak.get("load", {}), soak.get("result") or {}
    window = result.get("window") or {}
    rows = window.get("intervals", [])
    per_minute = max(1, round(60 / max(load.get("interval_s") or 60, 1)))
    step = per_minute if len(rows) >= 3 * per_minute else 1
    lines = [
        f"## {number}. Soak: the registry under steady load",
        "",
        f"{load.get('sockets')} sockets each with a run in flight (`delay_ms` "
        f"{load.get('delay_ms')}, {load.get('tools')} tools, {load.get('tokens')} tokens: about "
        f"{load.get('sockets', 0) * 1000 // max(load.get('delay_ms', 1), 1)} events/s) for "
        f"{load.get('window_s', 0) / 60:g} minutes, `retention_s` {soak.get('retention_s')}, "
        + ("clients ack each run at its end" if load.get("ack", True) else
           "clients never ack, so every event stays retained for `retention_s` (the worst case)")
        + "; a "
        f"record every {load.get('interval_s')} s (server RSS and CPU from /proc, collector "
        "figures from /metrics deltas, latency from the generator). Window: "
        f"{result.get('achieved_rate')} events/s, latency {result.get('latency_ms')}, "
        f"violations {(result.get('tally') or {}).get('violations') or 'none'}.",
        "",
        f"![soak]({rel}/soak.png)",
        "",
        *table(["check", "measured", "limit", ""],
               ([c["check"], c["measured"], c["limit"],
                 "n/a" if c["met"] is None else ("met" if c["met"] else "**missed**")]
                for c in soak_verdict(soak))),
        "",
        "A longest pause shown as `<= x` did not beat the server's record since start, so it is "
        "an upper bound: the smallest of that record, the interval's pause total and the lowest "
        "bound of the pause histogram (`registry_gc_pause_duration_seconds`) above every pause "
        "of the interval. Pauses over the limit are counted from the same histogram, exactly.",
        "",
        "Tracked objects: not measured (the server does not publish a count, and "
        "`len(gc.get_objects())` inside it would cost a full pause of its own).",
        "",
        (f"The {load.get('interval_s'):g} s record ending at each whole minute (every record is "
         "in soak.json and on the plot):" if step > 1 else "Every record:"),
        "",
        *table(
            ["minute", "events/s", "server RSS MiB", "CPU us/event", "GC collections (gen 2)",
             "GC pause total ms", "longest GC pause in it ms", "longest GC pause so far ms",
             "p99 ms", "max ms", "retained runs"],
            ([round(r["t_s"] / 60, 1), r["events_per_s"], r.get("server_rss_mib"),
              r.get("cpu_us_per_event"),
              f"{(r.get('gc') or {}).get('collections')} ({(r.get('gc') or {}).get('gen2')})",
              (r.get("gc") or {}).get("pause_total_ms"), interval_longest(r),
              (r.get("gc") or {}).get("longest_since_start_ms"), r["latency_ms"]["p99"],
              r["latency_ms"]["max"], r.get("retained_runs")]
             for r in rows[step - 1 :: step]),
        ),
    ]
    return "\n".join(lines)


def retained_section(retained: Results, number: int) -> str:
    """Return the memory-per-retained-event section."""
    load = retained.get("load", {})
    lines = [
        f"## {number}. Memory per retained event",
        "",
        f"The registry with `retention_s` 3600 (nothing expires); each pass runs "
        f"{load.get('runs_per_socket')} runs on each of {load.get('sockets')} sockets "
        f"(`delay_ms` 0, {load.get('tools')} tools, {load.get('tokens')} tokens), never acked, "
        "and the runs stay retained with all their events. RSS per event = RSS growth over the "
        "pass / events it added; the first pass only warms the server up. Event bytes = mean "
        "size of an event frame on the wire.",
        "",
        *table(
            ["pass", "token bytes", "runs", "events", "event bytes", "retained runs after",
             "RSS after MiB", "RSS growth MiB", "RSS per event B", "beyond the event's bytes B"],
            ([p["label"], p["token_bytes"], p["runs"], p["events"], p["event_bytes_mean"],
              p["retained_runs"], p["rss_mib"], p.get("rss_growth_mib"), p.get("bytes_per_event"),
              p.get("overhead_bytes_per_event")]
             for p in retained.get("passes", [])),
        ),
    ]
    return "\n".join(lines)


def lean_problems(results: Results) -> list[str]:
    """Return the problems of the lean scenarios: any violation, error or unopened socket."""
    problems = active_problems(results.get("active", {}))
    soaked = results.get("soak", {}).get("result")
    if soaked and (soaked["tally"]["violations"] or soaked["errors"]):
        problems.append(f"registry soak: violations {soaked['tally']['violations']}, "
                        f"errors {soaked['errors']}")
    for done in results.get("retained", {}).get("passes", []):
        if done["violations"]:
            problems.append(f"registry retained {done['label']}: {done['violations']}")
    return problems


# ------------------------------------------------------------------------------- before
def load_before(folder: Path | None) -> dict[str, Any]:
    """Return the previous report's sweep and fan-out results (empty when there are none)."""
    if folder is None:
        return {}
    found = {}
    for name in ("sweep", "fanout", "run"):
        path = folder / f"{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
    return found


def cpu_us_per_event(step: Mapping[str, Any] | None) -> float | None:
    """Return server CPU per event (us) of a trio-generator result: mean CPU % / events/s."""
    if not step or not step.get("achieved_rate"):
        return None
    return round(float(step["server_cpu_percent"]) / 100 / float(step["achieved_rate"]) * 1e6, 1)


def _step_at(sweep: Mapping[str, Any], name: str, rate: int) -> Mapping[str, Any] | None:
    for step in sweep.get(name, {}).get("steps", []):
        if int(step["offered_rate"]) == rate:
            return step  # type: ignore[no-any-return]
    return None


def _relative_to(value: float | None, reference: float | None) -> float | None:
    return round(value / reference, 2) if value is not None and reference else None


def before_after_ratios(results: Results, before: Mapping[str, Any]) -> list[list[Any]]:
    """Return one row per server: its figures divided by the ``websockets`` peer's of the same
    run, before and now (what survives a change of machine load or of measuring method)."""
    rows = []
    for name in dict.fromkeys([*before.get("sweep", {}), *results.get("sweep", {})]):
        pairs = []
        for data in (before, results):
            sweep, fan = data.get("sweep", {}), data.get("fanout", {})
            rate = (sweep.get(name) or {}).get("max_sustained_rate")
            ref_rate = (sweep.get("websockets") or {}).get("max_sustained_rate")
            fan_cpu = cpu_us_per_event(fan.get(name))
            pairs.append([
                _relative_to(rate, ref_rate),
                _relative_to(fan_cpu, cpu_us_per_event(fan.get("websockets"))),
                _relative_to(cpu_us_per_event(_step_at(sweep, name, 2000)),
                             cpu_us_per_event(_step_at(sweep, "websockets", 2000))),
            ])
        rows.append([name, *(value for both in zip(*pairs, strict=True) for value in both)])
    return rows


def before_after(results: Results, before: Mapping[str, Any]) -> list[list[Any]]:
    """Return one row per server: the previous report's figure, then this one's."""
    rows = []
    old_sweep, new_sweep = before.get("sweep", {}), results.get("sweep", {})
    old_fan, new_fan = before.get("fanout", {}), results.get("fanout", {})
    for name in dict.fromkeys([*old_sweep, *new_sweep]):
        pairs = []
        for sweep, fan in ((old_sweep, old_fan), (new_sweep, new_fan)):
            lat = (fan.get(name) or {}).get("latency_ms", {})
            pairs.append([
                (sweep.get(name) or {}).get("max_sustained_rate"),
                lat.get("p95"), lat.get("p99"), cpu_us_per_event(fan.get(name)),
                cpu_us_per_event(_step_at(sweep, name, 2000)),
            ])
        rows.append([name, *(value for both in zip(*pairs, strict=True) for value in both)])
    return rows


def before_section(results: Results, before: Mapping[str, Any], number: int) -> str:
    """Return the before/after section (empty when there is no previous report)."""
    if not before:
        return ""
    started = before.get("run", {}).get("started_at", "?")
    headers = ["server"]
    for figure in ("max sustained events/s", "fan-out p95 ms", "fan-out p99 ms",
                   "fan-out CPU us/event", "CPU us/event at 2,000/s offered"):
        headers += [f"{figure} before", "now"]
    ratio_headers = ["server"]
    for figure in ("max sustained rate", "fan-out CPU per event", "CPU per event at 2,000/s"):
        ratio_headers += [f"{figure} / websockets' before", "now"]
    lines = [
        f"## {number}. Before and after",
        "",
        f"\"before\" = the previous full report ({started} UTC, before the server rewrite), kept "
        "in `results/before/` (JSON, plots and its REPORT.md); \"now\" = this report. Same "
        "scenarios, but the measuring changed: before, the trio + trio-websocket generator and "
        "the server's CPU % sampled by psutil over the generator's whole run (connecting and "
        "draining included, which lowers it); now, the lean generator and /proc ticks over the "
        "measurement window only. CPU per event = server CPU / events per second. The old "
        "generator's own delays added to the latency it measured at high rates (at 10,000 "
        "events/s against the `websockets` peer, in the same minute: p99 165 ms with it, 9.6 "
        "ms with the lean one), and machine load differed between the two days, so absolute "
        "figures do not compare well; the second table divides each figure by the `websockets` "
        "peer's of the same run.",
        "",
        *table(headers, before_after(results, before)),
        "",
        *table(ratio_headers, before_after_ratios(results, before)),
    ]
    return "\n".join(lines)
