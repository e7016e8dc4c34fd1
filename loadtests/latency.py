"""HDR-histogram helpers for delivery latencies (microsecond resolution, 3 significant digits).

Pure: no locust, gevent or trio. Shared by the load-test report and the benchmark generator.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from hdrh.histogram import HdrHistogram

HIGHEST_US: Final = 600_000_000
"""Latencies are tracked up to 10 minutes; anything above is clamped to it."""
PERCENTILES: Final = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p999", 99.9))


def new_histogram() -> HdrHistogram:
    """Return an empty latency histogram (values in microseconds)."""
    return HdrHistogram(1, HIGHEST_US, 3)


def record_ms(histogram: HdrHistogram, latency_ms: float) -> None:
    """Record one latency given in milliseconds (negative clock skew counts as 1 us)."""
    histogram.record_value(min(HIGHEST_US, max(1, round(latency_ms * 1000))))


def histogram_of(latencies_ms: Iterable[float]) -> HdrHistogram:
    """Return a histogram of ``latencies_ms``."""
    histogram = new_histogram()
    for latency in latencies_ms:
        record_ms(histogram, latency)
    return histogram


def summarize(histogram: HdrHistogram) -> dict[str, float]:
    """Return count, p50, p95, p99, p99.9 and max in milliseconds (zeros when empty)."""
    count = int(histogram.get_total_count())
    out: dict[str, float] = {"count": count}
    for name, percentile in PERCENTILES:
        value = histogram.get_value_at_percentile(percentile) if count else 0
        out[name] = round(value / 1000, 3)
    out["max"] = round(histogram.get_max_value() / 1000, 3) if count else 0.0
    return out
