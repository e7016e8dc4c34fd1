"""OutboundQueue, one connection's sans-IO outbound side: order, resume, fairness and 4008.

What a client sees (PROTOCOL.md guarantees 1 and 6, v2 "Closing a slow reader" and
"Hardening: max_queued_mib"): each run's events once, in order, from the seq it asked for;
control frames ahead of queued events; runs taking turns; replay never counted against the
bounds; over ``max_queued_messages`` or ``max_queued_mib`` the socket is closed with 4008 and
nothing more is queued for it. The queue is driven here the way the registry and a transport
drive it and checked against an independent model.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from registry import EventType, RunStream
from registry._outbound import CLOSE_OVERFLOW, OutboundQueue

BIG = 10**9
OTHER_CLOSES = st.sampled_from([1000, 1001, 1011, 4001])


# ============================================================================ helpers
def new_run(index: int, max_retained: int = 1000) -> RunStream:
    return RunStream(f"run-{index}", f"thread-{index}", "triage", max_retained)


def emit_text(stream: RunStream, text: str = "x", ts: float = 1.0) -> None:
    """Appends exactly one event: ``agent_started`` first, then ``partial_result``."""
    if stream.started:
        stream.emit(EventType.PARTIAL_RESULT, {"text": text}, ts)
    else:
        stream.emit(EventType.AGENT_STARTED, {"agent": text}, ts)
    assert stream.frame(stream.last_seq)  # held


def control(n: int, pad: int = 0) -> bytes:
    return json.dumps({"type": "pong", "id": n, "pad": "p" * pad}).encode()


def decode(frame: bytes) -> dict[str, Any]:
    obj = json.loads(frame)
    assert isinstance(obj, dict)
    return obj


def seqs_of(frames: list[bytes]) -> list[tuple[str, int]]:
    """(run_id, seq) of each event frame, as a client reads them."""
    return [(o["run_id"], o["seq"]) for o in map(decode, frames) if "seq" in o]


def drain(queue: OutboundQueue) -> list[bytes]:
    out: list[bytes] = []
    for _ in range(10_000):
        frames, _stamps = queue.take(BIG)
        if not frames:
            return out
        out += frames
    raise AssertionError("the queue never ran dry")


def subscribed_queue(
    stream: RunStream, after_seq: int = 0, *, max_messages: int = 1000, max_bytes: int = BIG
) -> OutboundQueue:
    queue = OutboundQueue("u1", max_messages=max_messages, max_bytes=max_bytes)
    queue.subscribe(stream.run_id, stream, after_seq)
    return queue


def emit_live(stream: RunStream, queue: OutboundQueue, text: str = "x", ts: float = 1.0) -> bool:
    """Emits one event and tells the queue, as the registry does; returns on_append's answer."""
    emit_text(stream, text, ts)
    return queue.on_append(stream.run_id, stream.last_seq)


# ============================================================================== model
@dataclass
class RunModel:
    stream: RunStream
    frames: dict[int, bytes] = field(default_factory=dict)  # seq -> bytes when emitted
    stamps: dict[int, float] = field(default_factory=dict)
    calls: int = 0
    dropped: bool = False  # by a retention bound: not_found for the registry from then on

    @property
    def run_id(self) -> str:
        return self.stream.run_id


@dataclass
class Copy:
    """A connection's copy of one run: the next seq owed, and where live events start."""

    next: int
    live_from: int
    announced: int  # the newest seq the registry told the queue about
    dropped: bool = False  # the run was dropped: the copy ends after its last frame

    def waiting_live(self) -> range:
        return range(max(self.next, self.live_from), self.announced + 1)


@dataclass
class QueueModel:
    queue: OutboundQueue
    max_messages: int
    max_bytes: int
    cues: list[int]
    control: deque[bytes] = field(default_factory=deque)
    copies: dict[int, Copy] = field(default_factory=dict)  # run index -> copy followed
    owed: dict[int, Copy] = field(default_factory=dict)  # after a close other than 4008
    closed: int | None = None
    held: tuple[int, int] = (0, 0)  # queued, queued_bytes when last looked at

    def busy(self) -> bool:
        copies = [*self.copies.values(), *self.owed.values()]
        return bool(self.control) or any(c.next <= c.announced for c in copies)


class OutboundMachine(RuleBasedStateMachine):
    """A few runs and connections, driven as the registry and the transports drive them."""

    runs: list[RunModel]
    queues: list[QueueModel]

    @initialize(
        retained=st.lists(st.integers(3, 20), min_size=2, max_size=3),
        bounds=st.lists(
            st.tuples(st.integers(2, 30), st.one_of(st.integers(150, 3000), st.just(8 << 20))),
            min_size=1, max_size=3),
    )
    def setup(self, retained: list[int], bounds: list[tuple[int, int]]) -> None:
        self.clock = 1000.0
        self.pings = 0
        self.runs = [RunModel(new_run(i, m)) for i, m in enumerate(retained)]
        self.queues = []
        for max_messages, max_bytes in bounds:
            cues = [0]

            def cue(cues: list[int] = cues) -> None:
                cues[0] += 1

            queue = OutboundQueue("u1", max_messages=max_messages, max_bytes=max_bytes,
                                  on_ready=cue)
            self.queues.append(QueueModel(queue, max_messages, max_bytes, cues))

    # ------------------------------------------------------------- model helpers
    def _queue(self, index: int) -> QueueModel:
        return self.queues[index % len(self.queues)]

    def _load(self, q: QueueModel) -> tuple[int, int]:
        count = len(q.control)
        size = sum(map(len, q.control))
        for r, copy in q.copies.items():
            for seq in copy.waiting_live():
                count += 1
                size += len(self.runs[r].frames[seq])
        return count, size

    def _fits(self, q: QueueModel) -> bool:
        count, size = self._load(q)
        return count <= q.max_messages and size <= q.max_bytes

    def _overflow(self, q: QueueModel) -> None:
        """What 4008 means: the queue holds nothing and follows no run any more."""
        q.control.clear()
        q.copies.clear()
        q.closed = CLOSE_OVERFLOW
        assert q.queue.close_code == CLOSE_OVERFLOW
        assert q.queue.run_ids() == []
        assert (q.queue.queued, q.queue.queued_bytes) == (0, 0)
        assert not q.queue.has_frames()

    @contextmanager
    def _cues(self, q: QueueModel) -> Iterator[None]:
        """on_ready fires when the queue gets something to send after nothing, and on close."""
        busy, closed, before = q.busy(), q.closed, q.cues[0]
        yield
        calls = q.cues[0] - before
        if (closed is None and q.closed is not None) or (not busy and q.busy()):
            assert 1 <= calls <= 2
        elif not q.busy():
            assert calls == 0, "a write cue with nothing to write"
        else:
            assert calls <= 1

    def _announce(self, r: int) -> None:
        """Tells every queue following run ``r`` about its new last seq, as the registry does."""
        run = self.runs[r]
        for q in self.queues:
            if r in q.owed and r not in q.copies:  # closed; the registry has not noticed yet
                with self._cues(q):
                    assert q.queue.on_append(run.run_id, run.stream.last_seq)
                continue
            copy = q.copies.get(r)
            if copy is None:
                continue
            with self._cues(q):
                ok = q.queue.on_append(run.run_id, run.stream.last_seq)
                copy.announced = run.stream.last_seq
                fits = self._fits(q)
                if not fits:
                    self._overflow(q)
            assert ok == fits

    def _emit(self, r: int, kind: str, pad: int) -> None:
        run = self.runs[r]
        self.clock += 0.25
        if kind == "partial":
            out = run.stream.emit(EventType.PARTIAL_RESULT, {"text": "t" * pad}, self.clock)
        elif kind == "tool":
            run.calls += 1
            payload = {"tool": "search", "call_id": f"c{run.calls}", "args": {"q": "a" * pad}}
            out = run.stream.emit(EventType.TOOL_EXECUTING, payload, self.clock)
        else:
            out = run.stream.finish({"status": "cancelled", "error": "e" * pad}, self.clock)
        for event in out:
            run.frames[event.seq] = run.stream.frame(event.seq)
            run.stamps[event.seq] = event.ts
        assert sorted(run.frames) == list(range(1, run.stream.last_seq + 1))

    def _check_take(self, q: QueueModel, max_bytes: int) -> None:
        busy_before = q.busy()
        pending = {r: max(0, c.announced - c.next + 1) for r, c in q.copies.items()}
        with self._cues(q):
            frames, stamps = q.queue.take(max_bytes)
        if busy_before:
            assert frames, "take returned nothing although there was something to send"
        else:
            assert (frames, stamps) == ([], [])
        assert sum(map(len, frames[:-1])) < max_bytes, "take went on past max_bytes"
        events_seen = False
        order: list[int] = []
        for frame in frames:
            obj = decode(frame)
            if "seq" not in obj:  # a control frame: all of them first, in the order pushed
                assert not events_seen, "a control frame came after an event frame"
                assert q.control and frame == q.control.popleft()
                continue
            events_seen = True
            r = int(obj["run_id"].removeprefix("run-"))
            copy = q.copies.get(r) or q.owed.get(r)
            assert copy is not None, f"an event of {obj['run_id']}, which is not followed"
            assert obj["seq"] == copy.next, "a gap or a repeat"
            assert copy.next <= copy.announced, "an event the registry never announced"
            assert frame == self.runs[r].frames[copy.next]
            assert obj["ts"] == self.runs[r].stamps[copy.next]
            assert stamps[len(order)] == self.runs[r].stamps[copy.next]
            copy.next += 1
            if copy.dropped and copy.next > copy.announced and q.copies.get(r) is copy:
                del q.copies[r]  # everything owed was sent: the queue follows it no more
            order.append(r)
        assert len(stamps) == len(order), "one ts per event frame, none for control frames"
        if sum(map(len, frames)) < max_bytes:
            assert not q.busy(), "take stopped short of max_bytes with frames left"
        if q.closed is None:
            self._check_turns(order, pending)

    @staticmethod
    def _check_turns(order: list[int], pending: dict[int, int]) -> None:
        """Between two frames of one run, every other run with events left had one turn."""
        taken: Counter[int] = Counter()
        last_at: dict[int, int] = {}
        for j, r in enumerate(order):
            if r in last_at:
                between = Counter(order[last_at[r] + 1:j])
                for other, left in pending.items():
                    if other == r:
                        continue
                    assert between[other] <= 1, "a run had two turns in one round"
                    if left - taken[other] > 0:
                        assert between[other] == 1, f"run {other} was skipped"
            last_at[r] = j
            taken[r] += 1

    # -------------------------------------------------------------- registry side
    @precondition(lambda self: any(not run.stream.ended for run in self.runs))
    @rule(
        r=st.integers(0, 2),
        steps=st.lists(
            st.tuples(st.sampled_from(["partial", "partial", "tool", "end"]), st.integers(0, 80)),
            min_size=1, max_size=4),
    )
    def emit(self, r: int, steps: list[tuple[str, int]]) -> None:
        r %= len(self.runs)
        for kind, pad in steps:
            if self.runs[r].stream.ended:
                return
            self._emit(r, kind, pad)
            self._announce(r)

    @precondition(lambda self: any(not run.dropped for run in self.runs))
    @rule(qi=st.integers(0, 2), r=st.integers(0, 2), data=st.data())
    def subscribe(self, qi: int, r: int, data: st.DataObject) -> None:
        """A start (after the last seq) or a resume, also of a run the connection follows."""
        q = self._queue(qi)
        kept = [i for i, run in enumerate(self.runs) if not run.dropped]
        r = kept[r % len(kept)]
        stream = self.runs[r].stream
        lo, hi = stream.trimmed_through, stream.last_seq
        after = data.draw(st.sampled_from([lo, hi]) | st.integers(lo, hi), label="after_seq")
        stream.check_resume(after)  # what the registry checks first
        with self._cues(q):
            q.queue.subscribe(stream.run_id, stream, after)
            if q.closed is None:
                q.copies[r] = Copy(after + 1, stream.last_seq + 1, stream.last_seq)

    @rule(qi=st.integers(0, 2), r=st.integers(0, 2))
    def unsubscribe(self, qi: int, r: int) -> None:
        """Also after a close: what a closing socket is owed stays owed."""
        q, r = self._queue(qi), r % len(self.runs)
        with self._cues(q):
            q.queue.unsubscribe(self.runs[r].run_id)
            q.copies.pop(r, None)

    @precondition(lambda self: any(run.stream.ended and not run.dropped for run in self.runs))
    @rule(r=st.integers(0, 2))
    def drop_run(self, r: int) -> None:
        """A retention bound drops an ended run: each follower still sends what it owes.

        Replayed frames still owed count against the bounds from then on (nothing else
        holds them), so the drop may close a queue with 4008.
        """
        ended = [i for i, run in enumerate(self.runs) if run.stream.ended and not run.dropped]
        r = ended[r % len(ended)]
        run = self.runs[r]
        run.dropped = True
        for q in self.queues:
            with self._cues(q):
                ok = q.queue.drop_run(run.run_id)
                copy = q.copies.get(r)
                fits = True
                if copy is not None and copy.next > copy.announced:
                    del q.copies[r]
                elif copy is not None:
                    copy.live_from, copy.dropped = min(copy.live_from, copy.next), True
                    fits = self._fits(q)
                    if not fits:
                        self._overflow(q)
            assert ok == (fits and q.closed != CLOSE_OVERFLOW)

    @rule(r=st.integers(0, 2), data=st.data())
    def ack_and_trim(self, r: int, data: st.DataObject) -> None:
        """Trims up to what every follower was sent; frees frames no follower still needs.

        A closed queue follows nothing: what it still owes must not depend on the log.
        """
        r %= len(self.runs)
        if self.runs[r].dropped:  # not_found: nothing to ack any more
            return
        stream = self.runs[r].stream
        sent = [q.copies[r].next - 1 for q in self.queues if r in q.copies]
        stream.trim_through(data.draw(st.integers(0, min(sent, default=stream.last_seq))))
        floor = min([*sent, stream.trimmed_through])
        stream.release_through(data.draw(st.integers(0, floor)))

    # ------------------------------------------------------------- transport side
    @rule(qi=st.integers(0, 2), max_bytes=st.one_of(st.just(1), st.integers(1, 600), st.just(BIG)))
    def take(self, qi: int, max_bytes: int) -> None:
        self._check_take(self._queue(qi), max_bytes)

    @rule(qi=st.integers(0, 2))
    def drain(self, qi: int) -> None:
        q = self._queue(qi)
        for _ in range(1000):
            if not q.queue.has_frames():
                break
            self._check_take(q, BIG)
        assert not q.busy()
        for r, copy in q.copies.items():
            assert copy.next == self.runs[r].stream.last_seq + 1
            assert q.queue.sent_through(self.runs[r].run_id) == self.runs[r].stream.last_seq
        for copy in q.owed.values():
            assert copy.next == copy.announced + 1

    @rule(qi=st.integers(0, 2), pad=st.integers(0, 200))
    def push_control(self, qi: int, pad: int) -> None:
        q = self._queue(qi)
        self.pings += 1
        frame = control(self.pings, pad)
        with self._cues(q):
            ok = q.queue.push_control(frame)
            if q.closed is not None:
                expected = False
            else:
                q.control.append(frame)
                expected = self._fits(q)
                if not expected:
                    self._overflow(q)
        assert ok == expected

    @rule(qi=st.integers(0, 2), code=OTHER_CLOSES)
    def close(self, qi: int, code: int) -> None:
        """Ends every subscription; what was announced and not yet sent is still owed."""
        q = self._queue(qi)
        with self._cues(q):
            q.queue.close(code, "bye")
            if q.closed is None:
                q.closed = code
                q.owed, q.copies = q.copies, {}
                q.held = (q.queue.queued, q.queue.queued_bytes)
        assert q.queue.close_code == q.closed
        assert q.queue.run_ids() == []

    # ----------------------------------------------------------------- invariants
    @invariant()
    def counts_are_the_live_events_and_control_frames_waiting(self) -> None:
        for q in self.queues:
            held = (q.queue.queued, q.queue.queued_bytes)
            if q.closed is None:
                assert held == self._load(q)
            else:  # nothing enters a closed queue, and an empty one holds nothing
                assert held[0] <= q.held[0] and held[1] <= q.held[1]
            if not q.busy():
                assert held == (0, 0)
            q.held = held

    @invariant()
    def never_over_a_bound_unless_closed(self) -> None:
        for q in self.queues:
            if q.closed is None:
                assert q.queue.queued <= q.max_messages
                assert q.queue.queued_bytes <= q.max_bytes
            if q.closed == CLOSE_OVERFLOW:
                assert (q.queue.queued, q.queue.run_ids()) == (0, [])

    @invariant()
    def high_water_is_half_of_either_bound(self) -> None:
        for q in self.queues:
            if q.closed is None:
                count, size = self._load(q)
                assert q.queue.above_high_water() == (
                    count * 2 > q.max_messages or size * 2 > q.max_bytes)

    @invariant()
    def cursors_match(self) -> None:
        for q in self.queues:
            assert q.queue.close_code == q.closed
            assert q.queue.has_frames() == q.busy()
            assert sorted(q.queue.run_ids()) == sorted(self.runs[r].run_id for r in q.copies)
            for r, run in enumerate(self.runs):
                copy = q.copies.get(r)
                assert q.queue.next_seq(run.run_id) == (copy.next if copy else None)
                assert q.queue.sent_through(run.run_id) == (copy.next - 1 if copy else 0)


OutboundMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None
)
TestOutboundMachine = OutboundMachine.TestCase


# ============================================================================ resume
def test_resume_while_live_events_are_queued_sends_each_seq_once() -> None:
    stream = new_run(0)
    queue = subscribed_queue(stream)
    for _ in range(5):
        assert emit_live(stream, queue)
    assert seqs_of(queue.take(1)[0]) == [("run-0", 1)]
    assert seqs_of(queue.take(1)[0]) == [("run-0", 2)]
    assert queue.queued == 3

    stream.check_resume(1)
    queue.subscribe(stream.run_id, stream, 1)

    assert queue.queued == 0  # 2..5 are now replay, read from the log
    assert emit_live(stream, queue)
    assert [seq for _, seq in seqs_of(drain(queue))] == [2, 3, 4, 5, 6]
    assert queue.queued == queue.queued_bytes == 0
    assert queue.sent_through(stream.run_id) == 6


def test_resume_forward_skips_what_the_client_already_holds() -> None:
    stream = new_run(0)
    queue = subscribed_queue(stream)
    for _ in range(4):
        assert emit_live(stream, queue)
    queue.subscribe(stream.run_id, stream, 3)
    assert queue.queued == 0
    assert seqs_of(drain(queue)) == [("run-0", 4)]


def test_resume_at_the_last_seq_replays_nothing_then_sends_live_events() -> None:
    stream = new_run(0)
    for _ in range(3):
        emit_text(stream)
    queue = subscribed_queue(stream, after_seq=3)
    assert not queue.has_frames()
    assert queue.take(BIG) == ([], [])
    assert emit_live(stream, queue)
    assert seqs_of(drain(queue)) == [("run-0", 4)]


def test_a_replay_longer_than_max_messages_does_not_close() -> None:
    stream = new_run(0)
    for _ in range(50):
        emit_text(stream, "y" * 50)
    queue = subscribed_queue(stream, max_messages=2, max_bytes=300)
    assert queue.close_code is None
    assert queue.queued == queue.queued_bytes == 0
    assert not queue.above_high_water()
    assert [seq for _, seq in seqs_of(drain(queue))] == list(range(1, 51))
    assert queue.close_code is None


def test_live_events_behind_a_long_replay_count_against_the_bound() -> None:
    stream = new_run(0)
    for _ in range(20):
        emit_text(stream)
    queue = subscribed_queue(stream, max_messages=2)
    assert emit_live(stream, queue)
    assert emit_live(stream, queue)
    assert queue.queued == 2
    assert not emit_live(stream, queue)
    assert queue.close_code == CLOSE_OVERFLOW


# ============================================================================ bounds
def test_count_bound_closes_with_4008_one_past_max_messages() -> None:
    stream = new_run(0)
    queue = subscribed_queue(stream, max_messages=3)
    assert all(emit_live(stream, queue) for _ in range(3))
    assert queue.close_code is None
    assert not emit_live(stream, queue)
    assert queue.close_code == CLOSE_OVERFLOW


def test_byte_bound_closes_with_4008_while_the_count_is_fine() -> None:
    stream = new_run(0)
    for _ in range(3):
        emit_text(stream, "z" * 100)
    two_frames = len(stream.frame(1)) + len(stream.frame(2))
    fresh = new_run(0)
    queue = subscribed_queue(fresh, max_messages=1000, max_bytes=two_frames)
    assert emit_live(fresh, queue, "z" * 100)
    assert emit_live(fresh, queue, "z" * 100)
    assert queue.queued_bytes == two_frames
    assert not emit_live(fresh, queue, "z" * 100)
    assert queue.close_code == CLOSE_OVERFLOW
    assert queue.run_ids() == []


def test_a_control_frame_over_the_byte_bound_closes_with_4008() -> None:
    queue = OutboundQueue("u1", max_messages=1000, max_bytes=100)
    assert queue.push_control(control(1, pad=40))
    assert not queue.push_control(control(2, pad=40))
    assert queue.close_code == CLOSE_OVERFLOW


def test_after_a_4008_close_nothing_more_is_queued_or_sent() -> None:
    stream = new_run(0)
    cues: list[str] = []
    queue = OutboundQueue("u1", max_messages=2, max_bytes=BIG, on_ready=lambda: cues.append("x"))
    queue.subscribe(stream.run_id, stream, 0)
    assert queue.push_control(control(1))
    assert emit_live(stream, queue)
    assert not emit_live(stream, queue)
    assert queue.close_code == CLOSE_OVERFLOW
    assert cues  # the transport is woken to send the close frame
    assert queue.run_ids() == []
    assert not queue.has_frames()
    assert queue.take(BIG) == ([], [])
    assert not queue.push_control(control(2))
    assert not emit_live(stream, queue)
    queue.subscribe(stream.run_id, stream, 0)
    assert queue.take(BIG) == ([], [])
    assert queue.queued == queue.queued_bytes == 0


def test_a_graceful_close_sends_what_was_owed_and_nothing_new() -> None:
    """Another code (here 1011 after a missed pong) ends the subscriptions, not the debt."""
    stream = new_run(0)
    queue = subscribed_queue(stream, max_messages=2)
    for _ in range(2):
        assert emit_live(stream, queue)
    assert seqs_of(queue.take(1)[0]) == [("run-0", 1)]
    queue.close(1011, "keepalive ping timeout")
    assert queue.run_ids() == []
    for _ in range(5):  # not followed any more, so never over a bound
        assert emit_live(stream, queue)
    assert not queue.push_control(control(1))
    stream.trim_through(stream.last_seq)  # the registry forgot the connection: frees the log
    stream.release_through(stream.last_seq)
    assert seqs_of(drain(queue)) == [("run-0", 2)]
    assert queue.close_code == 1011


def test_a_replay_in_progress_is_still_owed_after_a_graceful_close() -> None:
    stream = new_run(0)
    for _ in range(10):
        emit_text(stream)
    queue = subscribed_queue(stream, max_messages=2)
    assert seqs_of(queue.take(1)[0]) == [("run-0", 1)]
    queue.close(1001, "server shutting down")
    stream.trim_through(stream.last_seq)
    stream.release_through(stream.last_seq)
    assert [seq for _, seq in seqs_of(drain(queue))] == list(range(2, 11))


def test_a_drained_queue_holds_nothing_after_a_graceful_close() -> None:
    stream = new_run(0)
    queue = subscribed_queue(stream, max_messages=1)
    assert emit_live(stream, queue)
    queue.close(1000)
    assert seqs_of(drain(queue)) == [("run-0", 1)]
    assert not queue.has_frames()
    assert (queue.queued, queue.queued_bytes) == (0, 0), "counts frames no longer waiting"
    assert not queue.above_high_water()


# =========================================================================== sending
def test_runs_take_turns_one_event_each() -> None:
    streams = [new_run(i) for i in range(3)]
    queue = OutboundQueue("u1", max_messages=1000, max_bytes=BIG)
    for stream in streams:
        queue.subscribe(stream.run_id, stream, 0)
    for stream, count in zip(streams, (4, 2, 3), strict=True):
        for _ in range(count):
            assert emit_live(stream, queue)
    got = seqs_of(drain(queue))
    rounds = [got[0:3], got[3:6], got[6:8], got[8:9]]
    assert [sorted(r) for r in rounds] == [
        [("run-0", 1), ("run-1", 1), ("run-2", 1)],
        [("run-0", 2), ("run-1", 2), ("run-2", 2)],
        [("run-0", 3), ("run-2", 3)],
        [("run-0", 4)],
    ]


def test_a_busy_run_does_not_hold_back_a_new_one() -> None:
    busy, quiet = new_run(0), new_run(1)
    queue = OutboundQueue("u1", max_messages=1000, max_bytes=BIG)
    queue.subscribe(busy.run_id, busy, 0)
    for _ in range(10):
        assert emit_live(busy, queue)
    assert seqs_of(queue.take(1)[0]) == [("run-0", 1)]
    queue.subscribe(quiet.run_id, quiet, 0)
    assert emit_live(quiet, queue)
    got = seqs_of(drain(queue))
    assert got.index(("run-1", 1)) <= 1


def test_take_with_max_bytes_1_returns_exactly_one_frame() -> None:
    stream = new_run(0)
    queue = subscribed_queue(stream)
    for _ in range(3):
        assert emit_live(stream, queue)
    assert queue.push_control(control(1))
    assert queue.push_control(control(2))
    taken = [queue.take(1)[0] for _ in range(5)]
    assert [len(frames) for frames in taken] == [1] * 5
    assert [f[0] for f in taken[:2]] == [control(1), control(2)]
    assert [seqs_of(f) for f in taken[2:]] == [[("run-0", 1)], [("run-0", 2)], [("run-0", 3)]]
    assert queue.take(1) == ([], [])


def test_control_frames_go_before_events_already_queued() -> None:
    stream = new_run(0)
    queue = subscribed_queue(stream)
    for _ in range(3):
        assert emit_live(stream, queue)
    assert seqs_of(queue.take(1)[0]) == [("run-0", 1)]
    assert queue.push_control(control(7))
    frames, _ = queue.take(BIG)
    assert frames[0] == control(7)
    assert seqs_of(frames[1:]) == [("run-0", 2), ("run-0", 3)]


def test_take_stops_once_max_bytes_is_reached() -> None:
    stream = new_run(0)
    queue = subscribed_queue(stream)
    for _ in range(3):
        assert emit_live(stream, queue)
    first = stream.frame(1)
    frames, _ = queue.take(len(first))
    assert frames == [first]
    frames, _ = queue.take(len(stream.frame(2)) + 1)
    assert seqs_of(frames) == [("run-0", 2), ("run-0", 3)]


def test_take_returns_the_ts_of_each_event_frame_only() -> None:
    stream = new_run(0)
    queue = subscribed_queue(stream)
    assert queue.push_control(control(1))
    for ts in (10.5, 11.25, 12.0):
        assert emit_live(stream, queue, ts=ts)
    assert queue.push_control(control(2))
    frames, stamps = queue.take(BIG)
    assert frames[:2] == [control(1), control(2)]
    assert stamps == [10.5, 11.25, 12.0]
    assert [decode(f)["ts"] for f in frames[2:]] == stamps


def test_on_ready_cues_a_write_when_something_arrives_and_on_close() -> None:
    stream = new_run(0)
    cues: list[int] = []
    queue = OutboundQueue("u1", max_messages=10, max_bytes=BIG,
                          on_ready=lambda: cues.append(len(cues)))
    queue.subscribe(stream.run_id, stream, 0)
    assert cues == []
    assert emit_live(stream, queue)
    assert len(cues) == 1
    assert emit_live(stream, queue)
    assert queue.push_control(control(1))
    assert len(cues) == 1  # still had something to send: no new cue
    drain(queue)
    assert queue.push_control(control(2))
    assert len(cues) == 2
    queue.close(1000)
    assert len(cues) == 3


def test_unsubscribe_drops_the_runs_waiting_events() -> None:
    stream = new_run(0)
    queue = subscribed_queue(stream)
    for _ in range(3):
        assert emit_live(stream, queue)
    queue.unsubscribe(stream.run_id)
    assert (queue.queued, queue.queued_bytes) == (0, 0)
    assert queue.take(BIG) == ([], [])
    assert queue.run_ids() == []
    assert queue.on_append(stream.run_id, stream.last_seq)  # not followed: nothing to count
