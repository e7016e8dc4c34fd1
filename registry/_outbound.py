"""The outbound side of one client connection, sans-IO: what to send next, and when to give up.

An :class:`OutboundQueue` holds no events of its own. For each run the connection follows it
keeps a *cursor* into the run's log (:class:`~registry.RunStream`): the next seq to send,
and the seq from which events count as live. A ``resume`` only moves the cursor back, so the
replay and the live events that follow it are one sequence read from one log: every seq is
sent once, in order, and nothing can fall between the replay and the live hand-off.

Replayed events never count against the bounds (they are read from the log as the socket
drains); live events and control frames (``run_accepted``, ``error``, ``pong``, ...) do,
by number and by bytes. Going over either bound is the 4008 decision: the queue closes,
drops what it holds, and leaves every run (the client can reconnect and resume).

It reads no clock, owns no task and touches no socket: the registry tells it about new
events (:meth:`OutboundQueue.on_append`), a transport takes frames (:meth:`OutboundQueue.take`)
and writes them. Both servers, trio and asyncio, drive the same class.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, final

from registry._stream import RunStream

__all__ = ["CLOSE_OVERFLOW", "OutboundQueue"]

#: The close code for a connection whose outbound queue went over its bounds.
CLOSE_OVERFLOW: Final = 4008


@final
class _Cursor:
    """One connection's copy of one run: ``next`` to send; seqs >= ``live_from`` are live."""

    __slots__ = ("counted", "dropped", "live_from", "next", "stream")

    def __init__(self, stream: RunStream, after_seq: int) -> None:
        self.stream = stream
        self.next = after_seq + 1
        self.live_from = stream.last_seq + 1
        #: The newest seq the registry has announced (the log may hold no more for us yet).
        self.counted = stream.last_seq
        #: The registry has dropped the run: the cursor ends once its last frame is taken.
        self.dropped = False

    def pending(self) -> bool:
        return self.next <= self.counted


@final
class OutboundQueue:
    """Control frames, then each followed run's events from its cursor, runs taken in turn.

    Args:
        user_id: The authenticated user of the connection.
        max_messages: ``max_queued_messages``: live events plus control frames waiting.
        max_bytes: ``max_queued_mib`` in bytes, the same bound by size.
        on_ready: Called (no arguments, must not block) whenever the queue gets something to
            send after having had nothing, and when a close is requested: the transport's
            cue to write.
    """

    __slots__ = (
        "_closing", "_control", "_cursors", "_ready", "_user_id", "close_code", "close_reason",
        "conn_id",
        "max_bytes", "max_messages", "on_ready", "pause", "queued", "queued_bytes",
    )

    def __init__(
        self,
        user_id: str,
        *,
        max_messages: int,
        max_bytes: int,
        on_ready: Callable[[], object] | None = None,
    ) -> None:
        self._user_id = user_id
        #: Unguessable id of the connection (counted across the nodes of a service).
        self.conn_id = secrets.token_hex(8)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.on_ready = on_ready
        #: Set by a transport: how a run waits (bounded) for this socket to drain when it
        #: is past half its bounds. The queue itself never calls it; the registry does.
        self.pause: Callable[[], Awaitable[None]] | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        #: Live events plus control frames waiting, by number and by bytes.
        self.queued = 0
        self.queued_bytes = 0
        self._control: deque[bytes] = deque()
        self._cursors: dict[str, _Cursor] = {}
        self._ready: dict[str, None] = {}  # runs with something to send, in turn order
        #: After a close other than 4008: every event still owed, taken off the cursors.
        self._closing: deque[tuple[bytes, float]] = deque()

    @property
    def user_id(self) -> str:
        return self._user_id

    # ============================================================ registry side
    def subscribe(self, run_id: str, stream: RunStream, after_seq: int) -> None:
        """Starts (or restarts) this connection's copy of a run at ``after_seq + 1``.

        Events up to the log's last one are the replay; later ones are live. The caller has
        checked that every event after ``after_seq`` is still held.
        """
        if self.close_code is not None:
            return
        self.unsubscribe(run_id)
        cursor = self._cursors[run_id] = _Cursor(stream, after_seq)
        if cursor.pending():
            self._mark_ready(run_id)

    def unsubscribe(self, run_id: str) -> None:
        """Stops following a run; its live events still waiting are dropped."""
        if self.close_code is not None:
            return
        cursor = self._cursors.pop(run_id, None)
        if cursor is None:
            return
        self._ready.pop(run_id, None)
        for seq in range(max(cursor.next, cursor.live_from), cursor.counted + 1):
            self._uncount(len(cursor.stream.frame(seq)))

    def drop_run(self, run_id: str) -> bool:
        """The registry has dropped a run (a retention bound): what is still owed of it is sent.

        The frames this connection has not yet taken stay with it, then it stops following
        the run. Replayed frames still owed now count against the bounds like live ones
        (nothing else holds them any more), so the queue may go over a bound.

        Returns:
            False when that took the queue over a bound: it is now closed with 4008.
        """
        cursor = self._cursors.get(run_id)
        if cursor is None:
            return self.close_code != CLOSE_OVERFLOW
        if not cursor.pending():
            self.unsubscribe(run_id)
            return True
        stream = cursor.stream
        for seq in range(cursor.next, cursor.live_from):
            self.queued += 1
            self.queued_bytes += len(stream.frame(seq))
        cursor.live_from = min(cursor.live_from, cursor.next)
        cursor.dropped = True
        return self._check_room()

    def on_append(self, run_id: str, last_seq: int) -> bool:
        """The run's log now ends at ``last_seq``: counts the new live events.

        Returns:
            False when that took the queue over a bound: it is now closed with 4008
            (every subscription dropped); the registry must forget the connection.
        """
        cursor = self._cursors.get(run_id)
        if cursor is None:
            return self.close_code != CLOSE_OVERFLOW
        stream = cursor.stream
        for seq in range(cursor.counted + 1, last_seq + 1):
            self.queued += 1
            self.queued_bytes += len(stream.frame(seq))
        cursor.counted = max(cursor.counted, last_seq)
        if cursor.pending():
            self._mark_ready(run_id)
        return self._check_room()

    def next_seq(self, run_id: str) -> int | None:
        """The next seq of ``run_id`` this connection will send (None when not following it)."""
        cursor = self._cursors.get(run_id)
        return cursor.next if cursor is not None else None

    def sent_through(self, run_id: str) -> int:
        """The highest seq of ``run_id`` taken for sending (0 when not following it)."""
        cursor = self._cursors.get(run_id)
        return cursor.next - 1 if cursor is not None else 0

    def run_ids(self) -> list[str]:
        """The runs this connection follows."""
        return list(self._cursors)

    # =========================================================== transport side
    def push_control(self, frame: bytes) -> bool:
        """Queues a control frame; it goes before every queued event.

        Returns:
            False when the queue is closed or this took it over a bound (closed with 4008).
        """
        if self.close_code is not None:
            return False
        was_idle = not self.has_frames()
        self._control.append(frame)
        self.queued += 1
        self.queued_bytes += len(frame)
        if not self._check_room():
            return False
        if was_idle and self.on_ready is not None:
            self.on_ready()
        return True

    def take(self, max_bytes: int) -> tuple[list[bytes], list[float]]:
        """Takes frames to send now, about ``max_bytes`` of them (always at least one if any).

        Control frames come first, then one event of each ready run in turn, each run's
        events in seq order.

        Returns:
            The frames, and the emit time of each event frame among them (for latency).
        """
        frames: list[bytes] = []
        stamps: list[float] = []
        size = 0
        while self._control and (size < max_bytes or not frames):
            frame = self._control.popleft()
            self._uncount(len(frame))
            frames.append(frame)
            size += len(frame)
        while self._ready and (size < max_bytes or not frames):
            frame = self._take_event(next(iter(self._ready)), stamps)
            frames.append(frame)
            size += len(frame)
        while self._closing and (size < max_bytes or not frames):
            frame, ts = self._closing.popleft()
            self._uncount(len(frame))
            frames.append(frame)
            stamps.append(ts)
            size += len(frame)
        return frames, stamps

    def _take_event(self, run_id: str, stamps: list[float]) -> bytes:
        del self._ready[run_id]
        cursor = self._cursors[run_id]
        seq = cursor.next
        cursor.next += 1
        frame = cursor.stream.frame(seq)
        stamps.append(cursor.stream.ts(seq))
        if seq >= cursor.live_from:
            self._uncount(len(frame))
        if cursor.pending():
            self._ready[run_id] = None  # back of the line: runs take turns
        elif cursor.dropped:
            del self._cursors[run_id]
        return frame

    def has_frames(self) -> bool:
        """Whether :meth:`take` would return something now."""
        return bool(self._control or self._ready or self._closing)

    def above_high_water(self) -> bool:
        """Whether more than half of either bound is used (a run may wait for a drain)."""
        return self.queued * 2 > self.max_messages or self.queued_bytes * 2 > self.max_bytes

    def close(self, code: int, reason: str = "") -> None:
        """Asks for the connection to be closed with ``code``; the first request wins.

        Every subscription ends at once (the registry may forget the connection). 4008
        drops everything queued too: the reader is too slow, nothing more is owed to it
        but the close frame. Any other code keeps what is owed, events of each run up to
        the last one announced, for the transport to send before its close frame.
        """
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        if code == CLOSE_OVERFLOW:
            self._control.clear()
        else:
            self._keep_owed()
        self._cursors.clear()
        self._ready.clear()
        self.queued = len(self._control) + len(self._closing)
        self.queued_bytes = sum(map(len, self._control)) + sum(len(f) for f, _ in self._closing)
        if self.on_ready is not None:
            self.on_ready()

    def _keep_owed(self) -> None:
        for run_id in list(self._ready):
            cursor = self._cursors[run_id]
            stream = cursor.stream
            owed = range(cursor.next, cursor.counted + 1)
            self._closing.extend((stream.frame(seq), stream.ts(seq)) for seq in owed)

    # ================================================================= helpers
    def _check_room(self) -> bool:
        if self.queued <= self.max_messages and self.queued_bytes <= self.max_bytes:
            return True
        self.close(CLOSE_OVERFLOW, "outbound queue overflow; reconnect and resume")
        return False

    def _uncount(self, size: int) -> None:
        self.queued -= 1
        self.queued_bytes -= size

    def _mark_ready(self, run_id: str) -> None:
        if run_id in self._ready:
            return
        was_idle = not self.has_frames()
        self._ready[run_id] = None
        if was_idle and self.on_ready is not None:
            self.on_ready()
