"""The delivery stream of one run, sans-IO: numbering, guarantees, retention, acks and replay.

A :class:`RunStream` is a pure state machine. It reads no clock (the caller passes ``ts``),
owns no task and touches no socket, so any transport can drive it and the tests can explore
it exhaustively. It enforces PROTOCOL.md's per-run guarantees by construction:

* ``seq`` starts at 1 and rises by exactly 1;
* ``agent_started`` is seq 1 (it is synthesised when the first event is something else);
* every ``tool_executing`` is closed by exactly one ``tool_completed`` with its ``call_id``;
  :meth:`RunStream.finish` closes the tools still open, with status ``cancelled`` when the run
  was cancelled or timed out and ``error`` otherwise;
* exactly one ``agent_completed``, always last; nothing can be emitted after it.

It also keeps the newest events for replay (at most ``max_retained`` of them, and none that
every reader has acknowledged) and answers whether a replay after a given seq is still possible.

Each event is encoded to its wire bytes once, when it is recorded; the log holds those bytes
and the events' times in flat arrays, so retention creates no objects for the cyclic garbage
collector to walk. Two trim points are kept: :attr:`RunStream.trimmed_through` is what a
``resume`` may still ask for; below it, frames are kept only until :meth:`RunStream.release_through`
says no subscribed reader still needs them (a reader part-way through its copy of the stream).
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from typing import Any, final

from registry._errors import ResumeUnavailable, quote
from registry._events import Event, encode_event, envelope_prefix
from registry._payloads import validate_payload
from registry._vocabulary import EventType, RunStatus, ToolStatus

__all__ = ["ResumeUnavailable", "RunStream", "SeqOutOfRange", "StreamError"]


class StreamError(Exception):
    """The local side broke a stream rule (emitted after the end, closed an unknown tool, ...).

    This is a bug in the agent or its caller, never something a remote client can cause.
    """


class SeqOutOfRange(ValueError):
    """A client named a seq beyond the last event of the run (``ack`` or ``resume``)."""


_COMPACT_AT = 1024


@final
class HeldBytes:
    """A running total of frame bytes held, shared by the streams of one registry."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


@final
class RunStream:
    """The event log of one run; see the module docstring for the rules it enforces.

    Args:
        run_id: The run's id, copied into every event.
        thread_id: The run's thread, copied into every event.
        agent: The agent name for a synthesised ``agent_started``.
        max_retained: How many of the newest events to keep for replay (>= 1).
        total: Where the bytes of every stream of a registry are added up (for
            ``max_retained_mib``); a stream of its own when omitted.
    """

    __slots__ = (
        "_base", "_frames", "_head", "_open_tools", "_prefix", "_seen_call_ids", "_total", "_ts",
        "acked_seq", "agent", "held_bytes", "last_seq", "max_retained", "run_id", "status",
        "thread_id", "trimmed_through",
    )

    def __init__(
        self, run_id: str, thread_id: str, agent: str, max_retained: int,
        total: HeldBytes | None = None,
    ) -> None:
        if max_retained < 1:
            raise ValueError("max_retained must be >= 1")
        self.run_id = run_id
        self.thread_id = thread_id
        self.agent = agent
        self.max_retained = max_retained
        self.last_seq = 0
        self.acked_seq = 0
        self.trimmed_through = 0
        self.status: RunStatus | None = None
        #: Bytes of the frames held (retained or still being read by a subscriber).
        self.held_bytes = 0
        self._total = total if total is not None else HeldBytes()
        self._prefix = envelope_prefix(run_id, thread_id)
        self._frames: list[bytes] = []
        self._ts = array("d")
        self._head = 0  # index in _frames of the first held frame
        self._base = 0  # seq of the last frame released (held frames start at _base + 1)
        self._open_tools: dict[str, str] = {}
        self._seen_call_ids: set[str] = set()

    # ----------------------------------------------------------------- state
    @property
    def started(self) -> bool:
        return self.last_seq > 0

    @property
    def ended(self) -> bool:
        return self.status is not None

    @property
    def open_tools(self) -> Mapping[str, str]:
        """Tool calls not yet completed: ``call_id`` to tool name, in the order they opened."""
        return dict(self._open_tools)

    @property
    def retained_count(self) -> int:
        """How many events a ``resume`` can still get (the newest ones)."""
        return self.last_seq - self.trimmed_through

    # ------------------------------------------------------------- emitting
    def emit(self, event_type: EventType, payload: Mapping[str, Any], ts: float, *,
             checked: bool = False) -> list[Event]:
        """Numbers and records one event, plus whatever the guarantees require before it.

        ``checked``: the payload was built from its typed class for this event type (which
        validates itself), so it is not validated again.

        Returns:
            The events now appended, in order: usually one; a synthesised ``agent_started``
            first when the run had not started; for ``agent_completed`` the closing events of
            open tools first (see :meth:`finish`).

        Raises:
            StreamError: the run has ended, ``agent_started`` came twice, or a tool call id
                was reused or closed without being open.
            PayloadError: the payload does not fit the event type.
        """
        event_type = EventType(event_type)
        if not checked:
            validate_payload(event_type, payload)
        if event_type is EventType.AGENT_COMPLETED:
            return self.finish(payload, ts)
        self._check_open()
        if event_type is EventType.AGENT_STARTED:
            if self.started:
                raise StreamError(f"run {self.run_id}: agent_started was already sent")
            return [self._append(event_type, payload, ts)]
        self._check_tool(event_type, payload)
        out = self._start_if_needed(ts)
        self._track_tool(event_type, payload)
        out.append(self._append(event_type, payload, ts))
        return out

    def finish(self, payload: Mapping[str, Any], ts: float) -> list[Event]:
        """Ends the run with the ``agent_completed`` payload given (``status`` plus result/error).

        Tools still open are completed first, with status ``cancelled`` when the run was
        cancelled or timed out, else ``error``.

        Raises:
            StreamError: the run has already ended.
            PayloadError: the payload is not a valid ``agent_completed`` payload.
        """
        validate_payload(EventType.AGENT_COMPLETED, payload)
        self._check_open()
        status = RunStatus(payload["status"])
        out = self._start_if_needed(ts)
        out.extend(self._close_open_tools(status, ts))
        out.append(self._append(EventType.AGENT_COMPLETED, payload, ts))
        self.status = status
        return out

    def _check_open(self) -> None:
        if self.ended:
            raise StreamError(f"run {self.run_id} has already ended ({self.status})")

    def _start_if_needed(self, ts: float) -> list[Event]:
        if self.started:
            return []
        return [self._append(EventType.AGENT_STARTED, {"agent": self.agent}, ts)]

    def _check_tool(self, event_type: EventType, payload: Mapping[str, Any]) -> None:
        """Raises before anything is recorded, so a refused event leaves no trace."""
        call_id: str = payload.get("call_id", "")
        if event_type is EventType.TOOL_EXECUTING and call_id in self._seen_call_ids:
            raise StreamError(f"run {self.run_id}: tool call id {call_id!r} reused")
        if event_type is EventType.TOOL_COMPLETED and (
            self._open_tools.get(call_id) != payload["tool"]
        ):
            raise StreamError(f"run {self.run_id}: tool call {call_id!r} is not open")

    def _track_tool(self, event_type: EventType, payload: Mapping[str, Any]) -> None:
        if event_type is EventType.TOOL_EXECUTING:
            self._seen_call_ids.add(payload["call_id"])
            self._open_tools[payload["call_id"]] = payload["tool"]
        elif event_type is EventType.TOOL_COMPLETED:
            del self._open_tools[payload["call_id"]]

    def _close_open_tools(self, status: RunStatus, ts: float) -> list[Event]:
        abandoned = status in (RunStatus.CANCELLED, RunStatus.TIMED_OUT)
        tool_status = ToolStatus.CANCELLED if abandoned else ToolStatus.ERROR
        out = []
        for call_id, tool in self._open_tools.items():
            payload = {"tool": tool, "call_id": call_id, "status": str(tool_status),
                       "error": f"run ended ({status}) before the tool completed"}
            out.append(self._append(EventType.TOOL_COMPLETED, payload, ts))
        self._open_tools.clear()
        return out

    def _append(self, event_type: EventType, payload: Mapping[str, Any], ts: float) -> Event:
        frame = encode_event(self._prefix, event_type, self.last_seq + 1, ts, payload)
        self._hold(frame, ts)  # only once the frame exists: a failed encoding leaves no gap
        return Event(event_type, self.run_id, self.thread_id, self.last_seq, ts, payload)

    def _hold(self, frame: bytes, ts: float) -> None:
        """Keeps ``frame`` as event ``last_seq + 1``; the oldest beyond ``max_retained`` go."""
        self._frames.append(frame)
        self._ts.append(ts)
        self.held_bytes += len(frame)
        self._total.bytes += len(frame)
        self.last_seq += 1
        if self.retained_count > self.max_retained:
            self.trim_through(self.last_seq - self.max_retained)

    # ------------------------------------------------------------ mirroring
    def start_after(self, seq: int) -> None:
        """Starts an empty mirror at ``seq``: what came before is not retained anywhere."""
        if self.last_seq or self._frames:
            raise StreamError(f"run {self.run_id}: only an empty stream can start later")
        self.last_seq = self.trimmed_through = self._base = seq

    def extend(self, entries: Sequence[tuple[int, bytes]]) -> list[Event]:
        """Appends events another node recorded (a mirror of its run), skipping known ones.

        ``entries`` are (seq, wire bytes) in order; the first new one must be
        ``last_seq + 1``. The stream's rules were checked where the run runs; here an
        ``agent_completed`` only marks the mirror ended.

        Returns:
            The events now appended.

        Raises:
            StreamError: a seq is missing between ``last_seq`` and the entries.
        """
        out = []
        for seq, frame in entries:
            if seq <= self.last_seq:
                continue
            if seq != self.last_seq + 1:
                raise StreamError(f"run {self.run_id}: got seq {seq} after {self.last_seq}")
            event = Event.from_json(frame)
            self._hold(frame, event.ts)
            if event.type is EventType.AGENT_COMPLETED:
                self.status = RunStatus(event.payload["status"])
            out.append(event)
        return out

    # ------------------------------------------------------- acks and replay
    def ack(self, seq: int) -> None:
        """Records that a client holds every event up to ``seq`` (cumulative, never lowers).

        Trimming is the caller's decision (:meth:`trim_through`), since other readers of the
        run may still need those events.

        Raises:
            SeqOutOfRange: ``seq`` is beyond the last event.
        """
        self._check_seq(seq)
        self.acked_seq = max(self.acked_seq, seq)

    def trim_through(self, seq: int) -> int:
        """Makes events with seq <= ``seq`` unavailable to resume; returns how many that was.

        Their frames stay held for readers part-way through them until :meth:`release_through`.
        """
        seq = min(seq, self.last_seq)
        if seq <= self.trimmed_through:
            return 0
        dropped = seq - self.trimmed_through
        self.trimmed_through = seq
        return dropped

    def release_through(self, seq: int) -> None:
        """Frees the frames of trimmed events with seq <= ``seq`` (no reader needs them)."""
        seq = min(seq, self.trimmed_through)
        if seq <= self._base:
            return
        stop = self._head + (seq - self._base)
        freed = sum(map(len, self._frames[self._head:stop]))
        self._frames[self._head:stop] = [b""] * (stop - self._head)  # freed now, not at compaction
        self.held_bytes -= freed
        self._total.bytes -= freed
        self._head = stop
        self._base = seq
        if self._head >= _COMPACT_AT and self._head * 2 >= len(self._frames):
            del self._frames[: self._head]
            del self._ts[: self._head]
            self._head = 0

    def frame(self, seq: int) -> bytes:
        """The wire bytes of event ``seq``, which must be held (not yet released)."""
        return self._frames[self._head + (seq - self._base - 1)]

    def ts(self, seq: int) -> float:
        """When event ``seq`` (held) was emitted, in server Unix time."""
        return self._ts[self._head + (seq - self._base - 1)]

    def held_from(self) -> int:
        """The lowest seq whose frame is still held."""
        return self._base + 1

    def check_resume(self, after_seq: int) -> None:
        """Raises unless every event with seq > ``after_seq`` is still retained.

        Raises:
            SeqOutOfRange: ``after_seq`` is beyond the last event.
            ResumeUnavailable: some event after ``after_seq`` was trimmed.
        """
        self._check_seq(after_seq)
        if after_seq < self.trimmed_through:
            raise ResumeUnavailable(
                f"run {self.run_id}: events {after_seq + 1}..{self.trimmed_through} are gone"
            )

    def events_after(self, after_seq: int) -> Sequence[Event]:
        """The retained events with seq > ``after_seq``, in order (exactly the missing ones).

        Raises:
            SeqOutOfRange, ResumeUnavailable: as :meth:`check_resume`.
        """
        self.check_resume(after_seq)
        return [self._decode(seq) for seq in range(after_seq + 1, self.last_seq + 1)]

    def get(self, seq: int) -> Event | None:
        """The event numbered ``seq``, or None when it was trimmed or does not exist yet."""
        if seq <= self.trimmed_through or seq > self.last_seq:
            return None
        return self._decode(seq)

    def _decode(self, seq: int) -> Event:
        return Event.from_json(self.frame(seq))

    def _check_seq(self, seq: int) -> None:
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise SeqOutOfRange(f"seq must be a whole number >= 0, got {quote(seq)}")
        if seq > self.last_seq:
            raise SeqOutOfRange(f"seq {quote(seq)} is beyond the last event ({self.last_seq})")
