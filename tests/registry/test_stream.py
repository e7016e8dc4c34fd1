"""RunStream, the sans-IO delivery stream: numbering, guarantees, retention, acks and replay."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from registry import (
    Event,
    EventType,
    PayloadError,
    ResumeUnavailable,
    RunStatus,
    RunStream,
    SeqOutOfRange,
    StreamError,
)
from tests.registry._support import check_run_events, closing_status

RUN, THREAD, AGENT = "run-1", "thread-1", "triage"
CALL_IDS = st.sampled_from(["c1", "c2", "c3", "c4", "c5"])
TOOLS = st.sampled_from(["search", "fetch"])
TEXT = st.text(max_size=4)


def new_stream(max_retained: int = 100) -> RunStream:
    return RunStream(RUN, THREAD, AGENT, max_retained)


def completed(status: RunStatus) -> dict[str, Any]:
    key = "result" if status is RunStatus.SUCCEEDED else "error"
    return {"status": str(status), key: "done"}


def tool_closed(tool: str, call_id: str, status: str) -> dict[str, Any]:
    key = "result" if status == "ok" else "error"
    return {"tool": tool, "call_id": call_id, "status": status, key: "x"}


def opened(tool: str, call_id: str) -> dict[str, Any]:
    return {"tool": tool, "call_id": call_id, "args": {}}


# ====================================================================== stateful model
class RunStreamMachine(RuleBasedStateMachine):
    """Drives a RunStream with random agent, client and transport actions against a model."""

    stream: RunStream

    @initialize(max_retained=st.integers(1, 12))
    def open_stream(self, max_retained: int) -> None:
        self.stream = new_stream(max_retained)
        self.max_retained = max_retained
        self.emitted: list[Event] = []
        self.open_calls: dict[str, str] = {}
        self.seen_calls: set[str] = set()
        self.trimmed = 0
        self.acked = 0
        self.status: RunStatus | None = None
        self.clock = 1000.0

    # ------------------------------------------------------------- helpers
    def _tick(self) -> float:
        self.clock += 0.5
        return self.clock

    def _accept(self, out: list[Event], ts: float, expect_start: bool) -> None:
        assert all(e.ts == ts and e.run_id == RUN and e.thread_id == THREAD for e in out)
        if expect_start:
            assert out[0].type is EventType.AGENT_STARTED
            assert out[0].payload == {"agent": AGENT}
        self.emitted.extend(out)
        self.trimmed = max(self.trimmed, len(self.emitted) - self.max_retained)

    def _refused(self, action: Callable[[], object]) -> None:
        before = self.stream.last_seq
        with pytest.raises(StreamError):
            action()
        assert self.stream.last_seq == before

    def _emit(self, event_type: EventType | str, payload: Mapping[str, Any], ok: bool) -> None:
        if not ok:
            self._refused(lambda: self.stream.emit(EventType(event_type), payload, 0.0))
            return
        ts, fresh = self._tick(), not self.emitted
        out = self.stream.emit(event_type, payload, ts)  # type: ignore[arg-type]
        assert [e.type for e in out][-1] == EventType(event_type)
        assert dict(out[-1].payload) == dict(payload)
        assert len(out) == (2 if fresh and event_type != EventType.AGENT_STARTED else 1)
        self._accept(out, ts, expect_start=fresh)

    # --------------------------------------------------------- agent rules
    @rule()
    def start(self) -> None:
        ok = self.status is None and not self.emitted
        self._emit(EventType.AGENT_STARTED, {"agent": AGENT}, ok)

    @rule(text=TEXT, as_str=st.booleans())
    def think(self, text: str, as_str: bool) -> None:
        kind = "agent_thinking" if as_str else EventType.AGENT_THINKING
        self._emit(kind, {"thought": text}, self.status is None)

    @rule(text=TEXT)
    def partial(self, text: str) -> None:
        self._emit(EventType.PARTIAL_RESULT, {"text": text}, self.status is None)

    @rule(count=st.one_of(st.integers(0, 8), st.integers(1030, 1100)))
    def burst(self, count: int) -> None:
        for i in range(count):
            self._emit(EventType.PARTIAL_RESULT, {"text": str(i)}, self.status is None)

    @rule(call_id=CALL_IDS, tool=TOOLS)
    def open_tool(self, call_id: str, tool: str) -> None:
        ok = self.status is None and call_id not in self.seen_calls
        self._emit(EventType.TOOL_EXECUTING, opened(tool, call_id), ok)
        if ok:
            self.seen_calls.add(call_id)
            self.open_calls[call_id] = tool

    @rule(call_id=CALL_IDS, tool=TOOLS, status=st.sampled_from(["ok", "error", "cancelled"]))
    def close_tool(self, call_id: str, tool: str, status: str) -> None:
        ok = self.status is None and self.open_calls.get(call_id) == tool
        self._emit(EventType.TOOL_COMPLETED, tool_closed(tool, call_id, status), ok)
        if ok:
            del self.open_calls[call_id]

    @rule(status=st.sampled_from(list(RunStatus)), via_emit=st.booleans())
    def finish(self, status: RunStatus, via_emit: bool) -> None:
        payload = completed(status)
        if via_emit:
            def end(ts: float) -> list[Event]:
                return self.stream.emit(EventType.AGENT_COMPLETED, payload, ts)
        else:
            def end(ts: float) -> list[Event]:
                return self.stream.finish(payload, ts)
        if self.status is not None:
            self._refused(lambda: end(0.0))
            return
        ts, fresh, still_open = self._tick(), not self.emitted, dict(self.open_calls)
        out = end(ts)
        closes = out[1:-1] if fresh else out[:-1]
        assert [(e.payload["call_id"], e.payload["tool"]) for e in closes] == list(
            still_open.items())
        assert all(e.payload["status"] == closing_status(status) for e in closes)
        assert all(e.type is EventType.TOOL_COMPLETED and "error" in e.payload for e in closes)
        assert out[-1].type is EventType.AGENT_COMPLETED and out[-1].payload == payload
        self._accept(out, ts, expect_start=fresh)
        self.status, self.open_calls = status, {}
        assert check_run_events(self.emitted) == payload

    @rule(field=st.sampled_from(["thought", "text", "agent"]))
    def bad_payload(self, field: str) -> None:
        before = self.stream.last_seq
        with pytest.raises(PayloadError):
            self.stream.emit(EventType.AGENT_THINKING, {field: 1}, 0.0)
        assert self.stream.last_seq == before

    # ------------------------------------------------- client / transport rules
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(-1, self.stream.last_seq + 2), label="ack seq")
        if not 0 <= seq <= len(self.emitted):
            with pytest.raises(SeqOutOfRange):
                self.stream.ack(seq)
            return
        self.stream.ack(seq)
        self.acked = max(self.acked, seq)

    @rule(data=st.data())
    def trim(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(-1, self.stream.last_seq + 2), label="trim seq")
        expected = max(0, min(seq, len(self.emitted)) - self.trimmed)
        assert self.stream.trim_through(seq) == expected
        self.trimmed += expected

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        after = data.draw(st.integers(-1, self.stream.last_seq + 2), label="after_seq")
        if not 0 <= after <= len(self.emitted):
            with pytest.raises(SeqOutOfRange):
                self.stream.events_after(after)
        elif after < self.trimmed:
            with pytest.raises(ResumeUnavailable):
                self.stream.events_after(after)
        else:
            self.stream.check_resume(after)
            assert list(self.stream.events_after(after)) == self.emitted[after:]

    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(-1, self.stream.last_seq + 2), label="get seq")
        expected = self.emitted[seq - 1] if self.trimmed < seq <= len(self.emitted) else None
        assert self.stream.get(seq) == expected

    # ------------------------------------------------------------ invariants
    @invariant()
    def numbering_is_gapless_from_one(self) -> None:
        assert [e.seq for e in self.emitted] == list(range(1, len(self.emitted) + 1))
        assert self.stream.last_seq == len(self.emitted)
        assert self.stream.started == bool(self.emitted)
        if self.emitted:
            assert self.emitted[0].type is EventType.AGENT_STARTED
            assert sum(e.type is EventType.AGENT_STARTED for e in self.emitted) == 1

    @invariant()
    def completion_is_once_and_last(self) -> None:
        ends = [i for i, e in enumerate(self.emitted) if e.type is EventType.AGENT_COMPLETED]
        assert ends == ([len(self.emitted) - 1] if self.status is not None else [])
        assert self.stream.ended == (self.status is not None)
        assert self.stream.status == self.status

    @invariant()
    def retention_keeps_the_newest_within_bound(self) -> None:
        assert self.stream.trimmed_through == self.trimmed
        assert self.stream.retained_count == len(self.emitted) - self.trimmed
        assert self.stream.retained_count <= self.max_retained

    @invariant()
    def open_tools_match(self) -> None:
        assert list(self.stream.open_tools.items()) == list(self.open_calls.items())
        assert self.stream.acked_seq == self.acked


RunStreamMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
TestRunStreamMachine = RunStreamMachine.TestCase


# ======================================================== refused events change nothing
REFUSALS: dict[str, tuple[EventType, dict[str, Any]]] = {
    "close_unknown": (EventType.TOOL_COMPLETED, tool_closed("search", "nope", "ok")),
    "start_twice": (EventType.AGENT_STARTED, {"agent": AGENT}),
    "reuse_call_id": (EventType.TOOL_EXECUTING, opened("search", "a")),
    "after_end": (EventType.AGENT_THINKING, {"thought": "late"}),
}


@settings(max_examples=100, deadline=None)
@given(prefix=st.integers(0, 4), kind=st.sampled_from(sorted(REFUSALS)))
def test_a_refused_event_records_nothing(prefix: int, kind: str) -> None:
    """After a StreamError the log holds exactly what successful calls returned (no gap)."""
    stream = new_stream()
    handed: list[Event] = []
    for i in range(prefix):
        handed += stream.emit(EventType.PARTIAL_RESULT, {"text": str(i)}, 0.0)
    if kind == "start_twice" and not handed:
        handed += stream.emit(EventType.AGENT_STARTED, {"agent": AGENT}, 0.0)
    if kind == "reuse_call_id":
        handed += stream.emit(EventType.TOOL_EXECUTING, opened("search", "a"), 0.0)
    if kind == "after_end":
        handed += stream.finish(completed(RunStatus.FAILED), 0.0)
    event_type, payload = REFUSALS[kind]
    with pytest.raises(StreamError):
        stream.emit(event_type, payload, 1.0)
    assert list(stream.events_after(0)) == handed
    assert stream.last_seq == len(handed)


def test_a_refused_first_tool_completion_leaves_the_stream_unstarted() -> None:
    stream = new_stream()
    with pytest.raises(StreamError):
        stream.emit(EventType.TOOL_COMPLETED, tool_closed("search", "nope", "ok"), 1.0)
    assert stream.last_seq == 0
    assert not stream.started
    assert stream.emit(EventType.AGENT_THINKING, {"thought": "t"}, 2.0)[0].seq == 1


# ======================================================================= unit tests
def test_first_event_other_than_started_synthesises_agent_started() -> None:
    out = new_stream().emit(EventType.PARTIAL_RESULT, {"text": "hi"}, 5.0)
    assert [(e.type, e.seq, e.ts) for e in out] == [
        (EventType.AGENT_STARTED, 1, 5.0), (EventType.PARTIAL_RESULT, 2, 5.0)]
    assert out[0].payload == {"agent": AGENT}


def test_finish_on_a_fresh_stream_is_started_then_completed() -> None:
    stream = new_stream()
    out = stream.finish(completed(RunStatus.CANCELLED), 1.0)
    assert [e.type for e in out] == [EventType.AGENT_STARTED, EventType.AGENT_COMPLETED]
    assert stream.ended and stream.status is RunStatus.CANCELLED


@pytest.mark.parametrize("status", list(RunStatus))
def test_finish_closes_open_tools_in_order_with_the_status_the_run_implies(
    status: RunStatus,
) -> None:
    stream = new_stream()
    stream.emit(EventType.TOOL_EXECUTING, opened("search", "a"), 0.0)
    stream.emit(EventType.TOOL_EXECUTING, opened("fetch", "b"), 0.0)
    out = stream.finish(completed(status), 1.0)
    assert [(e.type, e.payload["call_id"]) for e in out[:-1]] == [
        (EventType.TOOL_COMPLETED, "a"), (EventType.TOOL_COMPLETED, "b")]
    assert {e.payload["status"] for e in out[:-1]} == {closing_status(status)}
    assert stream.open_tools == {}


def test_emit_after_end_raises() -> None:
    stream = new_stream()
    stream.finish(completed(RunStatus.SUCCEEDED), 0.0)
    for event_type, payload in [
        (EventType.AGENT_THINKING, {"thought": "x"}),
        (EventType.AGENT_COMPLETED, completed(RunStatus.FAILED)),
    ]:
        with pytest.raises(StreamError):
            stream.emit(event_type, payload, 0.0)
    with pytest.raises(StreamError):
        stream.finish(completed(RunStatus.FAILED), 0.0)
    assert stream.status is RunStatus.SUCCEEDED


def test_a_call_id_is_never_reused_even_after_it_closed() -> None:
    stream = new_stream()
    stream.emit(EventType.TOOL_EXECUTING, opened("search", "a"), 0.0)
    stream.emit(EventType.TOOL_COMPLETED, tool_closed("search", "a", "ok"), 0.0)
    with pytest.raises(StreamError):
        stream.emit(EventType.TOOL_EXECUTING, opened("search", "a"), 0.0)


def test_closing_a_call_under_another_tool_name_raises() -> None:
    stream = new_stream()
    stream.emit(EventType.TOOL_EXECUTING, opened("search", "a"), 0.0)
    with pytest.raises(StreamError):
        stream.emit(EventType.TOOL_COMPLETED, tool_closed("fetch", "a", "ok"), 0.0)
    assert stream.open_tools == {"a": "search"}


def test_open_tools_is_a_copy() -> None:
    stream = new_stream()
    stream.emit(EventType.TOOL_EXECUTING, opened("search", "a"), 0.0)
    snapshot = stream.open_tools
    stream.emit(EventType.TOOL_COMPLETED, tool_closed("search", "a", "ok"), 0.0)
    assert snapshot == {"a": "search"}
    assert stream.open_tools == {}


def test_invalid_payload_raises_payload_error() -> None:
    stream = new_stream()
    with pytest.raises(PayloadError):
        stream.emit(EventType.TOOL_EXECUTING, {"tool": "search", "call_id": "a"}, 0.0)
    with pytest.raises(PayloadError):
        stream.finish({"status": "succeeded"}, 0.0)
    assert stream.last_seq == 0


def test_unknown_event_type_raises_value_error() -> None:
    with pytest.raises(ValueError):
        new_stream().emit("agent_exploded", {}, 0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_retained", [0, -1])
def test_max_retained_below_one_is_refused(max_retained: int) -> None:
    with pytest.raises(ValueError):
        new_stream(max_retained)


@pytest.mark.parametrize("seq", [-1, True, 1.0, "1", 5])
def test_ack_and_resume_reject_seqs_that_are_not_held(seq: Any) -> None:
    stream = new_stream()
    for _ in range(3):
        stream.emit(EventType.PARTIAL_RESULT, {"text": "x"}, 0.0)  # seqs 1..4
    stream.ack(4)
    for call in (stream.ack, stream.check_resume, stream.events_after):
        with pytest.raises(SeqOutOfRange):
            call(seq)
    assert stream.acked_seq == 4


def test_ack_is_cumulative_and_never_lowers_nor_trims() -> None:
    stream = new_stream()
    stream.emit(EventType.PARTIAL_RESULT, {"text": "x"}, 0.0)
    stream.ack(2)
    stream.ack(1)
    assert stream.acked_seq == 2
    assert stream.retained_count == 2


def test_replay_after_the_last_seq_is_empty() -> None:
    stream = new_stream()
    stream.finish(completed(RunStatus.SUCCEEDED), 0.0)
    stream.trim_through(2)
    assert list(stream.events_after(2)) == []
    with pytest.raises(ResumeUnavailable):
        stream.check_resume(1)


def test_retention_bound_keeps_the_newest_events() -> None:
    stream = new_stream(max_retained=3)
    for i in range(10):
        stream.emit(EventType.PARTIAL_RESULT, {"text": str(i)}, 0.0)
    assert stream.retained_count == 3
    assert [e.seq for e in stream.events_after(8)] == [9, 10, 11]
    assert [e.payload["text"] for e in stream.events_after(8)] == ["7", "8", "9"]
    with pytest.raises(ResumeUnavailable):
        stream.events_after(7)
    assert stream.get(8) is None
    event = stream.get(9)
    assert event is not None and event.payload == {"text": "7"}


def test_get_returns_none_for_unknown_and_trimmed_seqs() -> None:
    stream = new_stream()
    stream.emit(EventType.PARTIAL_RESULT, {"text": "x"}, 0.0)
    stream.trim_through(1)
    assert stream.get(0) is None
    assert stream.get(1) is None
    assert stream.get(3) is None
    event = stream.get(2)
    assert event is not None and event.payload == {"text": "x"}


def test_many_single_trims_compact_and_keep_every_answer_right() -> None:
    stream = new_stream(max_retained=5000)
    events: list[Event] = []
    for i in range(3000):
        events += stream.emit(EventType.PARTIAL_RESULT, {"text": str(i)}, 0.0)
    for seq in range(1, 2601):
        assert stream.trim_through(seq) == 1
        if seq % 500 == 0:
            assert list(stream.events_after(seq)) == events[seq:]
    assert stream.retained_count == 3001 - 2600
    assert [stream.get(s) for s in (2600, 2601, 3001, 3002)] == [
        None, events[2600], events[3000], None]
    assert list(stream.events_after(2600)) == events[2600:]


def test_small_retention_over_many_events_compacts_and_replays_exactly() -> None:
    stream = new_stream(max_retained=2)
    out = [stream.emit(EventType.PARTIAL_RESULT, {"text": str(i)}, 0.0)[-1] for i in range(2500)]
    end = stream.finish(completed(RunStatus.SUCCEEDED), 0.0)
    assert stream.retained_count == 2
    assert list(stream.events_after(stream.last_seq - 2)) == [out[-1], end[0]]
    assert stream.trimmed_through == stream.last_seq - 2
