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

from registry._events import RunStatus

__all__ = ["IllegalTransition", "RunLifecycle", "RunState", "Trigger"]


class RunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    COMPLETING = "completing"
    COMPLETED = "completed"


class Trigger(enum.Enum):
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


_C, _R, _G, _D = RunState.CREATED, RunState.RUNNING, RunState.COMPLETING, RunState.COMPLETED

#: (state, trigger) -> (next state, the status the run ends with, if this decides it)
TRANSITIONS: Final[dict[tuple[RunState, Trigger], tuple[RunState, RunStatus | None]]] = {
    (_C, Trigger.START): (_R, None),
    (_C, Trigger.CANCEL): (_G, RunStatus.CANCELLED),
    (_C, Trigger.TIMEOUT): (_G, RunStatus.TIMED_OUT),
    (_C, Trigger.DETACH): (_G, RunStatus.CANCELLED),
    (_C, Trigger.SHUTDOWN): (_G, RunStatus.CANCELLED),
    (_C, Trigger.STALE): (_G, RunStatus.CANCELLED),
    (_R, Trigger.SUCCEED): (_G, RunStatus.SUCCEEDED),
    (_R, Trigger.FAIL): (_G, RunStatus.FAILED),
    (_R, Trigger.CANCEL): (_G, RunStatus.CANCELLED),
    (_R, Trigger.TIMEOUT): (_G, RunStatus.TIMED_OUT),
    (_R, Trigger.DETACH): (_G, RunStatus.CANCELLED),
    (_R, Trigger.SHUTDOWN): (_G, RunStatus.CANCELLED),
    (_R, Trigger.STALE): (_G, RunStatus.CANCELLED),
    (_G, Trigger.COMPLETE): (_D, None),
}


@final
class RunLifecycle:
    """Where one run is in its life, and why it ended."""

    __slots__ = ("state", "status", "trigger")

    def __init__(self) -> None:
        self.state = RunState.CREATED
        self.status: RunStatus | None = None
        self.trigger: Trigger | None = None

    @property
    def active(self) -> bool:
        """True until the run's ending has been decided."""
        return self.state in (_C, _R)

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
            self.trigger = trigger
        return new_state
