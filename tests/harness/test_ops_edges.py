"""The operations surface's own parts: the heap keeper's audit, the latency sampler's bound
on one interval, the collector-pause histogram (the registry's and the peers'), and token
minting's refusal of an empty user."""

from __future__ import annotations

import gc
import itertools
import types
import weakref
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

import harness._ops
from benchmarks import gcwatch
from harness import mint_token
from harness._ops import (
    _MAX_INTERVAL_SAMPLES,
    GC_PAUSE_BUCKETS,
    LATENCY_BUCKETS,
    CollectorPauses,
    HeapKeeper,
    _Latency,
)


@pytest.fixture
def no_automatic_collection() -> Iterator[None]:
    """Only explicit collections run (the test decides when garbage may go)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Node:
    """A tracked object that can refer to itself."""

    me: object = None


@pytest.mark.usefixtures("no_automatic_collection")
async def test_the_audit_collects_a_cycle_that_was_frozen(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Frozen objects are out of the collector's sight: a reference cycle among them stays.
    Once the frozen population has grown enough since it was first measured, the audit
    unfreezes and collects once."""
    keeper = HeapKeeper(freeze_every_s=1.0, audit_growth=1.0, audit_every_s=0.0, check_every=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.serve)
        cycle = Node()
        cycle.me = cycle
        gone = weakref.ref(cycle)
        del cycle
        await trio.sleep(1.5)  # the first freeze: the cycle is frozen, the population measured
        gc.collect()
        assert gone() is not None
        assert keeper.audits == 0
        hoard = [[index] for index in range(1000)]  # the frozen population grows
        await trio.sleep(1.0)  # the second: an audit
        assert gone() is None
        assert keeper.audits == 1
        nursery.cancel_scope.cancel()
    assert len(hoard) == 1000
    gc.unfreeze()


@pytest.mark.usefixtures("no_automatic_collection")
async def test_a_heap_that_grew_to_its_load_and_stays_there_is_never_audited(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once a bug: the population was first measured at start-up, so the growth from an idle
    server to a steady load triggered a full collection (a 250 ms pause in the soak)."""
    keeper = HeapKeeper(freeze_every_s=1.0, audit_growth=2.0, audit_every_s=0.0, check_every=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.serve)
        load = [[index] for index in range(max(3 * gc.get_freeze_count(), 10_000))]
        await trio.sleep(10.5)  # ten freezes and checks of a steady heap
        assert keeper.audits == 0
        nursery.cancel_scope.cancel()
    assert load
    gc.unfreeze()


def test_one_interval_keeps_a_bounded_sample_but_counts_everything() -> None:
    latency = _Latency()
    stamps = [100.0] * (_MAX_INTERVAL_SAMPLES + 10)
    latency.observe(stamps, now=100.001)
    assert latency.count == _MAX_INTERVAL_SAMPLES + 10
    assert len(latency.take_interval()) == _MAX_INTERVAL_SAMPLES
    assert latency.take_interval() == []
    cumulative = dict(latency.cumulative())
    assert cumulative["+Inf"] == _MAX_INTERVAL_SAMPLES + 10
    assert cumulative[repr(LATENCY_BUCKETS[0])] == 0


def test_a_token_needs_a_user() -> None:
    with pytest.raises(ValueError, match="user_id"):
        mint_token("secret" * 8, "")


@pytest.mark.usefixtures("no_automatic_collection")
def test_every_pause_lands_in_the_first_bucket_that_holds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three real collections timed 0.5 ms, 30 ms and 2 s: the cumulative buckets say how many
    pauses were at most each bound, so a reader of two scrapes counts the stalls between."""
    ticks = iter([0.0, 0.0005, 1.0, 1.030, 5.0, 7.0])
    clock = types.SimpleNamespace(perf_counter=lambda: next(ticks))
    monkeypatch.setattr(harness._ops, "time", clock)
    with CollectorPauses() as pauses:
        for _ in range(3):
            gc.collect()
    buckets = dict(pauses.cumulative())
    assert (buckets["0.001"], buckets["0.025"], buckets["0.05"], buckets["1.0"]) == (1, 1, 2, 2)
    assert buckets["+Inf"] == pauses.count == 3
    assert pauses.longest_s == pytest.approx(2.0)


@pytest.mark.usefixtures("no_automatic_collection")
def test_the_peers_publish_the_same_histogram_as_the_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The benchmark peers' pauses (benchmarks.gcwatch) use the registry's bounds and names."""
    assert gcwatch.PAUSE_BUCKETS == GC_PAUSE_BUCKETS
    ticks = itertools.chain([0.0, 0.040], itertools.repeat(0.0))
    monkeypatch.setattr(gcwatch, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    with gcwatch.GcPauses() as pauses:
        gc.collect()
    families = {f.name: f for f in text_string_to_metric_families(pauses.metrics_text())}
    samples = {(s.name, s.labels.get("le")): s.value
               for s in families["registry_gc_pause_duration_seconds"].samples}
    assert samples[("registry_gc_pause_duration_seconds_bucket", "0.025")] == 0
    assert samples[("registry_gc_pause_duration_seconds_bucket", "0.05")] == 1
    assert samples[("registry_gc_pause_duration_seconds_count", None)] == 1
