"""The garbage collector's pauses inside a comparison server, served as ``GET /metrics``.

The registry publishes its collector pauses on ``/metrics`` (``harness._ops``); the bare trio
baseline and the ``websockets`` peer use this module to publish the same figures under the
same names, so the load generator reads every server the same way:
``registry_gc_collections_total{generation}``, ``registry_gc_pause_seconds_total``,
``registry_gc_pause_longest_seconds`` and the histogram ``registry_gc_pause_duration_seconds``
(bounds ``PAUSE_BUCKETS``, the registry's ``GC_PAUSE_BUCKETS``). A pause is the time from a
collection's ``start`` callback to its ``stop`` callback (``gc.callbacks``), in which the event
loop stands still. No I/O and no framework imports.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import time
from typing import Final, final

#: The pause histogram's upper bounds (seconds), as ``harness._ops.GC_PAUSE_BUCKETS`` (not
#: imported from there: a peer's process loads no part of the registry).
PAUSE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@final
class GcPauses:
    """Counts and times every cyclic collection while it is entered (a context manager)."""

    __slots__ = ("_started", "by_bucket", "by_generation", "count", "longest_s", "total_s")

    def __init__(self) -> None:
        self.count = 0
        self.total_s = 0.0
        self.longest_s = 0.0
        self.by_generation = [0, 0, 0]
        self.by_bucket = [0] * (len(PAUSE_BUCKETS) + 1)
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.count += 1
        self.total_s += pause
        self.longest_s = max(self.longest_s, pause)
        self.by_generation[info.get("generation", 2)] += 1
        self.by_bucket[bisect.bisect_left(PAUSE_BUCKETS, pause)] += 1

    def metrics_text(self) -> str:
        """Return the figures in the Prometheus text format."""
        lines = ["# TYPE registry_gc_collections_total counter"]
        lines += [
            f'registry_gc_collections_total{{generation="{generation}"}} {count}'
            for generation, count in enumerate(self.by_generation)
        ]
        lines += [
            "# TYPE registry_gc_pause_seconds_total counter",
            f"registry_gc_pause_seconds_total {self.total_s!r}",
            "# TYPE registry_gc_pause_longest_seconds gauge",
            f"registry_gc_pause_longest_seconds {self.longest_s!r}",
            "# TYPE registry_gc_pause_duration_seconds histogram",
        ]
        bounds = [*map(repr, PAUSE_BUCKETS), "+Inf"]
        lines += [
            f'registry_gc_pause_duration_seconds_bucket{{le="{bound}"}} {float(count)!r}'
            for bound, count in zip(bounds, itertools.accumulate(self.by_bucket), strict=True)
        ]
        lines += [f"registry_gc_pause_duration_seconds_count {float(self.count)!r}",
                  f"registry_gc_pause_duration_seconds_sum {self.total_s!r}"]
        return "\n".join(lines) + "\n"
