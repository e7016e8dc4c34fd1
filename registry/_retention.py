"""How long ended runs stay for late resumes, and what makes room when memory is short.

An ended run stays ``retention_s``; beyond ``max_retained_runs_per_user`` ended runs of one
user, or ``max_retained_mib`` of held event bytes in all, the oldest ended runs are dropped
first. A dropped run is ``not_found`` for resume, ack and cancel, and its request_id starts
a new run.
"""

from __future__ import annotations

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
        manager: Who follows a dropped run (unsubscribed).
    """

    def __init__(self, config: Config, table: RunTable, manager: WebSocketManager) -> None:
        self.table = table
        self.manager = manager
        #: Bytes of event frames held by every run of the registry (their streams add).
        self.held = HeldBytes()
        self.limit = int(config.max_retained_mib * 1024 * 1024)
        self.expiry = DeadlineQueue(config.retention_s, self.drop)

    def keep(self, run: Run, ended_at: float) -> None:
        """A run has ended: it is retained (its user's oldest beyond the bound are dropped)."""
        for extra in self.table.complete(run):
            self.drop(extra)
        self.expiry.push(run, ended_at)
        self.within_budget()

    def within_budget(self) -> None:
        """Past ``max_retained_mib``: drops ended runs, oldest first."""
        while self.held.bytes > self.limit:
            oldest = self.table.oldest_ended()
            if oldest is None:
                return
            self.drop(oldest)

    def drop(self, run: Run) -> None:
        """Forgets an ended run (idempotent: its timer may come after a bound dropped it)."""
        if not self.table.drop(run):
            return
        self.held.bytes -= run.stream.held_bytes
        for connection in self.manager.forget_run(run.run_id):
            if isinstance(connection, OutboundQueue):
                connection.unsubscribe(run.run_id)
            else:
                connection.detach(run.run_id)
