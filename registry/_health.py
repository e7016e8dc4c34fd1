"""What the registry reports about itself: a frozen statistics snapshot and its health."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Final, final

import attrs

__all__ = ["HEALTH_WINDOW_S", "DeliveryWindow", "Health", "RegistryStatistics"]

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
