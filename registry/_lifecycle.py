"""The lifecycle of one run, sans-IO: one transition table, read top to bottom.

::

    CREATED ──start──▶ RUNNING ──succeed/fail/cancel/timeout/detach/shutdown──▶ COMPLETING
       │                                                                        │
       └──────────────cancel/timeout/detach/shutdown──────────▶ COMPLETING ──complete──▶ COMPLETED

The first ending trigger decides the run's status; any later one is illegal, so a run can
never end twice. Illegal transitions raise :class:`IllegalTransition`.
"""

from __future__ import annotations

import enum
from typing import Final, final

from registry._vocabulary import RunStatus

__all__ = ["IllegalTransition", "RunLifecycle", "RunState", "Trigger"]


class RunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    COMPLETING = "completing"
    COMPLETED = "completed"


class Trigger(enum.Enum):
    """What moves a run: ``start``; one of the endings; ``complete`` once its last event is out."""

    START = "start"
    SUCCEED = "succeed"
    FAIL = "fail"
    CANCEL = "cancel"
    TIMEOUT = "timeout"
    DETACH = "detach"
    SHUTDOWN = "shutdown"
    STALE = "stale"
    COMPLETE = "complete"


class IllegalTransition(Exception):
    """A trigger that the run's current state does not allow (a bug in the caller)."""


CREATED, RUNNING = RunState.CREATED, RunState.RUNNING
COMPLETING, COMPLETED = RunState.COMPLETING, RunState.COMPLETED

#: (state, trigger) -> (next state, the status the run ends with, if this decides it).
#: Read top to bottom: a run starts; one ending decides its status; then it completes.
TRANSITIONS: Final[dict[tuple[RunState, Trigger], tuple[RunState, RunStatus | None]]] = {
    (CREATED, Trigger.START): (RUNNING, None),
    (CREATED, Trigger.CANCEL): (COMPLETING, RunStatus.CANCELLED),
    (CREATED, Trigger.TIMEOUT): (COMPLETING, RunStatus.TIMED_OUT),
    (CREATED, Trigger.DETACH): (COMPLETING, RunStatus.CANCELLED),
    (CREATED, Trigger.SHUTDOWN): (COMPLETING, RunStatus.CANCELLED),
    (CREATED, Trigger.STALE): (COMPLETING, RunStatus.CANCELLED),
    (RUNNING, Trigger.SUCCEED): (COMPLETING, RunStatus.SUCCEEDED),
    (RUNNING, Trigger.FAIL): (COMPLETING, RunStatus.FAILED),
    (RUNNING, Trigger.CANCEL): (COMPLETING, RunStatus.CANCELLED),
    (RUNNING, Trigger.TIMEOUT): (COMPLETING, RunStatus.TIMED_OUT),
    (RUNNING, Trigger.DETACH): (COMPLETING, RunStatus.CANCELLED),
    (RUNNING, Trigger.SHUTDOWN): (COMPLETING, RunStatus.CANCELLED),
    (RUNNING, Trigger.STALE): (COMPLETING, RunStatus.CANCELLED),
    (COMPLETING, Trigger.COMPLETE): (COMPLETED, None),
}


@final
class RunLifecycle:
    """Where one run is in its life, and why it ended."""

    __slots__ = ("state", "status")

    def __init__(self) -> None:
        self.state = RunState.CREATED
        self.status: RunStatus | None = None

    @property
    def active(self) -> bool:
        """True until the run's ending has been decided."""
        return self.state in (CREATED, RUNNING)

    def can(self, trigger: Trigger) -> bool:
        return (self.state, trigger) in TRANSITIONS

    def fire(self, trigger: Trigger) -> RunState:
        """Applies ``trigger``; returns the new state.

        Raises:
            IllegalTransition: the current state does not accept ``trigger``.
        """
        try:
            new_state, status = TRANSITIONS[self.state, trigger]
        except KeyError:
            raise IllegalTransition(
                f"{trigger.value} is illegal in state {self.state.value}"
            ) from None
        self.state = new_state
        if status is not None:
            self.status = status
        return new_state
