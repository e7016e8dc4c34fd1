"""The outbound side of one WebSocket: a bounded queue that a single writer task drains.

:class:`SocketConnection` implements :class:`registry.Subscriber`. The registry hands it events
without ever blocking; the writer task sends them. Replays are read from the run's retained
log as the socket drains and never count against ``max_queued_messages``; live events and
control frames do, and going over the limit closes the socket with 4008 (its runs go on and
the client can resume). Each run's events go out in seq order; runs are interleaved fairly.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import Final, final

import trio

from registry import Event

__all__ = ["CLOSE_GOING_AWAY", "CLOSE_OVERFLOW", "SocketConnection"]

log = logging.getLogger("harness.connection")

CLOSE_OVERFLOW: Final = 4008
CLOSE_GOING_AWAY: Final = 1001
#: A writer that sent nothing for this many pauses is stuck: runs stop waiting for it.
_STALL_PAUSES: Final = 250


@final
class _RunCopy:
    """This socket's copy of one run's stream: a replay to read, then queued live events."""

    __slots__ = ("live", "replay", "replay_pos", "sent_through")

    def __init__(self, replay: Sequence[Event], after_seq: int) -> None:
        self.replay = replay
        self.replay_pos = 0
        self.live: deque[Event] = deque()
        self.sent_through = after_seq

    def pending(self) -> bool:
        return self.replay_pos < len(self.replay) or bool(self.live)


@final
class SocketConnection:
    """One client socket as the registry sees it.

    Args:
        user_id: The authenticated user.
        max_queued: ``max_queued_messages``: live events plus control frames waiting.
        label: For logs (peer address).
        pause_s: ``backpressure_pause_s``: the longest a run waits per event for this
            socket to drain below half of ``max_queued``.
    """

    #: send_event only enqueues; the registry needs no timeout around it.
    immediate_delivery: Final = True

    def __init__(
        self, user_id: str, max_queued: int, label: str = "", pause_s: float = 0.002
    ) -> None:
        self._user_id = user_id
        self.max_queued = max_queued
        self.high_water = max_queued // 2
        self.pause_s = pause_s
        self.label = label
        self.close_code: int | None = None
        self.close_reason = ""
        self._control: deque[str] = deque()
        self._runs: dict[str, _RunCopy] = {}
        self._ready: dict[str, None] = {}
        self._queued_live = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._drained = trio.lowlevel.ParkingLot()
        self._last_sent = trio.current_time()
        self._close_requested = trio.Event()

    # ------------------------------------------------------- Subscriber
    @property
    def user_id(self) -> str:
        return self._user_id

    def attach(self, run_id: str, after_seq: int, replay: list[Event]) -> None:
        old = self._runs.get(run_id)
        if old is not None:
            self._queued_live -= len(old.live)
        self._runs[run_id] = _RunCopy(replay, after_seq)
        if replay:
            self._mark_ready(run_id)

    async def send_event(self, event: Event) -> None:
        """Queues a live event; past the high-water mark, gives the reader a moment first.

        The registry hands each seq once, after any replay (``WebSocketManager.is_live``). Above
        half of ``max_queued`` the call waits (at most ``pause_s``, shielded so that it
        cannot lose the event it queued) for the writer to drain: a client that reads keeps
        up with a fast agent, one that does not is closed with 4008 at the limit.
        """
        copy = self._runs.get(event.run_id)
        if copy is None or self.close_code is not None:
            return
        copy.live.append(event)
        self._queued_live += 1
        if not self._check_room():
            return
        self._mark_ready(event.run_id)
        if self.queued() > self.high_water and self._draining():
            with trio.CancelScope(shield=True), trio.move_on_after(self.pause_s):
                await self._drained.park()

    def _draining(self) -> bool:
        """Whether the writer sent something lately (a stuck socket does not slow the run)."""
        return trio.current_time() - self._last_sent < _STALL_PAUSES * self.pause_s

    def detach(self, run_id: str) -> None:
        copy = self._runs.pop(run_id, None)
        if copy is not None:
            self._queued_live -= len(copy.live)
        self._ready.pop(run_id, None)

    def delivered_through(self, run_id: str) -> int:
        copy = self._runs.get(run_id)
        return copy.sent_through if copy is not None else 0

    # ----------------------------------------------------------- control
    def send_control(self, frame: str) -> None:
        """Queues a control frame (run_accepted, error, pong); it goes before queued events."""
        if self.close_code is not None:
            return
        self._control.append(frame)
        if self._check_room():
            self._lot.unpark_all()

    def close(self, code: int, reason: str = "") -> None:
        """Asks the writer to close the socket once what is queued has been sent.

        4008 (overflow) drops what is queued instead; the first request wins.
        """
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        self._close_requested.set()
        if code == CLOSE_OVERFLOW:
            self._drop_queued()
        self._lot.unpark_all()
        self._drained.unpark_all()

    def run_ids(self) -> list[str]:
        """The runs this socket has a copy of (for logs)."""
        return list(self._runs)

    def queued(self) -> int:
        return self._queued_live + len(self._control)

    def _check_room(self) -> bool:
        if self.queued() <= self.max_queued:
            return True
        log.warning("outbound queue over %d user_id=%s %s: closing with 4008",
                    self.max_queued, self.user_id, self.label)
        self.close(CLOSE_OVERFLOW, "outbound queue overflow; reconnect and resume")
        return False

    def _drop_queued(self) -> None:
        self._control.clear()
        self._ready.clear()
        for copy in self._runs.values():
            copy.live.clear()
        self._queued_live = 0

    def _mark_ready(self, run_id: str) -> None:
        if run_id not in self._ready:
            self._ready[run_id] = None
            self._lot.unpark_all()

    # ------------------------------------------------------------ writer
    def next_frame(self) -> tuple[str, str | None, int] | None:
        """The next frame to send, as (text, run_id or None, seq); None when nothing is queued."""
        if self._control:
            return self._control.popleft(), None, 0
        while self._ready:
            run_id = next(iter(self._ready))
            del self._ready[run_id]
            copy = self._runs.get(run_id)
            if copy is None or not copy.pending():
                continue
            event = self._take(copy)
            if copy.pending():
                self._ready[run_id] = None
            return event.json, run_id, event.seq
        return None

    def next_frames(self, limit: int) -> list[tuple[str, str | None, int]]:
        """Up to ``limit`` frames to send now, in the order :meth:`next_frame` gives them."""
        batch: list[tuple[str, str | None, int]] = []
        while len(batch) < limit:
            item = self.next_frame()
            if item is None:
                break
            batch.append(item)
        return batch

    def _take(self, copy: _RunCopy) -> Event:
        if copy.replay_pos < len(copy.replay):
            event = copy.replay[copy.replay_pos]
            copy.replay_pos += 1
            return event
        self._queued_live -= 1
        if self._drained and self.queued() <= self.high_water:
            self._drained.unpark_all()
        return copy.live.popleft()

    def sent(self, run_id: str | None, seq: int) -> None:
        """Records that the frame of ``run_id``/``seq`` was written to the socket."""
        copy = self._runs.get(run_id) if run_id is not None else None
        if copy is not None and seq > copy.sent_through:
            copy.sent_through = seq
        self._last_sent = trio.current_time()

    async def wait_close_requested(self) -> None:
        await self._close_requested.wait()

    async def wait_for_work(self) -> None:
        """Blocks until a frame is queued or a close was requested."""
        if self.close_code is None and not self._control and not self._ready:
            await self._lot.park()
