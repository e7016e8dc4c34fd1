"""Sans-IO checker of the per-run delivery guarantees of PROTOCOL.md.

Feed it the frames a client receives, one by one, and tell it what the client sent
(``start_agent``, ``resume``, a socket change); :meth:`RunChecker.finish` and
:meth:`ClientChecker.finish` then return every violation. There is no clock, no socket and no
task in here: the gevent Locust users, the trio benchmark load generator and the hypothesis tests
all drive the same code.

A test that holds a run's whole event list (plain dicts, the wire form) asks
:func:`run_violations` for what is wrong with it, or :func:`check_run` to raise
:class:`GuaranteeViolated` listing it; both also check every envelope and payload field.

Violation kinds (one :class:`Violation` per affected event):

========================  ===================================================================
``lost``                  a seq in 1..last never arrived (last = the highest seq seen, or the
                          script length when the run's script is known, e.g. 3+2T+K)
``duplicate``             a seq arrived again without a ``resume`` asking for it again
``reordered``             a seq arrived after a higher one; ``agent_started`` not seq 1; an event
                          after ``agent_completed``; an event type differing from the known script
``foreign``               an event of a run this client never started nor resumed, or of a
                          different ``thread_id`` than the run was accepted with
``unterminated``          the run ended (``finish``) without ``agent_completed``
``unpaired_tool``         ``tool_completed`` without an open ``tool_executing`` of its
                          ``call_id`` (or naming another tool than it), a reused ``call_id``, or
                          a tool still open at ``agent_completed`` (not reported for a run that
                          also lost events, where the missing half may be among the lost)
``malformed``             an event frame without a valid envelope (run_id, seq, ts, payload);
                          for :func:`run_violations` also a thread_id that is not a string, a
                          ts that is not a float, or a payload without the fields of its type
========================  ===================================================================

A run the server declined to resume (``delivery_mode`` direct answers ``resume`` with
``resume_unavailable``: the legacy path keeps nothing) is *cut* (:meth:`RunChecker.cut`): the
events after the last one held are lost by design, counted in
:attr:`RunChecker.lost_by_design` rather than reported as ``lost``, and the missing
``agent_completed`` is not ``unterminated``. A gap before the cut is still ``lost``.

Ordering rules (agent_started first, tool pairing, terminal last) are applied in seq order, once
the events before are there, so one missing or late event is reported once, not as a cascade.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, final

import attrs

from loadtests.wire import EVENT_TYPES

MAX_GAP: Final = 1_000_000
"""A seq jumping further ahead than this is treated as malformed rather than a huge gap."""

PAYLOAD_FIELDS: Final[Mapping[str, Mapping[str, type]]] = {
    "agent_started": {"agent": str},
    "agent_thinking": {"thought": str},
    "tool_executing": {"tool": str, "call_id": str, "args": dict},
    "tool_completed": {"tool": str, "call_id": str, "status": str},
    "partial_result": {"text": str},
    "agent_completed": {"status": str},
}
"""The fields each run event's payload must carry, and their JSON types (PROTOCOL.md, 4)."""

STATUSES: Final[Mapping[str, tuple[frozenset[str], str]]] = {
    "tool_completed": (frozenset({"ok", "error", "cancelled"}), "ok"),
    "agent_completed": (frozenset({"succeeded", "failed", "cancelled", "timed_out"}), "succeeded"),
}
"""For the completions: the statuses allowed, and the one that carries ``result`` (the others
carry ``error``)."""


class Kind(enum.StrEnum):
    """The kind of a guarantee violation; the value is the name reported to Locust."""

    LOST = "lost"
    DUPLICATE = "duplicate"
    REORDERED = "reordered"
    FOREIGN = "foreign"
    UNTERMINATED = "unterminated"
    UNPAIRED_TOOL = "unpaired_tool"
    MALFORMED = "malformed"


@attrs.frozen
class Violation:
    """One broken guarantee.

    Attributes:
        kind: What was broken.
        run_id: The run it is about ("" when the frame had no usable run_id).
        seq: The event's seq when it is about one event, else None.
        detail: A short human-readable explanation.
    """

    kind: Kind
    run_id: str
    seq: int | None
    detail: str


def _valid_envelope(frame: Mapping[str, Any]) -> bool:
    """Return True when ``frame`` has the event envelope of PROTOCOL.md."""
    seq = frame.get("seq")
    ts = frame.get("ts")
    return (
        isinstance(frame.get("run_id"), str)
        and isinstance(seq, int)
        and not isinstance(seq, bool)
        and seq >= 1
        and isinstance(ts, int | float)
        and isinstance(frame.get("payload"), dict)
    )


@final
@attrs.define(eq=False)
class RunChecker:
    """Checks the events of one run, as received by one client (across its sockets).

    Attributes:
        run_id: The run checked.
        thread_id: The run's thread_id from ``run_accepted``; None skips the check.
        script: The exact event types in seq order when known (``scripted`` agent), else None.
    """

    run_id: str
    thread_id: str | None = None
    script: tuple[str, ...] | None = None
    _cursor: int = 1
    _arrived: dict[int, str] = attrs.field(factory=dict)
    _buffer: dict[int, Mapping[str, Any]] = attrs.field(factory=dict)
    _next_rule: int = 1
    _open_tools: dict[str, tuple[int, object]] = attrs.field(factory=dict)
    _seen_calls: set[str] = attrs.field(factory=set)
    _completed_at: int | None = None
    _violations: list[Violation] = attrs.field(factory=list)
    _finished: bool = False
    _lossy: bool = False
    _cut_after: int | None = None

    @property
    def last_seq(self) -> int:
        """The highest seq held: the ``after_seq`` for a ``resume`` after a reconnect."""
        return max(self._arrived, default=0)

    @property
    def delivered(self) -> int:
        """How many distinct events arrived."""
        return len(self._arrived)

    @property
    def expected(self) -> int | None:
        """The exact number of events the run must deliver, when the script is known."""
        return None if self.script is None else len(self.script)

    @property
    def terminal_seen(self) -> bool:
        """True once an ``agent_completed`` arrived (in any order)."""
        return "agent_completed" in self._arrived.values()

    @property
    def violations(self) -> tuple[Violation, ...]:
        """Every violation found so far."""
        return tuple(self._violations)

    @property
    def cut_after(self) -> int | None:
        """The last seq held when the run was cut (:meth:`cut`), else None."""
        return self._cut_after

    @property
    def lost_by_design(self) -> int:
        """Events of a cut run that never came after the cut (0 for a run not cut).

        Exact when the run's length is known (a script, or its ``agent_completed`` arrived);
        otherwise the events missing up to the highest seq seen plus one for the terminal
        event, a lower bound (:attr:`length_known` is False).
        """
        if self._cut_after is None:
            return 0
        last = max(self.last_seq, self.expected or 0)
        missing = sum(1 for seq in range(self._cut_after + 1, last + 1) if seq not in self._arrived)
        return missing + (0 if self.length_known else 1)

    @property
    def length_known(self) -> bool:
        """True when the run's number of events is known: a script, or its terminal arrived."""
        return self.script is not None or self.terminal_seen

    def cut(self) -> None:
        """Record that the server declined to resume the run (``delivery_mode`` direct): the
        events after the last seq held are lost by design, not violations. Idempotent."""
        if self._cut_after is None:
            self._cut_after = self.last_seq

    def resume(self, after_seq: int) -> None:
        """Record that the client sent ``resume`` with ``after_seq``: seq after_seq+1 comes next.

        Events in (after_seq, last_seq] were asked again, so they may arrive once more.
        """
        self._cursor = after_seq + 1

    def feed(self, frame: Mapping[str, Any]) -> list[Violation]:
        """Check one received event frame of this run and return the new violations."""
        before = len(self._violations)
        if not _valid_envelope(frame) or frame.get("type") not in EVENT_TYPES:
            self._add(Kind.MALFORMED, frame.get("seq"), f"bad envelope: {dict(frame)!r:.200}")
        elif self.thread_id is not None and frame.get("thread_id") != self.thread_id:
            self._add(Kind.FOREIGN, frame["seq"], f"thread_id {frame.get('thread_id')!r}")
        else:
            self._arrive(frame["seq"], frame)
        return self._violations[before:]

    def finish(self) -> list[Violation]:
        """Close the run: report what never arrived; returns the violations this found.

        Idempotent: a second call finds nothing new. :attr:`violations` has them all.
        """
        before = len(self._violations)
        if not self._finished:
            self._finished = True
            self._close_gaps()
            if self._completed_at is None and self._cut_after is None:
                self._add(Kind.UNTERMINATED, None, "no agent_completed")
        return self._violations[before:]

    @property
    def contiguous_seq(self) -> int:
        """The highest seq such that every event up to it arrived: what an ``ack`` may claim."""
        return self._next_rule - 1

    def _arrive(self, seq: int, frame: Mapping[str, Any]) -> None:
        """Place one well-formed event in the stream."""
        etype = str(frame["type"])
        if seq in self._arrived:
            self._again(seq, etype)
        elif seq - self._cursor > MAX_GAP:
            self._add(Kind.MALFORMED, seq, f"seq jumps from {self._cursor - 1}")
        else:
            if seq < self._cursor:
                self._add(Kind.REORDERED, seq, f"arrived after seq {self.last_seq}")
            self._arrived[seq] = etype
            self._cursor = max(self._cursor, seq + 1)
            self._buffer[seq] = frame
            self._drain()

    def _again(self, seq: int, etype: str) -> None:
        """Handle a seq already held: a replay asked by ``resume``, else a duplicate."""
        if seq != self._cursor:
            self._add(Kind.DUPLICATE, seq, f"{etype} seq {seq} received again")
            return
        self._cursor += 1
        if self._arrived[seq] != etype:
            self._add(Kind.REORDERED, seq, f"replay has {etype}, first had {self._arrived[seq]}")

    def _drain(self) -> None:
        """Apply the ordering rules to the contiguous prefix of events now available."""
        while self._next_rule in self._buffer:
            self._apply_rules(self._next_rule, self._buffer.pop(self._next_rule))
            self._next_rule += 1

    def _close_gaps(self) -> None:
        """Report every missing seq as lost (in a cut run: up to the cut), then apply the rules
        to what was held back."""
        last = max(self.last_seq, self.expected or 0)
        if self._cut_after is not None:
            last = self._cut_after
        for seq in range(1, last + 1):
            if seq not in self._arrived:
                self._lossy = True
                self._add(Kind.LOST, seq, "never delivered")
        for seq in sorted(self._buffer):
            self._apply_rules(seq, self._buffer.pop(seq))

    def _apply_rules(self, seq: int, frame: Mapping[str, Any]) -> None:
        """Apply the order, script and tool-pairing rules to one event, in seq order."""
        etype = str(frame["type"])
        self._check_order(seq, etype)
        payload = frame["payload"]
        if etype == "tool_executing":
            self._open_tool(seq, payload.get("call_id"), payload.get("tool"))
        elif etype == "tool_completed":
            self._close_tool(seq, payload.get("call_id"), payload.get("tool"))
        elif etype == "agent_completed" and self._completed_at is None:
            self._complete(seq)

    def _check_order(self, seq: int, etype: str) -> None:
        """Report at most one ordering violation for the event at ``seq``."""
        if self._completed_at is not None and seq > self._completed_at:
            self._add(Kind.REORDERED, seq, f"{etype} after agent_completed")
        elif (seq == 1) != (etype == "agent_started"):
            self._add(Kind.REORDERED, seq, f"{etype} at seq {seq}")
        elif self.script is not None and seq <= len(self.script) and self.script[seq - 1] != etype:
            self._add(Kind.REORDERED, seq, f"{etype} where the script has {self.script[seq - 1]}")
        elif self.script is not None and seq > len(self.script):
            self._add(Kind.REORDERED, seq, f"{etype} beyond the script's {len(self.script)}")

    def _open_tool(self, seq: int, call_id: object, tool: object) -> None:
        """Record a ``tool_executing``."""
        key = str(call_id)
        if key in self._seen_calls:
            self._add(Kind.UNPAIRED_TOOL, seq, f"call_id {key} reused")
            return
        self._seen_calls.add(key)
        self._open_tools[key] = (seq, tool)

    def _close_tool(self, seq: int, call_id: object, tool: object) -> None:
        """Record a ``tool_completed``."""
        key = str(call_id)
        opened = self._open_tools.pop(key, None)
        if opened is None:
            if not self._lossy:
                self._add(Kind.UNPAIRED_TOOL, seq, f"tool_completed for call_id {key} not open")
        elif opened[1] != tool:
            self._add(Kind.UNPAIRED_TOOL, seq, f"call_id {key} of {opened[1]!r} closed as {tool!r}")

    def _complete(self, seq: int) -> None:
        """Record the terminal event; any tool still open is unpaired."""
        self._completed_at = seq
        for key, (opened, _) in self._open_tools.items() if not self._lossy else ():
            self._add(Kind.UNPAIRED_TOOL, opened, f"call_id {key} open at agent_completed")
        self._open_tools.clear()

    def _add(self, kind: Kind, seq: object, detail: str) -> None:
        """Record one violation."""
        at = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        self._violations.append(Violation(kind, self.run_id, at, detail))


@attrs.frozen
class _Pending:
    """A ``start_agent`` sent and not yet answered."""

    script: tuple[str, ...] | None


@final
@attrs.define(eq=False)
class ClientChecker:
    """Checks everything one client (one user, one socket at a time) receives.

    It knows which runs the current socket is subscribed to, so an event of any other run is
    ``foreign``. Events of an unknown run that arrive while a ``start_agent`` is unanswered are
    held until its ``run_accepted`` says whose they are.
    """

    runs: dict[str, RunChecker] = attrs.field(factory=dict)
    _pending: dict[str, _Pending] = attrs.field(factory=dict)
    _subscribed: set[str] = attrs.field(factory=set)
    _orphans: list[Mapping[str, Any]] = attrs.field(factory=list)
    _violations: list[Violation] = attrs.field(factory=list)

    def start_sent(self, request_id: str, script: tuple[str, ...] | None = None) -> None:
        """Record a ``start_agent`` sent on the current socket (``script`` if known)."""
        self._pending[request_id] = _Pending(script)

    def resume_sent(self, run_id: str, after_seq: int) -> None:
        """Record a ``resume`` sent on the current socket; the run must be known."""
        self._subscribed.add(run_id)
        self.runs[run_id].resume(after_seq)

    def socket_replaced(self) -> list[Violation]:
        """Record that the socket closed and a new one replaces it: nothing is subscribed.

        Returns the violations of events held as orphans on the old socket (foreign).
        """
        self._subscribed.clear()
        self._pending.clear()
        return self._flush_orphans()

    def on_frame(self, frame: Mapping[str, Any]) -> list[Violation]:
        """Check one received frame of any type and return the violations it revealed."""
        ftype = frame.get("type")
        if ftype == "run_accepted":
            return self._accepted(frame)
        if ftype == "error" and frame.get("request_id") in self._pending:
            del self._pending[frame["request_id"]]
            return [] if self._pending else self._flush_orphans()
        if ftype not in EVENT_TYPES:
            return []
        return self._event(frame)

    def finish_run(self, run_id: str) -> list[Violation]:
        """Finish one run (see :meth:`RunChecker.finish`) and return what that found."""
        return self.runs[run_id].finish()

    def finish(self) -> list[Violation]:
        """Finish every run; returns the violations this found (held orphans included)."""
        found = self._flush_orphans()
        for run in self.runs.values():
            found.extend(run.finish())
        return found

    @property
    def violations(self) -> list[Violation]:
        """Every violation found so far, the client's own and every run's."""
        found = list(self._violations)
        for run in self.runs.values():
            found.extend(run.violations)
        return found

    def _event(self, frame: Mapping[str, Any]) -> list[Violation]:
        """Route an event to its run, hold it, or report it foreign."""
        run_id = frame.get("run_id")
        if isinstance(run_id, str) and run_id in self._subscribed:
            return self.runs[run_id].feed(frame)
        if self._pending:
            self._orphans.append(frame)
            return []
        return self._foreign(frame)

    def _accepted(self, frame: Mapping[str, Any]) -> list[Violation]:
        """Bind a ``run_accepted`` to its pending request and release held events."""
        pending = self._pending.pop(str(frame.get("request_id")), None)
        run_id = str(frame.get("run_id"))
        if pending is None:
            return []
        thread_id = frame.get("thread_id")
        run = RunChecker(run_id, thread_id if isinstance(thread_id, str) else None, pending.script)
        self.runs[run_id] = run
        self._subscribed.add(run_id)
        found: list[Violation] = []
        if frame.get("duplicate") is True:
            found.append(Violation(Kind.DUPLICATE, run_id, None, "new request_id got duplicate"))
            self._violations.extend(found)
        held, self._orphans = self._orphans, []
        for orphan in held:
            found.extend(self._event(orphan))
        return found

    def _flush_orphans(self) -> list[Violation]:
        """Report every held event of an unknown run as foreign."""
        held, self._orphans = self._orphans, []
        found: list[Violation] = []
        for orphan in held:
            found.extend(self._foreign(orphan))
        return found

    def _foreign(self, frame: Mapping[str, Any]) -> list[Violation]:
        """Record and return a foreign event."""
        seq = frame.get("seq")
        at = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        found = Violation(Kind.FOREIGN, str(frame.get("run_id")), at, "not started nor resumed")
        self._violations.append(found)
        return [found]


# ====================================================================== whole runs
class GuaranteeViolated(AssertionError):
    """A run's events break PROTOCOL.md's guarantees; the message lists every violation.

    An ``AssertionError``, so a test that calls :func:`check_run` fails with the list.

    Attributes:
        violations: What was found, in the order the events were checked.
    """

    def __init__(self, violations: Iterable[Violation]) -> None:
        self.violations = tuple(violations)
        lines = [f"{v.kind} (seq {v.seq}): {v.detail}" for v in self.violations]
        super().__init__(f"{len(lines)} guarantee violation(s):\n" + "\n".join(lines))


def payload_problem(etype: str, payload: Mapping[str, Any]) -> str | None:
    """Why ``payload`` is not what PROTOCOL.md gives a ``etype`` event (None when it is)."""
    for name, kind in PAYLOAD_FIELDS[etype].items():
        if not isinstance(payload.get(name), kind):
            return f"{etype} payload needs {name!r} of type {kind.__name__}"
    if etype not in STATUSES:
        return None
    allowed, ok = STATUSES[etype]
    status = payload["status"]
    if status not in allowed:
        return f"{etype} status {status!r} is not one of {sorted(allowed)}"
    needed = "result" if status == ok else "error"
    return None if needed in payload else f"{etype} with status {status!r} needs {needed!r}"


def _field_problem(frame: Mapping[str, Any]) -> str | None:
    """What is wrong with the fields of a frame whose envelope :class:`RunChecker` accepted."""
    if not isinstance(frame.get("thread_id"), str):
        return f"thread_id {frame.get('thread_id')!r} is not a string"
    if not isinstance(frame["ts"], float):
        return f"ts {frame['ts']!r} is not a float"
    return payload_problem(str(frame["type"]), frame["payload"])


def run_violations(
    events: Sequence[Mapping[str, Any]], *, run_id: str | None = None,
    thread_id: str | None = None, script: tuple[str, ...] | None = None,
) -> list[Violation]:
    """Every broken guarantee in the whole event list of one run, as one client received it.

    The list is what a client got from the run's start (or a replay from seq 0) with no
    ``resume`` in between. On top of :class:`RunChecker`'s rules, every event must be of this
    run (``foreign`` otherwise) and have a well-typed envelope and payload (``malformed``).

    Args:
        events: The events' wire form (JSON objects as dicts), in the order received.
        run_id: The run's id; the first event's when None.
        thread_id: The run's thread_id; the first event's when None.
        script: The exact event types in seq order, when known.
    """
    first = events[0] if events else {}
    run_id = run_id if run_id is not None else str(first.get("run_id", ""))
    if thread_id is None and isinstance(first.get("thread_id"), str):
        thread_id = first["thread_id"]
    checker = RunChecker(run_id, thread_id, script)
    found: list[Violation] = []
    for frame in events:
        seq = frame.get("seq")
        at = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        if isinstance(frame.get("run_id"), str) and frame["run_id"] != run_id:
            found.append(Violation(Kind.FOREIGN, run_id, at, f"event of run {frame['run_id']!r}"))
            continue
        new = checker.feed(frame)
        found += new
        problem = None if new and new[0].kind is Kind.MALFORMED else _field_problem(frame)
        if problem is not None:
            found.append(Violation(Kind.MALFORMED, run_id, at, problem))
    return found + checker.finish()


def check_run(
    events: Sequence[Mapping[str, Any]], *, run_id: str | None = None,
    thread_id: str | None = None, script: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Checks a run's whole event list (see :func:`run_violations`).

    Returns:
        The ``agent_completed`` payload.

    Raises:
        GuaranteeViolated: listing every violation.
    """
    found = run_violations(events, run_id=run_id, thread_id=thread_id, script=script)
    if found:
        raise GuaranteeViolated(found)
    return dict(events[-1]["payload"])
