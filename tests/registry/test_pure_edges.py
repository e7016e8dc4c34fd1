"""Edge cases of the sans-IO registry modules that the property tests do not reach.

Each test drives a pure class through its public methods and checks what a caller observes:
the events and frames it gets back, the errors it raises, the counts it reports.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from registry import Config, EventType, PayloadError, Run, RunStream, StreamError, Trigger
from registry._events import dump_payload
from registry._manager import WebSocketManager
from registry._outbound import OutboundQueue
from registry._outbox import Abandon, Append, Disconnect, Finish, Outbox, Tools, Trim
from registry._payloads import AgentCompleted, ToolCompleted, validate_payload
from registry._retention import Retention
from registry._stream import HeldBytes
from registry._table import RunTable

BIG = 1 << 30


def stream_with(events: int, max_retained: int = 100_000, run_id: str = "run-1",
                total: HeldBytes | None = None) -> RunStream:
    """A stream holding ``events`` events: agent_started, then partial_result ``p<seq>``."""
    stream = RunStream(run_id, "thread-1", "triage", max_retained, total)
    for seq in range(1, events + 1):
        if seq == 1:
            stream.emit(EventType.AGENT_STARTED, {"agent": "triage"}, 1.0)
        else:
            stream.emit(EventType.PARTIAL_RESULT, {"text": f"p{seq}"}, float(seq))
    return stream


def text_of(frame: bytes) -> Any:
    return json.loads(frame)["payload"].get("text")


# ================================================================= RunStream
def test_only_an_empty_stream_can_start_later() -> None:
    stream = stream_with(2)
    with pytest.raises(StreamError, match="only an empty stream"):
        stream.start_after(5)
    assert stream.last_seq == 2  # unchanged
    assert stream.events_after(0)[0].type is EventType.AGENT_STARTED


def test_a_mirror_skips_entries_it_already_holds() -> None:
    source = stream_with(3)
    mirror = RunStream("run-1", "thread-1", "triage", 100)
    entries = [(seq, source.frame(seq)) for seq in range(1, 4)]
    assert [e.seq for e in mirror.extend(entries[:2])] == [1, 2]
    # The same entries again, overlapping the new one: only seq 3 is new.
    appended = mirror.extend(entries)
    assert [e.seq for e in appended] == [3]
    assert mirror.last_seq == 3
    assert [mirror.frame(seq) for seq in (1, 2, 3)] == [source.frame(seq) for seq in (1, 2, 3)]


def test_a_mirror_refuses_a_gap_and_keeps_what_came_before_it() -> None:
    source = stream_with(4)
    mirror = RunStream("run-1", "thread-1", "triage", 100)
    mirror.extend([(1, source.frame(1))])
    with pytest.raises(StreamError, match="got seq 3 after 1"):
        mirror.extend([(3, source.frame(3)), (4, source.frame(4))])
    assert mirror.last_seq == 1
    assert mirror.get(2) is None


def test_a_mirror_started_later_takes_the_next_seq_only() -> None:
    source = stream_with(5)
    mirror = RunStream("run-1", "thread-1", "triage", 100)
    mirror.start_after(3)
    assert mirror.extend([(4, source.frame(4)), (5, source.frame(5))])[-1].seq == 5
    assert mirror.retained_count == 2
    assert mirror.get(3) is None


def test_released_frames_are_compacted_and_the_rest_stay_readable() -> None:
    """Past 1024 released frames the log drops them from its arrays; later reads still match."""
    total = HeldBytes()
    stream = stream_with(3000, max_retained=10, total=total)
    expected = {seq: stream.frame(seq) for seq in range(2990, 3001)}
    assert stream.trimmed_through == 2990
    stream.release_through(2000)  # past the compaction threshold, over half the log
    assert stream.held_from() == 2001
    assert stream.held_bytes == total.bytes == sum(
        len(stream.frame(seq)) for seq in range(2001, 3001))
    stream.release_through(10_000)  # bounded by the trim point: frames a resume may ask for stay
    assert stream.held_from() == 2991
    assert stream.held_bytes == total.bytes == sum(
        len(stream.frame(seq)) for seq in range(2991, 3001))
    for seq in range(2991, 3001):
        assert stream.frame(seq) == expected[seq]
        assert stream.ts(seq) == float(seq)
    assert [e.payload["text"] for e in stream.events_after(2990)] == [
        f"p{seq}" for seq in range(2991, 3001)]
    stream.emit(EventType.PARTIAL_RESULT, {"text": "after"}, 3001.0)
    assert text_of(stream.frame(3001)) == "after"
    assert [e.seq for e in stream.events_after(2991)] == list(range(2992, 3002))


def test_a_release_below_what_was_released_frees_nothing() -> None:
    stream = stream_with(20, max_retained=5)
    stream.release_through(10)
    held = stream.held_bytes
    stream.release_through(4)
    assert stream.held_bytes == held
    assert stream.held_from() == 11


# ================================================================== payloads
def test_a_completion_error_must_be_text() -> None:
    with pytest.raises(PayloadError, match="'error' of type str"):
        ToolCompleted("search", "c1", "error", error=5)  # type: ignore[arg-type]
    with pytest.raises(PayloadError, match="'error_id' of type str"):
        AgentCompleted("failed", error="boom", error_id=7)  # type: ignore[arg-type]
    with pytest.raises(PayloadError, match="'error' of type str"):
        validate_payload(EventType.AGENT_COMPLETED, {"status": "failed", "error": ["x"]})


def test_a_stream_refuses_a_completion_whose_error_is_not_text() -> None:
    stream = stream_with(1)
    with pytest.raises(PayloadError):
        stream.finish({"status": "failed", "error": 42}, 2.0)
    assert not stream.ended
    assert stream.last_seq == 1


# ==================================================================== events
def test_a_payload_that_refers_to_itself_is_encoded_by_its_top_level_keys() -> None:
    payload: dict[str, Any] = {"text": "hello", "n": 1}
    payload["self"] = payload
    decoded = json.loads(dump_payload(payload))
    assert decoded["text"] == "hello"
    assert decoded["n"] == "1"
    assert set(decoded) == {"text", "n", "self"}
    assert isinstance(decoded["self"], str)


def test_a_self_referencing_tool_argument_still_makes_a_valid_event() -> None:
    stream = stream_with(1)
    args: dict[str, Any] = {"q": "x"}
    args["loop"] = args
    stream.emit(EventType.TOOL_EXECUTING, {"tool": "search", "call_id": "c1", "args": args}, 2.0)
    frame = json.loads(stream.frame(2))
    assert frame["type"] == "tool_executing"
    assert frame["seq"] == 2
    assert set(frame["payload"]) == {"tool", "call_id", "args"}


# ==================================================================== outbox
def test_the_outbox_names_the_runs_with_operations_waiting() -> None:
    outbox = Outbox(max_operations=10, max_bytes=BIG)
    for operation in (Append("r1", ((1, b"abc"),)), Tools("r2", {"c1": "search"}),
                      Finish("r3", 60.0), Disconnect("alice", "conn-1"), Abandon("r4")):
        assert outbox.push(operation)
    assert outbox.runs() == {"r1", "r2", "r3", "r4"}  # a disconnect names no run
    batch = outbox.take()
    assert outbox.runs() == set()
    outbox.give_back(batch[:1])
    assert outbox.runs() == {"r1"}
    assert outbox.bytes == 3


# ================================================================ outbound
def test_an_append_already_sent_queues_nothing_more() -> None:
    stream = stream_with(2)
    cues: list[None] = []
    queue = OutboundQueue("alice", max_messages=10, max_bytes=BIG,
                          on_ready=lambda: cues.append(None))
    queue.subscribe("run-1", stream, 0)
    assert len(queue.take(BIG)[0]) == 2
    cues.clear()
    # The registry announces the same end of log again (e.g. a second notifier pass).
    assert queue.on_append("run-1", 2)
    assert not queue.has_frames()
    assert queue.take(BIG) == ([], [])
    assert cues == []
    assert queue.queued == 0


# =================================================================== table
def test_dropping_a_mirror_that_was_replaced_keeps_the_newer_one() -> None:
    table = RunTable(max_active_runs=10, max_active_runs_per_user=10,
                     max_retained_runs_per_user=10)
    old = Run(run_id="run-1", user_id="alice", agent="triage", mirror=True)
    new = Run(run_id="run-1", user_id="alice", agent="triage", mirror=True)
    table.add_mirror(old)
    table.add_mirror(new)
    table.drop_mirror(old)
    assert table.lookup("run-1") is new
    table.drop_mirror(new)
    assert table.lookup("run-1") is None
    table.drop_mirror(new)  # already gone: nothing to do
    assert table.retained_count == 0


# =============================================================== retention
def ended_run(table: RunTable, run_id: str, user: str = "alice") -> Run:
    run = Run(run_id=run_id, user_id=user, agent="triage", request_id=run_id,
              stream=stream_with(3, run_id=run_id))
    table.check_room(user)
    table.add(run)
    run.lifecycle.fire(Trigger.START)
    run.lifecycle.fire(Trigger.SUCCEED)
    return run


def retention(
    max_retained_runs_per_user: int = 10, overflowed: list[OutboundQueue] | None = None,
) -> tuple[Retention, RunTable]:
    """A Retention whose 4008 closes (``on_overflow``) land in ``overflowed``."""
    overflowed = overflowed if overflowed is not None else []
    table = RunTable(max_active_runs=10, max_active_runs_per_user=10,
                     max_retained_runs_per_user=max_retained_runs_per_user)
    config = Config(retention_s=60.0, max_retained_runs_per_user=max_retained_runs_per_user)
    return Retention(config, table, WebSocketManager(5), overflowed.append), table


async def test_a_run_dropped_by_the_per_user_bound_expires_as_a_no_op(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keeper, table = retention(max_retained_runs_per_user=1)
    first, second = ended_run(table, "run-a"), ended_run(table, "run-b")
    keeper.held.bytes = first.stream.held_bytes + second.stream.held_bytes
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.expiry.serve)
        keeper.keep(first, trio.current_time())
        await trio.sleep(1.0)
        keeper.keep(second, trio.current_time())  # the user's oldest ended run goes
        assert table.lookup("run-a") is None
        assert keeper.held.bytes == second.stream.held_bytes
        await trio.sleep(59.5)  # run-a's retention timer is due: nothing left to drop
        assert table.lookup("run-b") is second
        assert keeper.held.bytes == second.stream.held_bytes
        await trio.sleep(1.0)  # run-b's
        assert table.lookup("run-b") is None
        assert keeper.held.bytes == 0
        nursery.cancel_scope.cancel()


def test_dropping_a_run_twice_frees_its_bytes_once() -> None:
    keeper, table = retention()
    run = ended_run(table, "run-a")
    keeper.held.bytes = run.stream.held_bytes
    queue = OutboundQueue("alice", max_messages=10, max_bytes=BIG)
    keeper.manager.subscribe(queue, "run-a", run.stream.last_seq + 1)
    queue.subscribe("run-a", run.stream, 0)
    keeper.keep(run, 0.0)
    keeper.drop(run)
    assert queue.run_ids() == ["run-a"]  # the socket sends what it was owed of it first
    assert len(queue.take(BIG)[0]) == 3
    assert queue.run_ids() == []  # then it stops following it
    assert keeper.held.bytes == 0
    keeper.drop(run)
    assert keeper.held.bytes == 0
    assert table.lookup("run-a") is None


def test_a_dropped_run_whose_owed_replay_overflows_a_socket_closes_it_with_4008() -> None:
    overflowed: list[OutboundQueue] = []
    keeper, table = retention(overflowed=overflowed)
    run = ended_run(table, "run-a")
    tight = OutboundQueue("alice", max_messages=2, max_bytes=BIG)  # 3 frames owed
    done = OutboundQueue("alice", max_messages=2, max_bytes=BIG)  # already sent them all
    for queue in (tight, done):
        keeper.manager.subscribe(queue, "run-a", run.stream.last_seq + 1)
        queue.subscribe("run-a", run.stream, 0)
    done.take(BIG)
    keeper.keep(run, 0.0)
    keeper.drop(run)
    assert overflowed == [tight] and tight.close_code == 4008
    assert done.run_ids() == [] and done.close_code is None



def test_the_outbox_is_full_past_either_bound() -> None:
    by_count = Outbox(max_operations=2, max_bytes=BIG)
    by_bytes = Outbox(max_operations=10, max_bytes=4)
    for outbox in (by_count, by_bytes):
        assert not outbox.full
        outbox.push(Append("r1", ((1, b"abc"),)))
        assert not outbox.full
        outbox.push(Trim("r1", 1))
        outbox.push(Append("r1", ((2, b"de"),)))
        assert outbox.full
        outbox.take()
        assert not outbox.full
