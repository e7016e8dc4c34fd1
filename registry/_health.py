"""What the registry reports: statistics, health, and failures as a client sees them."""

from __future__ import annotations

import logging
import secrets
from collections import Counter, deque
from collections.abc import Mapping
from typing import Final, final

import attrs

from registry._run import Run
from registry._table import RunTable

__all__ = ["HEALTH_WINDOW_S", "DeliveryWindow", "Health", "RegistryStatistics", "failure",
           "judge", "snapshot"]

log = logging.getLogger("registry")

#: Health judges delivery failures over this many recent seconds.
HEALTH_WINDOW_S: Final = 60.0
#: More than this share of deliveries failed in the window: degraded.
FAILURE_RATIO: Final = 0.001


@final
@attrs.frozen
class RegistryStatistics:
    """A snapshot of the registry's counters (see ``AgentExecutionRegistry.statistics``).

    ``events_refused`` counts events the registry refused because the caller broke a
    stream rule (a programming error); they are not delivery failures.
    """

    active_runs: int
    active_runs_per_user: Mapping[str, int]
    retained_runs: int
    connections: int
    runs_started: int
    runs_completed: int
    runs_by_status: Mapping[str, int]
    events_emitted: int
    events_delivered: int
    events_retried: int
    events_failed: int
    events_refused: int
    dedup_hits: int


@final
@attrs.frozen
class Health:
    """``status`` is ``ok``, ``degraded`` or ``unhealthy``; ``reasons`` says why when not ok."""

    status: str
    reasons: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@final
class DeliveryWindow:
    """Deliveries handed and failed over the last :data:`HEALTH_WINDOW_S` seconds.

    It keeps a mark (time, totals) at most once a second when asked, and compares the
    totals now with the oldest mark still inside the window. Pure: times are passed in.
    """

    __slots__ = ("_marks",)

    def __init__(self, now: float) -> None:
        self._marks: deque[tuple[float, int, int]] = deque([(now, 0, 0)])

    def failure(self, now: float, handed: int, failed: int) -> str | None:
        """Why deliveries look unhealthy over the window (None when they do not)."""
        marks = self._marks
        if now - marks[-1][0] >= 1.0:
            marks.append((now, handed, failed))
        while len(marks) > 1 and marks[1][0] <= now - HEALTH_WINDOW_S:
            marks.popleft()
        _, handed_before, failed_before = marks[0]
        handed, failed = handed - handed_before, failed - failed_before
        if not failed or failed / (handed + failed) <= FAILURE_RATIO:
            return None
        return (f"{failed} of {handed + failed} event deliveries failed in the last "
                f"{HEALTH_WINDOW_S:g} s")


def snapshot(table: RunTable, counts: Counter[str], refused: int,
             connections: int) -> RegistryStatistics:
    """The statistics of a registry from its run table and its delivery counters."""
    return RegistryStatistics(
        active_runs=table.active_count, active_runs_per_user=table.active_per_user(),
        retained_runs=table.retained_count, connections=connections,
        runs_started=table.runs_started, runs_completed=table.runs_completed,
        runs_by_status=dict(table.completed_by_status),
        events_emitted=counts["events_emitted"], events_delivered=counts["events_delivered"],
        events_retried=counts["events_retried"], events_failed=counts["events_failed"],
        events_refused=refused, dedup_hits=table.dedup_hits)


def judge(table: RunTable, counts: Counter[str], window: DeliveryWindow, now: float) -> Health:
    """``unhealthy`` when closing; ``degraded`` near capacity or with failing deliveries."""
    if table.closing:
        return Health("unhealthy", ("the registry is shutting down",))
    reasons = []
    active, limit = table.active_count, table.max_active_runs
    if active >= 0.9 * limit:
        reasons.append(f"{active} runs in flight, at or near max_active_runs ({limit})")
    failing = window.failure(now, counts["events_delivered"], counts["events_failed"])
    reasons += [failing] if failing else []
    return Health("degraded", tuple(reasons)) if reasons else Health("ok")


def failure(run: Run, exc: BaseException, what: str, *, expose: bool) -> dict[str, str]:
    """The ``error`` and ``error_id`` a failed ``what`` (agent, tool) shows its client.

    The exception is logged in full with the ``error_id``; the client gets a short generic
    text, or with ``expose`` (``expose_errors``, for development) the exception's text.
    """
    error_id = secrets.token_hex(8)
    log.warning("%s failed error_id=%s run_id=%s user_id=%s", what, error_id, run.run_id,
                run.user_id, exc_info=exc)
    text = str(exc)
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return {"error": described if expose else f"the {what} failed", "error_id": error_id}
