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
"""The integer counters of a :class:`Tally`, in report order (always in :meth:`Tally.to_dict`)."""

EXTRA_COUNTERS: Final = (
    "runs_cut",
    "events_lost_by_design",
    "runs_cut_length_unknown",
    "resumes",
    "resumes_other_node",
    "resumes_same_node",
)
"""Counters only some tests have (in :meth:`Tally.to_dict` when not zero): runs cut because the
server declined the resume (``delivery_mode`` direct), the events they lost by design, how many
of those had an unknown length (so the loss is a lower bound), and resumes by whether they went
to another node than the one the socket dropped from."""

NODE_COUNTERS: Final = ("connections", "runs_started", "events", "resumes_in")
"""Per-node counters of a multi-node test: sockets opened on the node, runs started there,
run events received from it, resumes sent to it."""


@final
@attrs.define(eq=False)
class Tally:
    """Counts of runs, events and violations; mergeable across processes."""

    counts: Counter[str] = attrs.field(factory=Counter)
    violations: Counter[str] = attrs.field(factory=Counter)
    nodes: Counter[str] = attrs.field(factory=Counter)
    """Per-node counts, keyed ``"<node index>:<counter>"`` (see :data:`NODE_COUNTERS`)."""
    _sent: Counter[str] = attrs.field(factory=Counter)
    _sent_violations: Counter[str] = attrs.field(factory=Counter)
    _sent_nodes: Counter[str] = attrs.field(factory=Counter)

    def add_finished_run(self, run: RunChecker) -> None:
        """Count a run the client followed to its end (or gave up on, when unterminated).

        A cut run (:meth:`RunChecker.cut`) counts its events lost by design as expected and
        not delivered. Violations are not counted here: feed them to :meth:`add_violations`.
        """
        self.counts["runs_completed"] += int(run.terminal_seen)
        expected = max(run.last_seq, run.expected or 0)
        if run.cut_after is not None:
            self.counts["runs_cut"] += 1
            self.counts["events_lost_by_design"] += run.lost_by_design
            if not run.length_known:
                self.counts["runs_cut_length_unknown"] += 1
                expected += 1
        self.counts["events_expected"] += expected
        self.counts["events_delivered"] += run.delivered

    def add_node(self, node: int, counter: str, amount: int = 1) -> None:
        """Count ``amount`` of a per-node counter (:data:`NODE_COUNTERS`) for node ``node``."""
        self.nodes[f"{node}:{counter}"] += amount

    def by_node(self) -> dict[int, dict[str, int]]:
        """Return the per-node counts as ``{node: {counter: n}}`` (every counter present)."""
        out: dict[int, dict[str, int]] = {}
        for key, value in self.nodes.items():
            node, _, counter = key.partition(":")
            out.setdefault(int(node), dict.fromkeys(NODE_COUNTERS, 0))[counter] = value
        return dict(sorted(out.items()))

    def add_violations(self, found: Iterable[Violation]) -> None:
        """Count violations by kind (feed each one once, as the checkers return it)."""
        self.violations.update(violation.kind.value for violation in found)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy."""
        counts = {name: self.counts[name] for name in COUNTERS}
        counts.update({name: self.counts[name] for name in EXTRA_COUNTERS if self.counts[name]})
        out: dict[str, Any] = {"counts": counts, "violations": dict(self.violations)}
        if self.nodes:
            out["nodes"] = dict(self.nodes)
        return out

    def take_delta(self) -> dict[str, Any]:
        """Return, JSON-ready, what was added since the previous call (for periodic reports)."""
        out = {
            "counts": dict(self.counts - self._sent),
            "violations": dict(self.violations - self._sent_violations),
            "nodes": dict(self.nodes - self._sent_nodes),
        }
        self._sent = Counter(self.counts)
        self._sent_violations = Counter(self.violations)
        self._sent_nodes = Counter(self.nodes)
        return out

    def merge(self, data: Mapping[str, Any]) -> None:
        """Add the counts of a :meth:`to_dict` copy."""
        self.counts.update({k: int(v) for k, v in data.get("counts", {}).items()})
        self.violations.update({k: int(v) for k, v in data.get("violations", {}).items()})
        self.nodes.update({k: int(v) for k, v in data.get("nodes", {}).items()})


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
