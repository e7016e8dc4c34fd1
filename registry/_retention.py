"""How long ended runs stay for late resumes, and what makes room when memory is short.

An ended run stays ``retention_s``; beyond ``max_retained_runs_per_user`` ended runs of one
user, or ``max_retained_mib`` of held event bytes in all, the oldest ended runs are dropped
first. A dropped run is ``not_found`` for resume, ack and cancel, and its request_id starts
a new run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import final

from registry._config import Config
from registry._manager import WebSocketManager
from registry._outbound import OutboundQueue
from registry._run import Run
from registry._stream import HeldBytes
from registry._table import RunTable
from registry._timers import DeadlineQueue

__all__ = ["Retention"]


@final
class Retention:
    """Keeps ended runs within their bounds; :attr:`expiry` is its one timer service.

    Args:
        config: ``retention_s`` and ``max_retained_mib``.
        table: Where runs are dropped from.
        manager: Who follows a dropped run (unsubscribed once sent what it is owed).
        on_overflow: Called with a socket's queue that the frames still owed of a dropped
            run took over its bounds (closed 4008).
    """

    def __init__(self, config: Config, table: RunTable, manager: WebSocketManager,
                 on_overflow: Callable[[OutboundQueue], None]) -> None:
        self.table = table
        self.manager = manager
        self.on_overflow = on_overflow
        #: Bytes of event frames held by every run of the registry (their streams add).
        self.held = HeldBytes()
        self.limit = int(config.max_retained_mib * 1024 * 1024)
        #: Holds run ids, not runs: a run dropped early by a bound is freed at once.
        self.expiry = DeadlineQueue(config.retention_s, self._expired)

    def keep(self, run: Run, ended_at: float) -> None:
        """A run has ended: it is retained (its user's oldest beyond the bound are dropped)."""
        for extra in self.table.complete(run):
            self.drop(extra)
        self.expiry.push(run.run_id, ended_at)
        self.within_budget()

    def over_budget(self) -> bool:
        return self.held.bytes > self.limit

    def within_budget(self, emitting: Run | None = None) -> None:
        """Past ``max_retained_mib``: drops ended runs, oldest first.

        When no ended run is left to drop, the run that is ``emitting`` gives up its
        oldest retained events (resume from before them is then ``resume_unavailable``);
        frames that a socket is still reading stay until it has read them.
        """
        while self.held.bytes > self.limit:
            oldest = self.table.oldest_ended()
            if oldest is None:
                break
            self.drop(oldest)
        if emitting is not None and self.held.bytes > self.limit:
            stream = emitting.stream
            stream.trim_through(stream.last_seq - stream.retained_count // 2)

    def _expired(self, run_id: str) -> None:
        run = self.table.lookup(run_id)
        if run is not None and not run.is_active:
            self.drop(run)

    def drop(self, run: Run) -> None:
        """Forgets an ended run (idempotent: its timer may come after a bound dropped it).

        A socket still sending the run's events keeps the frames it has not sent (they count
        against its own bounds) and sends them through ``agent_completed``.
        """
        if not self.table.drop(run):
            return
        self.held.bytes -= run.stream.held_bytes
        for connection in self.manager.forget_run(run.run_id):
            if not isinstance(connection, OutboundQueue):
                connection.detach(run.run_id)
            elif not connection.drop_run(run.run_id):
                self.on_overflow(connection)
