"""The benchmarks' reading of the collector figures on /metrics: an interval's longest pause is
exact when it set the server's record and otherwise bounded, and its stalls are counted."""

from __future__ import annotations

from benchmarks import genkit
from benchmarks.reporting_lean import soak_verdict, window_longest

PREFIX = "registry_gc_"


def page(collections: int, total_s: float, longest_s: float, under: dict[str, int]) -> str:
    """A /metrics page with the collector figures only (``under``: the histogram's buckets)."""
    lines = [
        f'{PREFIX}collections_total{{generation="0"}} {collections}',
        f"{PREFIX}pause_seconds_total {total_s}",
        f"{PREFIX}pause_longest_seconds {longest_s}",
    ]
    lines += [f'{PREFIX}pause_duration_seconds_bucket{{le="{le}"}} {n}' for le, n in under.items()]
    lines.append(f'{PREFIX}pause_duration_seconds_bucket{{le="+Inf"}} {collections}')
    return "\n".join(lines) + "\n"


def figures(text: str) -> dict[str, object]:
    parsed = genkit.gc_figures(genkit.parse_prometheus(text))
    assert parsed is not None
    return parsed


def test_a_window_under_an_old_record_is_bounded_by_the_histogram() -> None:
    """Start-up's 70 ms pause is the record; the window's 40 pauses all fell under 10 ms."""
    before = figures(page(2, 0.075, 0.070, {"0.005": 1, "0.01": 1, "0.025": 1, "0.05": 1}))
    after = figures(page(42, 0.275, 0.070, {"0.005": 30, "0.01": 41, "0.025": 41, "0.05": 41}))
    gc = genkit.gc_delta(before, after)
    assert gc is not None
    assert (gc["collections"], gc["longest_ms"], gc["longest_bound_ms"]) == (40, None, 10.0)
    assert gc["over_limit"] == 0
    assert window_longest(gc) == 10.0


def test_a_stall_in_the_window_is_counted_though_it_set_no_record() -> None:
    before = figures(page(2, 0.075, 0.070, {"0.025": 1, "0.05": 1}))
    after = figures(page(5, 0.140, 0.070, {"0.025": 3, "0.05": 4}))
    gc = genkit.gc_delta(before, after)
    assert gc is not None
    assert (gc["over_limit"], gc["longest_bound_ms"]) == (1, 50.0)  # all 3 at most 50 ms


def test_a_new_record_is_the_exact_longest() -> None:
    before = figures(page(2, 0.010, 0.005, {"0.025": 2}))
    after = figures(page(3, 0.040, 0.030, {"0.025": 2}))
    gc = genkit.gc_delta(before, after)
    assert gc is not None
    assert (gc["longest_ms"], gc["longest_bound_ms"], gc["over_limit"]) == (30.0, None, 1)


def test_a_server_without_the_histogram_counts_no_stalls() -> None:
    text = "".join(line + "\n" for line in page(2, 0.01, 0.005, {}).splitlines()
                   if "duration" not in line)
    gc = genkit.gc_delta(figures(text), figures(text))
    assert gc is not None
    assert gc["over_limit"] is None


def soak(gc: dict[str, object]) -> dict[str, object]:
    rows = [{"server_rss_mib": 100.0, "cpu_us_per_event": 150.0}] * 9
    return {"result": {"window": {"intervals": rows, "gc": gc}, "latency_ms": {"max": 30.0}}}


def test_the_soak_meets_its_pause_check_only_without_stalls() -> None:
    calm = {c["check"]: c for c in soak_verdict(soak(
        {"longest_ms": None, "longest_bound_ms": 20.0, "over_limit": 0}))}
    stalled = {c["check"]: c for c in soak_verdict(soak(
        {"longest_ms": None, "longest_bound_ms": 50.0, "over_limit": 2}))}
    name = next(name for name in calm if name.startswith("longest GC pause"))
    assert (calm[name]["measured"], calm[name]["met"]) == ("<= 20.0", True)
    assert (stalled[name]["measured"], stalled[name]["met"]) == ("<= 50.0", False)
    over = next(name for name in calm if name.startswith("GC pauses over"))
    assert (calm[over]["met"], stalled[over]["met"], stalled[over]["measured"]) == (True, False, 2)
