"""Pure per-process tallies of a load test: run counts, delivery counts and raw latency samples.

A Locust process (or a benchmark load generator) keeps one :class:`Tally` and one
:class:`LatencySamples`, writes them as JSON when the test stops, and the runner merges the files
of every process. No locust, gevent or trio here.
"""

from __future__ import annotations

import array
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Final, final

import attrs

from loadtests.checker import RunChecker, Violation

COUNTERS: Final = (
    "runs_started",
    "runs_completed",
    "runs_failed_to_start",
    "runs_abandoned",
    "events_expected",
    "events_delivered",
    "drops",
    "unexpected_closes",
)
"""The integer counters of a :class:`Tally`, in report order."""


@final
@attrs.define(eq=False)
class Tally:
    """Counts of runs, events and violations; mergeable across processes."""

    counts: Counter[str] = attrs.field(factory=Counter)
    violations: Counter[str] = attrs.field(factory=Counter)
    _sent: Counter[str] = attrs.field(factory=Counter)
    _sent_violations: Counter[str] = attrs.field(factory=Counter)

    def add_finished_run(self, run: RunChecker) -> None:
        """Count a run the client followed to its end (or gave up on, when unterminated).

        Violations are not counted here: feed them to :meth:`add_violations` as found.
        """
        self.counts["runs_completed"] += int(run.terminal_seen)
        self.counts["events_expected"] += max(run.last_seq, run.expected or 0)
        self.counts["events_delivered"] += run.delivered

    def add_violations(self, found: Iterable[Violation]) -> None:
        """Count violations by kind (feed each one once, as the checkers return it)."""
        self.violations.update(violation.kind.value for violation in found)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy."""
        return {
            "counts": {name: self.counts[name] for name in COUNTERS},
            "violations": dict(self.violations),
        }

    def take_delta(self) -> dict[str, Any]:
        """Return, JSON-ready, what was added since the previous call (for periodic reports)."""
        out = {
            "counts": dict(self.counts - self._sent),
            "violations": dict(self.violations - self._sent_violations),
        }
        self._sent = Counter(self.counts)
        self._sent_violations = Counter(self.violations)
        return out

    def merge(self, data: Mapping[str, Any]) -> None:
        """Add the counts of a :meth:`to_dict` copy."""
        self.counts.update({k: int(v) for k, v in data.get("counts", {}).items()})
        self.violations.update({k: int(v) for k, v in data.get("violations", {}).items()})


@final
@attrs.define(eq=False)
class LatencySamples:
    """Raw (receive time, latency) samples per event type, bounded by ``cap`` in total.

    Past ``cap`` samples are counted in ``dropped`` but not kept (about 12 bytes each kept).
    """

    cap: int = 2_000_000
    dropped: int = 0
    _times: dict[str, array.array[float]] = attrs.field(factory=dict)
    _millis: dict[str, array.array[float]] = attrs.field(factory=dict)
    _size: int = 0

    def record(self, etype: str, received_at: float, latency_ms: float) -> None:
        """Keep one sample: wall time of receipt (s) and delivery latency (ms)."""
        if self._size >= self.cap:
            self.dropped += 1
            return
        if etype not in self._times:
            self._times[etype] = array.array("d")
            self._millis[etype] = array.array("f")
        self._times[etype].append(received_at)
        self._millis[etype].append(latency_ms)
        self._size += 1

    def __len__(self) -> int:
        return self._size

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy: ``{"types": {etype: {"t": [...], "ms": [...]}}, ...}``."""
        types = {
            etype: {
                "t": [round(t, 4) for t in self._times[etype]],
                "ms": [round(ms, 3) for ms in self._millis[etype]],
            }
            for etype in self._times
        }
        return {"types": types, "dropped": self.dropped}

    @classmethod
    def merged(cls, parts: Iterable[Mapping[str, Any]]) -> LatencySamples:
        """Return the union of several :meth:`to_dict` copies (uncapped)."""
        out = cls(cap=2**62)
        for part in parts:
            out.dropped += int(part.get("dropped", 0))
            for etype, series in part.get("types", {}).items():
                for t, ms in zip(series["t"], series["ms"], strict=True):
                    out.record(etype, float(t), float(ms))
        return out

    def series(self) -> dict[str, tuple[list[float], list[float]]]:
        """Return ``{etype: (receive times, latencies ms)}`` as plain lists."""
        return {k: (list(self._times[k]), list(self._millis[k])) for k in self._times}
