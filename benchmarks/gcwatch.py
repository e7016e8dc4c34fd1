"""The garbage collector's pauses inside a comparison server, served as ``GET /metrics``.

The registry publishes its collector pauses on ``/metrics`` (``harness._ops``); the bare trio
baseline and the ``websockets`` peer use this module to publish the same three figures under
the same names, so the load generator reads every server the same way:
``registry_gc_collections_total{generation}``, ``registry_gc_pause_seconds_total`` and
``registry_gc_pause_longest_seconds``. A pause is the time from a collection's ``start``
callback to its ``stop`` callback (``gc.callbacks``), in which the event loop stands still.
No I/O and no framework imports.
"""

from __future__ import annotations

import gc
import time
from typing import final


@final
class GcPauses:
    """Counts and times every cyclic collection while it is entered (a context manager)."""

    __slots__ = ("_started", "by_generation", "count", "longest_s", "total_s")

    def __init__(self) -> None:
        self.count = 0
        self.total_s = 0.0
        self.longest_s = 0.0
        self.by_generation = [0, 0, 0]
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
        ]
        return "\n".join(lines) + "\n"
